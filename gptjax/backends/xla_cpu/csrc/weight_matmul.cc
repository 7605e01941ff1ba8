// y = x @ W for the few rows of a decoding step, W float32 or int8 with one float32 scale per
// output column, as XLA FFI custom calls (gptjax/cpu_kernels.py).
//
// XLA:CPU runs [16, 768] x [768, 3072] at about 30 GFLOP/s on 2 cores and converts an int8
// weight to a float32 copy before every product (experiments/DECODE_THROUGHPUT.md). Here the
// weight is streamed once per block of rows: int8 values are widened to float32 in registers
// and the scale is applied to the sums, so an int8 weight is read as 1 byte per element.
//
// x: [M, K] float32; w: [K, N] (transposed = false) or [N, K] (transposed = true, a tied
// embedding table read as the output layer); scale: [N]; y: [M, N] float32.
//   y[i, j] = scale[j] * sum_k x[i, k] * w(k, j)

#include <cstdint>

#include "gemm.h"
#include "vector_math.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kColsPerUnit = 128;  // [K, N]: columns per unit of work
constexpr int64_t kKBlock = 64;        // [K, N]: weight rows per pass over a unit's columns
constexpr int kRowTile = 6;           // rows sharing each loaded weight vector ([K, N])
constexpr int64_t kPrefetchRows = 16;  // [K, N]: weight rows fetched ahead
constexpr int64_t kOutsPerUnit = 64;  // [N, K]: output columns per unit of work
constexpr int kOutTile = 4;           // [N, K]: weight rows read together
constexpr int kRowTileT = 4;          // [N, K]: rows of x per register tile
constexpr int64_t kParallelMacs = 1 << 20;  // smaller products run on the calling thread

inline float Widen(float v) { return v; }
inline float Widen(int8_t v) { return static_cast<float>(v); }

// Portable loops, for CPUs without AVX-512.
template <typename T>
void BlockGeneric(const float* x, int64_t m, int64_t k, const T* w, int64_t n, bool transposed,
                  const float* scale, float* y, int64_t j0, int64_t j1) {
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = j0; j < j1; ++j) {
      float acc = 0.0f;
      for (int64_t kk = 0; kk < k; ++kk)
        acc += x[i * k + kk] * Widen(transposed ? w[j * k + kk] : w[kk * n + j]);
      y[i * n + j] = scale ? acc * scale[j] : acc;
    }
  }
}

#if defined(__x86_64__)
#define GPTJAX_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,fma")))

GPTJAX_TARGET inline __m512 Load16(const float* p, __mmask16 m) {
  return _mm512_maskz_loadu_ps(m, p);
}
GPTJAX_TARGET inline __m512 Load16(const int8_t* p, __mmask16 m) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, p)));
}

// Rows [0, R) of x against columns [j0, j0 + 64) and weight rows [k0, k1) of a [K, N] weight,
// added to y's partial sums unless `first`; `last` applies the scale. `masks` cover the columns
// that exist.
template <typename T, int R>
GPTJAX_TARGET void TileKN(const float* x, int64_t k, int64_t k0, int64_t k1, const T* w,
                          int64_t n, int64_t j0, const __mmask16* masks, bool first, bool last,
                          const float* scale, float* y) {
  __m512 acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < 4; ++v)
      acc[r][v] = first ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(masks[v], y + r * n + j0 + 16 * v);
  for (int64_t kk = k0; kk < k1; ++kk) {
    const T* row = w + kk * n + j0;
    // Successive rows are a page or more apart, beyond the hardware prefetchers' reach.
    if (kk + kPrefetchRows < k) {
      const char* ahead = reinterpret_cast<const char*>(row + kPrefetchRows * n);
      for (int64_t b = 0; b < 64 * static_cast<int64_t>(sizeof(T)); b += 64)
        _mm_prefetch(ahead + b, _MM_HINT_T0);
    }
    __m512 wv[4];
    for (int v = 0; v < 4; ++v) wv[v] = Load16(row + 16 * v, masks[v]);
    for (int r = 0; r < R; ++r) {
      const __m512 xb = _mm512_set1_ps(x[r * k + kk]);
      for (int v = 0; v < 4; ++v) acc[r][v] = _mm512_fmadd_ps(xb, wv[v], acc[r][v]);
    }
  }
  for (int v = 0; v < 4; ++v) {
    const __m512 s = last && scale ? _mm512_maskz_loadu_ps(masks[v], scale + j0 + 16 * v)
                                   : _mm512_set1_ps(1.0f);
    for (int r = 0; r < R; ++r)
      _mm512_mask_storeu_ps(y + r * n + j0 + 16 * v, masks[v], _mm512_mul_ps(acc[r][v], s));
  }
}

