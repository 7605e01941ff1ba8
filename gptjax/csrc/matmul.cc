// Large float32 matrix products for XLA:CPU, as an XLA FFI custom call (gptjax/cpu_kernels.py).
//
// C = op(A) @ op(B) for row-major 2-D A, B, C, where op transposes when asked, so a Dense
// layer's forward (X W), input gradient (G W^T) and weight gradient (X^T G) all read their
// operands in place. Blocked in the usual way (Goto and van de Geijn, 2008): C is cut into about
// two units of work per thread, shared out over XLA's intra-op threads. A unit packs B into
// strips of 32 columns, kBlock deep (kChunkStrips at a time, kept in L2), and A into panels of
// 12 rows (kChunkPanels at a time); each strip then stays in L1 while the panels stream past it
// through a 12 x 32 register tile (24 accumulators).
//
// AVX-512 only: GptjaxMatmulSupported() tells the Python side whether to use it.

#include <cmath>

#include "gemm.h"

namespace ffi = xla::ffi;

namespace {

using gptjax::View;

constexpr int kRows = 12;             // register tile rows
constexpr int kCols = 32;             // register tile columns (two 16-float vectors)
constexpr int64_t kBlock = 768;       // depth of a packed block (K)
constexpr int64_t kChunkPanels = 24;  // A panels packed at a time (kChunkPanels * 12 rows)
constexpr int64_t kChunkStrips = 16;  // B strips packed at a time (kChunkStrips * 32 columns)

#if defined(__x86_64__)
inline __mmask16 Mask16(int64_t n) {
  return n >= 16 ? 0xFFFF : n <= 0 ? 0 : static_cast<__mmask16>((1u << n) - 1);
}

// c[r, :cols] (+)= sum_k a_panel[k, r] b_strip[k, :] for r < rows.
__attribute__((target("avx512f,fma"))) void Tile(int64_t depth, const float* a_panel,
                                                 const float* b_strip, float* c, int64_t ldc,
                                                 bool accumulate, int rows, int64_t cols) {
  __m512 lo[kRows], hi[kRows];
  for (int r = 0; r < kRows; ++r) lo[r] = hi[r] = _mm512_setzero_ps();
  for (int64_t kk = 0; kk < depth; ++kk) {
    const __m512 b0 = _mm512_load_ps(b_strip + kk * kCols);
    const __m512 b1 = _mm512_load_ps(b_strip + kk * kCols + 16);
#pragma GCC unroll 12
    for (int r = 0; r < kRows; ++r) {
      const __m512 av = _mm512_set1_ps(a_panel[kk * kRows + r]);
      lo[r] = _mm512_fmadd_ps(av, b0, lo[r]);
      hi[r] = _mm512_fmadd_ps(av, b1, hi[r]);
    }
  }
  const __mmask16 m0 = Mask16(cols), m1 = Mask16(cols - 16);
  for (int r = 0; r < rows; ++r) {
    float* cr = c + r * ldc;
    if (accumulate) {
      lo[r] = _mm512_add_ps(lo[r], _mm512_maskz_loadu_ps(m0, cr));
      hi[r] = _mm512_add_ps(hi[r], _mm512_maskz_loadu_ps(m1, cr + 16));
    }
    _mm512_mask_storeu_ps(cr, m0, lo[r]);
    _mm512_mask_storeu_ps(cr + 16, m1, hi[r]);
  }
}

// dst[kk * kRows + r] = A(r0 + r, p0 + kk) for kk < depth, zero for r >= rows.
__attribute__((target("avx512f"))) void PackPanel(View a, int64_t r0, int rows, int64_t p0,
                                                  int64_t depth, float* dst) {
  if (a.sk == 1) {  // rows of A are contiguous: transpose 16 x 16 blocks in registers
    const __m512 zero = _mm512_setzero_ps();
    for (int64_t k0 = 0; k0 < depth; k0 += 16) {
      const __mmask16 km = Mask16(depth - k0);
      __m512 v[16];
      for (int r = 0; r < 16; ++r)
        v[r] = r < rows ? _mm512_maskz_loadu_ps(km, a.data + (r0 + r) * a.si + p0 + k0) : zero;
      gptjax::Transpose16Regs(v);
      const int64_t n = std::min<int64_t>(16, depth - k0);
      for (int64_t t = 0; t < n; ++t)
        _mm512_mask_storeu_ps(dst + (k0 + t) * kRows, 0x0FFF, v[t]);
    }
    return;
  }
  if (a.si == 1) {  // columns of A are contiguous: one masked copy per k
    const __mmask16 rm = Mask16(rows);
    for (int64_t kk = 0; kk < depth; ++kk)
      _mm512_mask_storeu_ps(dst + kk * kRows, 0x0FFF,
                            _mm512_maskz_loadu_ps(rm, a.data + (p0 + kk) * a.sk + r0));
    return;
  }
  for (int64_t kk = 0; kk < depth; ++kk)
    for (int r = 0; r < kRows; ++r)
      dst[kk * kRows + r] = r < rows ? a.data[(r0 + r) * a.si + (p0 + kk) * a.sk] : 0.0f;
}

// dst[kk * kCols + j] = B(p0 + kk, j0 + j) for kk < depth, zero for j >= cols.
__attribute__((target("avx512f"))) void PackStrip(View b, int64_t p0, int64_t depth, int64_t j0,
                                                  int64_t cols, float* dst) {
  if (b.sk == 1) {  // rows of B are contiguous
    const __mmask16 m0 = Mask16(cols), m1 = Mask16(cols - 16);
    for (int64_t kk = 0; kk < depth; ++kk) {
      const float* src = b.data + (p0 + kk) * b.si + j0;
      _mm512_store_ps(dst + kk * kCols, _mm512_maskz_loadu_ps(m0, src));
      _mm512_store_ps(dst + kk * kCols + 16, _mm512_maskz_loadu_ps(m1, src + 16));
    }
    return;
  }
  if (b.si == 1) {  // columns of B are contiguous: 16 x 16 transposes
    for (int64_t h = 0; h < 2; ++h) {
      const int64_t valid = std::min<int64_t>(16, cols - 16 * h);
      for (int64_t k0 = 0; k0 < depth; k0 += 16) {
        const __mmask16 km = Mask16(depth - k0);
        __m512 v[16];
        for (int j = 0; j < 16; ++j)
          v[j] = j < valid ? _mm512_maskz_loadu_ps(km, b.data + (j0 + 16 * h + j) * b.sk + p0 + k0)
                           : _mm512_setzero_ps();
        gptjax::Transpose16Regs(v);
        const int64_t n = std::min<int64_t>(16, depth - k0);
        for (int64_t t = 0; t < n; ++t) _mm512_store_ps(dst + (k0 + t) * kCols + 16 * h, v[t]);
      }
    }
    return;
  }
  for (int64_t kk = 0; kk < depth; ++kk)
    for (int64_t j = 0; j < kCols; ++j)
      dst[kk * kCols + j] = j < cols ? b.data[(p0 + kk) * b.si + (j0 + j) * b.sk] : 0.0f;
}

float* Aligned(std::vector<float>& buf, int64_t floats) {
  buf.resize(floats + 16);
  return reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(buf.data()) + 63) & ~uintptr_t{63});
}

