// Small float32 matrix products and parallel loops on XLA's intra-op pool, shared by the
// gptjax XLA:CPU custom calls (gptjax/csrc/*.cc). Header-only; x86-64 AVX-512 code
// paths are chosen at run time, with portable loops elsewhere.

#ifndef GPTJAX_CSRC_GEMM_H_
#define GPTJAX_CSRC_GEMM_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace gptjax {

// A strided matrix: element (i, k) at data[i * si + k * sk].
struct View {
  const float* data;
  int64_t si, sk;
};

constexpr int kMr = 8;   // rows of the register tile
constexpr int kNr = 32;  // columns of the register tile (two 16-float vectors)

inline int64_t RoundUp(int64_t x, int64_t to) { return (x + to - 1) / to * to; }

#if defined(__x86_64__)
inline bool HasAvx512() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma");
  return has;
}

// dst[t * dst_stride + u] = src[u * src_stride + t] for a 16 x 16 block.
__attribute__((target("avx512f"))) inline void Transpose16(const float* src, int64_t src_stride,
                                                           float* dst, int64_t dst_stride) {
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * src_stride);
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    for (int j = 0; j < 2; ++j) {
      const __m512d x = _mm512_castps_pd(t[i + j]), y = _mm512_castps_pd(t[i + j + 2]);
      r[i + 2 * j] = _mm512_castpd_ps(_mm512_unpacklo_pd(x, y));
      r[i + 2 * j + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(x, y));
    }
  }
  // Each 128-bit lane of r[4g + c] holds one column's values from rows 4g..4g+3; the lane
  // shuffles gather the four lanes of each column.
  for (int g = 0; g < 16; g += 8) {
    for (int c = 0; c < 4; ++c) {
      t[g + c] = _mm512_shuffle_f32x4(r[g + c], r[g + c + 4], 0x88);
      t[g + c + 4] = _mm512_shuffle_f32x4(r[g + c], r[g + c + 4], 0xdd);
    }
  }
  for (int c = 0; c < 8; ++c) {
    r[c] = _mm512_shuffle_f32x4(t[c], t[c + 8], 0x88);
    r[c + 8] = _mm512_shuffle_f32x4(t[c], t[c + 8], 0xdd);
  }
  for (int i = 0; i < 16; ++i) _mm512_storeu_ps(dst + i * dst_stride, r[i]);
}

template <int R>
__attribute__((target("avx512f,fma"))) void TileAvx512(const View& a, const float* panel,
                                                       int64_t n_pad, int64_t k, float* c,
                                                       int64_t c_si, int64_t cols) {
  __m512 lo[R], hi[R];
  for (int r = 0; r < R; ++r) {
    lo[r] = _mm512_setzero_ps();
    hi[r] = _mm512_setzero_ps();
  }
  for (int64_t kk = 0; kk < k; ++kk) {
    const __m512 b0 = _mm512_loadu_ps(panel + kk * n_pad);
    const __m512 b1 = _mm512_loadu_ps(panel + kk * n_pad + 16);
    const float* acol = a.data + kk * a.sk;
    for (int r = 0; r < R; ++r) {
      const __m512 av = _mm512_set1_ps(acol[r * a.si]);
      lo[r] = _mm512_fmadd_ps(av, b0, lo[r]);
      hi[r] = _mm512_fmadd_ps(av, b1, hi[r]);
    }
  }
  const __mmask16 m_lo = cols >= 16 ? 0xFFFF : (__mmask16)((1u << cols) - 1);
  const __mmask16 m_hi =
      cols >= 32 ? 0xFFFF : cols <= 16 ? 0 : (__mmask16)((1u << (cols - 16)) - 1);
  for (int r = 0; r < R; ++r) {
    _mm512_mask_storeu_ps(c + r * c_si, m_lo, lo[r]);
    _mm512_mask_storeu_ps(c + r * c_si + 16, m_hi, hi[r]);
  }
}

using TileFn = void (*)(const View&, const float*, int64_t, int64_t, float*, int64_t, int64_t);
inline constexpr TileFn kAvx512Tiles[kMr + 1] = {
    nullptr,       TileAvx512<1>, TileAvx512<2>, TileAvx512<3>, TileAvx512<4>,
    TileAvx512<5>, TileAvx512<6>, TileAvx512<7>, TileAvx512<8>};
