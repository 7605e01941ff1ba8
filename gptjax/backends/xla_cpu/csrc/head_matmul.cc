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

#include "gemm.h"

namespace ffi = xla::ffi;

namespace {

using gptjax::HeadLayout;
using gptjax::View;

ffi::Error HeadMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                      ffi::ResultBuffer<ffi::F32> c, bool a_heads_major, bool a_trans,
                      bool b_heads_major, bool b_trans, bool c_heads_major) {
  if (a.dimensions().size() != 4 || b.dimensions().size() != 4 || c->dimensions().size() != 4)
    return ffi::Error::InvalidArgument("head_matmul: operands and result must be rank 4");
  const HeadLayout la = gptjax::HeadLayoutOf(a.dimensions(), a_heads_major);
  const HeadLayout lb = gptjax::HeadLayoutOf(b.dimensions(), b_heads_major);
  const HeadLayout lc = gptjax::HeadLayoutOf(c->dimensions(), c_heads_major);
  const int64_t m = a_trans ? la.q : la.p, k = a_trans ? la.p : la.q;
  const int64_t kb = b_trans ? lb.q : lb.p, n = b_trans ? lb.p : lb.q;
  if (k != kb || lc.p != m || lc.q != n || la.batch != lb.batch || la.batch != lc.batch ||
      la.heads != lb.heads || la.heads != lc.heads)
    return ffi::Error::InvalidArgument("head_matmul: operand shapes do not match");
  if (m == 0 || n == 0) return ffi::Error::Success();

  const float* a_data = a.typed_data();
  const float* b_data = b.typed_data();
  float* c_data = c->typed_data();
  const int64_t a_si = a_trans ? 1 : la.sp, a_sk = a_trans ? la.sp : 1;
  const int64_t b_sk = b_trans ? 1 : lb.sp, b_sj = b_trans ? lb.sp : 1;
  const int64_t groups = la.batch * la.heads;
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  // Split the rows too when there are few (batch, head) matrices to share out.
  const int64_t m_chunk =
      groups >= 4 * threads ? m : std::max<int64_t>(gptjax::kMr, gptjax::RoundUp((m + 3) / 4, 8));
  const int64_t chunks = (m + m_chunk - 1) / m_chunk;
  gptjax::ParallelFor(pool, groups * chunks, [&](int64_t unit) {
    thread_local std::vector<float> panel;
    const int64_t g = unit / chunks, row0 = (unit % chunks) * m_chunk;
    const int64_t bi = g / la.heads, hi = g % la.heads;
    const View av{a_data + bi * la.sb + hi * la.sh + row0 * a_si, a_si, a_sk};
    const View bv{b_data + bi * lb.sb + hi * lb.sh, b_sk, b_sj};
    gptjax::Gemm(std::min(m_chunk, m - row0), n, k, av, bv,
                 c_data + bi * lc.sb + hi * lc.sh + row0 * lc.sp, lc.sp, panel);
  });
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