// One packed chunk of A (panels q0..q1) against one of B (strips s0..s1), depth d from p0.
void MultiplyChunks(int64_t m, int64_t n, const float* a_packed, int64_t q0, int64_t q1,
                    const float* b_packed, int64_t s0, int64_t s1, int64_t d, bool accumulate,
                    float* c) {
  for (int64_t s = s0; s < s1; ++s) {
    const float* strip = b_packed + (s - s0) * kCols * d;
    const int64_t cols = std::min<int64_t>(kCols, n - s * kCols);
    for (int64_t q = q0; q < q1; ++q)
      Tile(d, a_packed + (q - q0) * kRows * d, strip, c + q * kRows * n + s * kCols, n,
           accumulate, static_cast<int>(std::min<int64_t>(kRows, m - q * kRows)), cols);
  }
}

// C[rows, cols] of one unit of work, kBlock deep at a time. Chunks of A (kChunkPanels panels)
// and B (kChunkStrips strips) are packed to stay in L2 together; whichever operand would be
// packed again more often goes in the outer loop, so that it is packed only once.
void MatmulUnit(int64_t m, int64_t n, int64_t k, View a, View b, float* c, int64_t panel0,
                int64_t panel1, int64_t strip0, int64_t strip1) {
  thread_local std::vector<float> a_buf, b_buf;
  float* a_packed = Aligned(a_buf, kChunkPanels * kRows * kBlock);
  float* b_packed = Aligned(b_buf, kChunkStrips * kCols * kBlock);
  const int64_t a_size = (panel1 - panel0) * kRows, b_size = (strip1 - strip0) * kCols;
  const int64_t a_chunks = (panel1 - panel0 + kChunkPanels - 1) / kChunkPanels;
  const int64_t b_chunks = (strip1 - strip0 + kChunkStrips - 1) / kChunkStrips;
  const bool a_outer = a_size + a_chunks * b_size <= b_size + b_chunks * a_size;
  auto pack_a = [&](int64_t q0, int64_t q1, int64_t p0, int64_t d) {
    for (int64_t q = q0; q < q1; ++q)
      PackPanel(a, q * kRows, static_cast<int>(std::min<int64_t>(kRows, m - q * kRows)), p0, d,
                a_packed + (q - q0) * kRows * d);
  };
  auto pack_b = [&](int64_t s0, int64_t s1, int64_t p0, int64_t d) {
    for (int64_t s = s0; s < s1; ++s)
      PackStrip(b, p0, d, s * kCols, std::min<int64_t>(kCols, n - s * kCols),
                b_packed + (s - s0) * kCols * d);
  };
  const int64_t outer0 = a_outer ? panel0 : strip0, outer1 = a_outer ? panel1 : strip1;
  const int64_t inner0 = a_outer ? strip0 : panel0, inner1 = a_outer ? strip1 : panel1;
  const int64_t outer_step = a_outer ? kChunkPanels : kChunkStrips;
  const int64_t inner_step = a_outer ? kChunkStrips : kChunkPanels;
  for (int64_t o0 = outer0; o0 < outer1; o0 += outer_step) {
    const int64_t o1 = std::min(outer1, o0 + outer_step);
    for (int64_t p0 = 0; p0 < k; p0 += kBlock) {
      const int64_t d = std::min(kBlock, k - p0);
      a_outer ? pack_a(o0, o1, p0, d) : pack_b(o0, o1, p0, d);
      for (int64_t i0 = inner0; i0 < inner1; i0 += inner_step) {
        const int64_t i1 = std::min(inner1, i0 + inner_step);
        a_outer ? pack_b(i0, i1, p0, d) : pack_a(i0, i1, p0, d);
        if (a_outer)
          MultiplyChunks(m, n, a_packed, o0, o1, b_packed, i0, i1, d, p0 > 0, c);
        else
          MultiplyChunks(m, n, a_packed, i0, i1, b_packed, o0, o1, d, p0 > 0, c);
      }
    }
  }
}