// Columns [j0, j1) of y. Weight rows are taken kKBlock at a time for every 64 columns and tile of
// rows, so that their pages stay in the TLB while they are reused.
template <typename T>
GPTJAX_TARGET void BlockKN(const float* x, int64_t m, int64_t k, const T* w, int64_t n,
                           const float* scale, float* y, int64_t j0, int64_t j1) {
  using Fn = void (*)(const float*, int64_t, int64_t, int64_t, const T*, int64_t, int64_t,
                      const __mmask16*, bool, bool, const float*, float*);
  static constexpr Fn kTiles[kRowTile + 1] = {nullptr,       TileKN<T, 1>, TileKN<T, 2>,
                                              TileKN<T, 3>, TileKN<T, 4>, TileKN<T, 5>,
                                              TileKN<T, 6>};
  for (int64_t k0 = 0; k0 < k; k0 += kKBlock) {
    const int64_t k1 = std::min(k, k0 + kKBlock);
    for (int64_t c = j0; c < j1; c += 64) {
      __mmask16 masks[4];
      for (int v = 0; v < 4; ++v) masks[v] = gptjax::TailMask(std::max<int64_t>(0, j1 - c - 16 * v));
      for (int64_t i0 = 0; i0 < m; i0 += kRowTile) {
        const int r = static_cast<int>(std::min<int64_t>(kRowTile, m - i0));
        kTiles[r](x + i0 * k, k, k0, k1, w, n, c, masks, k0 == 0, k1 == k, scale, y + i0 * n);
      }
    }
  }
}

// Rows [0, R) of x against the O weight rows (output columns) j .. j + O of an [N, K] weight.
template <typename T, int O, int R>
GPTJAX_TARGET void TileNK(const float* x, int64_t k, const T* w, int64_t n, int64_t j,
                          const float* scale, float* y) {
  __m512 acc[O][R];
  for (int o = 0; o < O; ++o)
    for (int r = 0; r < R; ++r) acc[o][r] = _mm512_setzero_ps();
  for (int64_t kk = 0; kk < k; kk += 16) {
    const __mmask16 m = gptjax::TailMask(k - kk);
    __m512 xv[R];
    for (int r = 0; r < R; ++r) xv[r] = _mm512_maskz_loadu_ps(m, x + r * k + kk);
    for (int o = 0; o < O; ++o) {
      const __m512 wv = Load16(w + (j + o) * k + kk, m);
      for (int r = 0; r < R; ++r) acc[o][r] = _mm512_fmadd_ps(xv[r], wv, acc[o][r]);
    }
  }
  for (int o = 0; o < O; ++o) {
    const float s = scale ? scale[j + o] : 1.0f;
    for (int r = 0; r < R; ++r) y[r * n + j + o] = _mm512_reduce_add_ps(acc[o][r]) * s;
  }
}