#else
inline bool HasAvx512() { return false; }
#endif

inline void TileGeneric(const View& a, const float* panel, int64_t n_pad, int64_t k, float* c,
                        int64_t c_si, int64_t rows, int64_t cols) {
  float acc[kMr][kNr];
  for (int r = 0; r < rows; ++r)
    for (int j = 0; j < kNr; ++j) acc[r][j] = 0.0f;
  for (int64_t kk = 0; kk < k; ++kk) {
    const float* brow = panel + kk * n_pad;
    for (int r = 0; r < rows; ++r) {
      const float av = a.data[r * a.si + kk * a.sk];
      for (int j = 0; j < kNr; ++j) acc[r][j] += av * brow[j];
    }
  }
  for (int r = 0; r < rows; ++r)
    for (int j = 0; j < cols; ++j) c[r * c_si + j] = acc[r][j];
}

// Copies B (k x n, element (kk, j) at b.data[kk * b.si + j * b.sk]) into a row-major
// [k, n_pad] panel, n_pad = RoundUp(n, kNr), zero-padded. Returns n_pad.
inline int64_t PackB(View b, int64_t k, int64_t n, std::vector<float>& panel_buf) {
  const int64_t n_pad = RoundUp(n, kNr);
  panel_buf.resize(k * n_pad);
  float* panel = panel_buf.data();
  if (b.sk == 1) {
    for (int64_t kk = 0; kk < k; ++kk) {
      std::memcpy(panel + kk * n_pad, b.data + kk * b.si, n * sizeof(float));
      std::fill(panel + kk * n_pad + n, panel + (kk + 1) * n_pad, 0.0f);
    }
    return n_pad;
  }
  // Transposed source (b.si == 1): column j of B is contiguous.
  int64_t j16 = 0, k16 = 0;
#if defined(__x86_64__)
  if (HasAvx512()) {
    j16 = n / 16 * 16;
    k16 = k / 16 * 16;
    for (int64_t j = 0; j < j16; j += 16)
      for (int64_t kk = 0; kk < k16; kk += 16)
        Transpose16(b.data + j * b.sk + kk * b.si, b.sk, panel + kk * n_pad + j, n_pad);
  }
#endif
  for (int64_t kk = 0; kk < k; ++kk) {
    float* row = panel + kk * n_pad;
    for (int64_t j = (kk < k16 ? j16 : 0); j < n; ++j) row[j] = b.data[kk * b.si + j * b.sk];
    std::fill(row + n, row + n_pad, 0.0f);
  }
  return n_pad;
}

// A transposed view (column i contiguous) copied to rows; the row stride is padded off a
// multiple of 4 KiB so that the register tile's rows do not share L1 sets.
inline View PackRows(View a, int64_t m, int64_t k, std::vector<float>& buf) {
  const int64_t stride = RoundUp(k, 16) + 16;
  buf.resize(RoundUp(m, 16) * stride);
  float* dst = buf.data();
  int64_t m16 = 0, k16 = 0;
#if defined(__x86_64__)
  if (HasAvx512()) {
    m16 = m / 16 * 16;
    k16 = k / 16 * 16;
    for (int64_t i = 0; i < m16; i += 16)
      for (int64_t kk = 0; kk < k16; kk += 16)
        Transpose16(a.data + kk * a.sk + i, a.sk, dst + i * stride + kk, stride);
  }
#endif
  for (int64_t i = 0; i < m; ++i)
    for (int64_t kk = (i < m16 ? k16 : 0); kk < k; ++kk)
      dst[i * stride + kk] = a.data[i + kk * a.sk];
  return View{dst, stride, 1};
}

