// Per-head batched float32 matmul for XLA:CPU, as an XLA FFI custom call (gptjax/cpu_kernels.py).
//
// XLA:CPU runs a batched dot such as attention's `blhd,bshd->bhls` as a loop of small
// single-threaded matrix products. This kernel runs the same products on XLA's intra-op thread
// pool, reads the operands in place (heads at axis 1 or 2, either matrix orientation), and
// writes the result in the layout its consumer wants, so no transposes are needed around it.
//
// Every operand is a rank-4 row-major array [B, P, H, Q] ("token-major", heads at axis 2) or
// [B, H, P, Q] ("heads-major"); its matrix for batch b and head h is (P, Q), or (Q, P) when
// transposed. C[b, h] = A[b, h] @ B[b, h], C with layout `c_heads_major` and shape (M, N).

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace ffi = xla::ffi;

namespace {

// A matrix view: element (i, k) at data[i * si + k * sk].
struct Matrix {
  const float* data;
  int64_t si, sk;
};

struct Problem {
  const float* a;
  const float* b;
  float* c;
  int64_t batch, heads, m, n, k;
  // Offsets of the (b, h) matrix in each operand, and the operand strides.
  int64_t a_sb, a_sh, a_si, a_sk;
  int64_t b_sb, b_sh, b_sk, b_sj;
  int64_t c_sb, c_sh, c_si;
  int64_t m_chunk;  // rows per work unit
};

constexpr int kMr = 8;   // rows of the register tile
constexpr int kNr = 32;  // columns of the register tile (two 16-float vectors)

int64_t RoundUp(int64_t x, int64_t to) { return (x + to - 1) / to * to; }

// Copies B (k, j) into a row-major [K, N_pad] panel, zero-padded to whole register tiles.
void PackB(const Problem& p, const float* b, float* panel, int64_t n_pad) {
  for (int64_t kk = 0; kk < p.k; ++kk) {
    float* row = panel + kk * n_pad;
    if (p.b_sj == 1) {
      std::memcpy(row, b + kk * p.b_sk, p.n * sizeof(float));
    } else {
      for (int64_t j = 0; j < p.n; ++j) row[j] = b[kk * p.b_sk + j * p.b_sj];
    }
    std::fill(row + p.n, row + n_pad, 0.0f);
  }
}

void TileGeneric(const Matrix& a, const float* panel, int64_t n_pad, int64_t k, float* c,
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

#if defined(__x86_64__)
template <int R>
__attribute__((target("avx512f,fma"))) void TileAvx512(const Matrix& a, const float* panel,
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
  const __mmask16 m_hi = cols >= 32 ? 0xFFFF : cols <= 16 ? 0 : (__mmask16)((1u << (cols - 16)) - 1);
  for (int r = 0; r < R; ++r) {
    _mm512_mask_storeu_ps(c + r * c_si, m_lo, lo[r]);
    _mm512_mask_storeu_ps(c + r * c_si + 16, m_hi, hi[r]);
  }
}

using TileFn = void (*)(const Matrix&, const float*, int64_t, int64_t, float*, int64_t, int64_t);
constexpr TileFn kAvx512Tiles[kMr + 1] = {
    nullptr,         TileAvx512<1>, TileAvx512<2>, TileAvx512<3>, TileAvx512<4>,
    TileAvx512<5>,   TileAvx512<6>, TileAvx512<7>, TileAvx512<8>};

bool HasAvx512() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma");
  return has;
}
#else
bool HasAvx512() { return false; }
#endif

// One work unit: rows [row0, row0 + rows) of the product for one (batch, head).
void RunUnit(const Problem& p, int64_t unit, std::vector<float>& panel) {
  const int64_t chunks = (p.m + p.m_chunk - 1) / p.m_chunk;
  const int64_t g = unit / chunks;
  const int64_t row0 = (unit % chunks) * p.m_chunk;
  const int64_t rows = std::min(p.m_chunk, p.m - row0);
  const int64_t bi = g / p.heads, hi = g % p.heads;
  const int64_t n_pad = RoundUp(p.n, kNr);
  panel.resize(p.k * n_pad);
  PackB(p, p.b + bi * p.b_sb + hi * p.b_sh, panel.data(), n_pad);
  const float* a = p.a + bi * p.a_sb + hi * p.a_sh + row0 * p.a_si;
  float* c = p.c + bi * p.c_sb + hi * p.c_sh + row0 * p.c_si;
  const bool avx512 = HasAvx512();
  for (int64_t j0 = 0; j0 < p.n; j0 += kNr) {
    const int64_t cols = std::min<int64_t>(kNr, p.n - j0);
    for (int64_t i0 = 0; i0 < rows; i0 += kMr) {
      const int r = static_cast<int>(std::min<int64_t>(kMr, rows - i0));
      const Matrix tile{a + i0 * p.a_si, p.a_si, p.a_sk};
#if defined(__x86_64__)
      if (avx512) {
        kAvx512Tiles[r](tile, panel.data() + j0, n_pad, p.k, c + i0 * p.c_si + j0, p.c_si, cols);
        continue;
      }
#endif
      TileGeneric(tile, panel.data() + j0, n_pad, p.k, c + i0 * p.c_si + j0, p.c_si, r, cols);
    }
  }
}

// Work units are claimed from a shared counter by the calling thread and by helper tasks on the
// intra-op pool; the caller waits only for units already claimed, so a helper that starts late
// (or never, while the pool is busy) finds nothing left and cannot deadlock the call.
struct Work {
  Problem problem;
  int64_t units;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};