template <typename T, int O>
GPTJAX_TARGET void RowsNK(const float* x, int64_t m, int64_t k, const T* w, int64_t n, int64_t j,
                          const float* scale, float* y) {
  using Fn = void (*)(const float*, int64_t, const T*, int64_t, int64_t, const float*, float*);
  static constexpr Fn kTiles[kRowTileT + 1] = {nullptr, TileNK<T, O, 1>, TileNK<T, O, 2>,
                                               TileNK<T, O, 3>, TileNK<T, O, 4>};
  for (int64_t i0 = 0; i0 < m; i0 += kRowTileT) {
    const int r = static_cast<int>(std::min<int64_t>(kRowTileT, m - i0));
    kTiles[r](x + i0 * k, k, w, n, j, scale, y + i0 * n);
  }
}

template <typename T>
GPTJAX_TARGET void BlockNK(const float* x, int64_t m, int64_t k, const T* w, int64_t n,
                           const float* scale, float* y, int64_t j0, int64_t j1) {
  int64_t j = j0;
  for (; j + kOutTile <= j1; j += kOutTile) RowsNK<T, kOutTile>(x, m, k, w, n, j, scale, y);
  for (; j < j1; ++j) RowsNK<T, 1>(x, m, k, w, n, j, scale, y);
}
#endif  // defined(__x86_64__)

template <typename T>
void WeightMatmul(ffi::ThreadPool& pool, const float* x, int64_t m, int64_t k, const T* w,
                  int64_t n, bool transposed, const float* scale, float* y) {
  const int64_t per_unit = transposed ? kOutsPerUnit : kColsPerUnit;
  const int64_t units = (n + per_unit - 1) / per_unit;
  const bool avx512 = gptjax::HasAvx512();
  auto unit = [&](int64_t u) {
    const int64_t j0 = u * per_unit, j1 = std::min(n, j0 + per_unit);
#if defined(__x86_64__)
    if (avx512) {
      if (transposed) {
        BlockNK(x, m, k, w, n, scale, y, j0, j1);
      } else {
        BlockKN(x, m, k, w, n, scale, y, j0, j1);
      }
      return;
    }
#endif
    BlockGeneric(x, m, k, w, n, transposed, scale, y, j0, j1);
  };
  // A small product costs less than handing units to the pool's threads.
  if (m * n * k < kParallelMacs) {
    for (int64_t u = 0; u < units; ++u) unit(u);
  } else {
    gptjax::ParallelFor(pool, units, unit);
  }
}

template <typename W>
ffi::Error CheckShapes(const ffi::Buffer<ffi::F32>& x, const W& w, bool transposed, int64_t& m,
                       int64_t& k, int64_t& n) {
  const auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2)
    return ffi::Error::InvalidArgument("weight_matmul: x and w must be 2-D");
  m = xd[0];
  k = xd[1];
  n = transposed ? wd[0] : wd[1];
  if ((transposed ? wd[1] : wd[0]) != k)
    return ffi::Error::InvalidArgument("weight_matmul: x and w disagree on K");
  return ffi::Error::Success();
}

ffi::Error WeightMatmulF32(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                           ffi::ResultBuffer<ffi::F32> y, bool transposed) {
  int64_t m, k, n;
  if (ffi::Error e = CheckShapes(x, w, transposed, m, k, n); e.failure()) return e;
  WeightMatmul<float>(pool, x.typed_data(), m, k, w.typed_data(), n, transposed, nullptr,
                      y->typed_data());
  return ffi::Error::Success();
}

ffi::Error WeightMatmulS8(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> w,
                          ffi::Buffer<ffi::F32> scale, ffi::ResultBuffer<ffi::F32> y,
                          bool transposed) {
  int64_t m, k, n;
  if (ffi::Error e = CheckShapes(x, w, transposed, m, k, n); e.failure()) return e;
  if (scale.element_count() != static_cast<size_t>(n))
    return ffi::Error::InvalidArgument("weight_matmul: scale must have one value per column");
  WeightMatmul<int8_t>(pool, x.typed_data(), m, k, w.typed_data(), n, transposed,
                       scale.typed_data(), y->typed_data());
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GptjaxWeightMatmulF32, WeightMatmulF32,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("transposed"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(GptjaxWeightMatmulS8, WeightMatmulS8,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("transposed"));