// C (m x n, row stride c_si) = A (m x k) @ panel (k x n, packed by PackB).
inline void GemmPacked(int64_t m, int64_t n, int64_t k, View a, const float* panel,
                       int64_t n_pad, float* c, int64_t c_si) {
  thread_local std::vector<float> a_rows;
  // A transposed (one row per column of memory) would stride its loads by a whole row per k.
  if (a.si == 1 && a.sk > 1 && m > 1 && n > kNr) a = PackRows(a, m, k, a_rows);
  const bool avx512 = HasAvx512();
  for (int64_t j0 = 0; j0 < n; j0 += kNr) {
    const int64_t cols = std::min<int64_t>(kNr, n - j0);
    for (int64_t i0 = 0; i0 < m; i0 += kMr) {
      const int r = static_cast<int>(std::min<int64_t>(kMr, m - i0));
      const View tile{a.data + i0 * a.si, a.si, a.sk};
      float* c_tile = c + i0 * c_si + j0;
#if defined(__x86_64__)
      if (avx512) {
        kAvx512Tiles[r](tile, panel + j0, n_pad, k, c_tile, c_si, cols);
        continue;
      }
#endif
      TileGeneric(tile, panel + j0, n_pad, k, c_tile, c_si, r, cols);
    }
  }
}

// C = A @ B for strided A (m x k) and B (k x n); `panel` is scratch.
inline void Gemm(int64_t m, int64_t n, int64_t k, View a, View b, float* c, int64_t c_si,
                 std::vector<float>& panel) {
  if (k == 0) {
    for (int64_t i = 0; i < m; ++i) std::fill(c + i * c_si, c + i * c_si + n, 0.0f);
    return;
  }
  const int64_t n_pad = PackB(b, k, n, panel);
  GemmPacked(m, n, k, a, panel.data(), n_pad, c, c_si);
}

// Runs fn(0 .. units-1) on the calling thread and on helper tasks of XLA's intra-op pool.
// Units are claimed from a shared counter and the caller waits only for units already claimed,
// so a helper that starts late (or never, while the pool is busy) cannot deadlock the call.
inline void ParallelFor(xla::ffi::ThreadPool& pool, int64_t units,
                        std::function<void(int64_t)> fn) {
  struct State {
    std::atomic<int64_t> next{0}, done{0};
    int64_t units;
    std::function<void(int64_t)> fn;
  };
  auto state = std::make_shared<State>();
  state->units = units;
  state->fn = std::move(fn);
  auto drain = [state] {
    for (int64_t u = state->next.fetch_add(1); u < state->units; u = state->next.fetch_add(1)) {
      state->fn(u);
      state->done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t helpers = std::min<int64_t>(std::max<int64_t>(1, pool.num_threads()), units) - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([drain] { drain(); });
  drain();
  while (state->done.load(std::memory_order_acquire) < units) std::this_thread::yield();
}

// Runs fn(i) for the rows i in [0, n), in blocks of `block` rows shared out by ParallelFor.
inline void ParallelRows(xla::ffi::ThreadPool& pool, int64_t n, int64_t block,
                         const std::function<void(int64_t)>& fn) {
  ParallelFor(pool, (n + block - 1) / block, [&](int64_t b) {
    for (int64_t i = b * block; i < std::min(n, (b + 1) * block); ++i) fn(i);
  });
}

// ParallelRows whose fn(i, sums) also adds into `width` floats of its block's own. Returns the
// blocks' sums added in block order: the bits do not depend on which thread ran which block.
inline std::vector<float> ParallelRowsWithSums(
    xla::ffi::ThreadPool& pool, int64_t n, int64_t block, int64_t width,
    const std::function<void(int64_t, float*)>& fn) {
  const int64_t blocks = (n + block - 1) / block;
  std::vector<float> partial(blocks * width, 0.0f), total(width, 0.0f);
  ParallelFor(pool, blocks, [&](int64_t b) {
    for (int64_t i = b * block; i < std::min(n, (b + 1) * block); ++i)
      fn(i, partial.data() + b * width);
  });
  for (int64_t b = 0; b < blocks; ++b)
    for (int64_t j = 0; j < width; ++j) total[j] += partial[b * width + j];
  return total;
}

// (P, Q) and strides of a rank-4 row-major array [B, P, H, Q] ("token-major") or [B, H, P, Q].
struct HeadLayout {
  int64_t batch, heads, p, q, sb, sh, sp;
};

inline HeadLayout HeadLayoutOf(xla::ffi::Span<const int64_t> d, bool heads_major) {
  if (heads_major) return {d[0], d[1], d[2], d[3], d[1] * d[2] * d[3], d[2] * d[3], d[3]};
  return {d[0], d[2], d[1], d[3], d[1] * d[2] * d[3], d[3], d[2] * d[3]};
}

}  // namespace gptjax

#endif  // GPTJAX_CSRC_GEMM_H_