void Matmul(ffi::ThreadPool& pool, int64_t m, int64_t n, int64_t k, View a, View b, float* c) {
  // About 4 units per thread, as near square as the shape allows: each unit packs its own rows
  // of A and columns of B, so row parts x column parts sets how often each is packed again.
  const int64_t panels = (m + kRows - 1) / kRows, strips = (n + kCols - 1) / kCols;
  const int64_t units = 2 * std::max<int64_t>(1, pool.num_threads());
  const double ideal = std::sqrt(static_cast<double>(units) * m / n);
  int64_t row_parts = 1;  // the divisor of `units` nearest `ideal`, so that no thread idles
  for (int64_t r = 1; r <= units; ++r)
    if (units % r == 0 && std::abs(std::log(r / ideal)) < std::abs(std::log(row_parts / ideal)))
      row_parts = r;
  row_parts = std::min(row_parts, panels);
  const int64_t col_parts = std::min(units / row_parts, strips);
  const int64_t panels_per = (panels + row_parts - 1) / row_parts;
  const int64_t strips_per = (strips + col_parts - 1) / col_parts;
  gptjax::ParallelFor(pool, row_parts * col_parts, [&](int64_t unit) {
    const int64_t pa = unit / col_parts * panels_per, sa = unit % col_parts * strips_per;
    if (pa < panels && sa < strips)
      MatmulUnit(m, n, k, a, b, c, pa, std::min(panels, pa + panels_per), sa,
                 std::min(strips, sa + strips_per));
  });
}
#endif

ffi::Error MatmulHandler(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                         ffi::ResultBuffer<ffi::F32> c, bool a_trans, bool b_trans) {
  const auto da = a.dimensions(), db = b.dimensions(), dc = c->dimensions();
  if (da.size() != 2 || db.size() != 2 || dc.size() != 2)
    return ffi::Error::InvalidArgument("matmul: operands and result must be rank 2");
  const int64_t m = a_trans ? da[1] : da[0], k = a_trans ? da[0] : da[1];
  const int64_t kb = b_trans ? db[1] : db[0], n = b_trans ? db[0] : db[1];
  if (k != kb || dc[0] != m || dc[1] != n)
    return ffi::Error::InvalidArgument("matmul: operand shapes do not match");
  if (m == 0 || n == 0) return ffi::Error::Success();
  float* c_data = c->typed_data();
  if (k == 0) {
    std::fill(c_data, c_data + m * n, 0.0f);
    return ffi::Error::Success();
  }
#if defined(__x86_64__)
  if (gptjax::HasAvx512()) {
    const View av = a_trans ? View{a.typed_data(), 1, da[1]} : View{a.typed_data(), da[1], 1};
    const View bv = b_trans ? View{b.typed_data(), 1, db[1]} : View{b.typed_data(), db[1], 1};
    Matmul(pool, m, n, k, av, bv, c_data);
    return ffi::Error::Success();
  }
#endif
  return ffi::Error::Internal("matmul: needs AVX-512 (check GptjaxMatmulSupported first)");
}

}  // namespace

extern "C" bool GptjaxMatmulSupported() { return gptjax::HasAvx512(); }

XLA_FFI_DEFINE_HANDLER_SYMBOL(GptjaxMatmul, MatmulHandler,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("a_trans")
                                  .Attr<bool>("b_trans"));