  void Drain() {
    thread_local std::vector<float> panel;
    for (int64_t u = next.fetch_add(1); u < units; u = next.fetch_add(1)) {
      RunUnit(problem, u, panel);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

// (P, Q) and strides of a rank-4 operand with heads at axis 1 or 2.
struct Layout {
  int64_t batch, heads, p, q, sb, sh, sp;
};

Layout LayoutOf(ffi::Span<const int64_t> d, bool heads_major) {
  if (heads_major) return {d[0], d[1], d[2], d[3], d[1] * d[2] * d[3], d[2] * d[3], d[3]};
  return {d[0], d[2], d[1], d[3], d[1] * d[2] * d[3], d[3], d[2] * d[3]};
}

ffi::Error HeadMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                      ffi::ResultBuffer<ffi::F32> c, bool a_heads_major, bool a_trans,
                      bool b_heads_major, bool b_trans, bool c_heads_major) {
  if (a.dimensions().size() != 4 || b.dimensions().size() != 4 || c->dimensions().size() != 4)
    return ffi::Error::InvalidArgument("head_matmul: operands and result must be rank 4");
  const Layout la = LayoutOf(a.dimensions(), a_heads_major);
  const Layout lb = LayoutOf(b.dimensions(), b_heads_major);
  const Layout lc = LayoutOf(c->dimensions(), c_heads_major);
  const int64_t m = a_trans ? la.q : la.p, k = a_trans ? la.p : la.q;
  const int64_t kb = b_trans ? lb.q : lb.p, n = b_trans ? lb.p : lb.q;
  if (k != kb || lc.p != m || lc.q != n || la.batch != lb.batch || la.batch != lc.batch ||
      la.heads != lb.heads || la.heads != lc.heads)
    return ffi::Error::InvalidArgument("head_matmul: operand shapes do not match");

  auto work = std::make_shared<Work>();
  Problem& p = work->problem;
  p.a = a.typed_data();
  p.b = b.typed_data();
  p.c = c->typed_data();
  p.batch = la.batch;
  p.heads = la.heads;
  p.m = m;
  p.n = n;
  p.k = k;
  p.a_sb = la.sb;
  p.a_sh = la.sh;
  p.a_si = a_trans ? 1 : la.sp;
  p.a_sk = a_trans ? la.sp : 1;
  p.b_sb = lb.sb;
  p.b_sh = lb.sh;
  p.b_sk = b_trans ? 1 : lb.sp;
  p.b_sj = b_trans ? lb.sp : 1;
  p.c_sb = lc.sb;
  p.c_sh = lc.sh;
  p.c_si = lc.sp;
  if (m == 0 || n == 0) return ffi::Error::Success();
  if (k == 0) {
    for (int64_t i = 0; i < c->element_count(); ++i) p.c[i] = 0.0f;
    return ffi::Error::Success();
  }

  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t groups = p.batch * p.heads;
  // Split the rows too when there are few (batch, head) matrices to share out.
  p.m_chunk = groups >= 4 * threads ? m : std::max<int64_t>(kMr, RoundUp((m + 3) / 4, kMr));
  work->units = groups * ((m + p.m_chunk - 1) / p.m_chunk);
  const int64_t helpers = std::min<int64_t>(threads, work->units) - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([work] { work->Drain(); });
  work->Drain();
  while (work->done.load(std::memory_order_acquire) < work->units) std::this_thread::yield();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GptjaxHeadMatmul, HeadMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("a_heads_major")
                                  .Attr<bool>("a_trans")
                                  .Attr<bool>("b_heads_major")
                                  .Attr<bool>("b_trans")
                                  .Attr<bool>("c_heads_major"));
