// The log-partition of a token cross-entropy for XLA:CPU, forward and backward, as XLA FFI custom
// calls (gptjax/cpu_kernels.py). XLA:CPU takes the row max, writes exp(logits - max) out, sums it
// and multiplies it again in the backward: five passes over the [N, V] logits. Here the forward
// reads each row once (it stays in cache for its three sweeps) and the backward reads and writes
// it once, recomputing the exponentials.
//
// logits, dlogits: [N, V] float32; targets: [N] int32; log_z, target_logit, row_max,
// g_log_z, g_target: [N] float32.
//   row_max = max_v logits, log_z = row_max + log(sum_v exp(logits - row_max)),
//   target_logit = logits[target] (a negative target counts from the end, as in
//   jnp.take_along_axis; one outside [-V, V) gives NaN, as its "fill" mode does)
//   dlogits = g_log_z * exp(logits - log_z) + g_target * onehot(target)

#include <cmath>
#include <limits>

#include "gemm.h"
#include "vector_math.h"

namespace ffi = xla::ffi;

namespace {

#if defined(__x86_64__)
using gptjax::Exp512;
using gptjax::TailMask;

__attribute__((target("avx512f,fma"))) void RowLogZAvx512(const float* x, int64_t v, float& mx,
                                                          float& log_z) {
  __m512 vmax = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t j = 0; j < v; j += 16)
    vmax = _mm512_mask_max_ps(vmax, TailMask(v - j), vmax, _mm512_maskz_loadu_ps(TailMask(v - j), x + j));
  mx = _mm512_reduce_max_ps(vmax);
  const __m512 vmx = _mm512_set1_ps(mx);
  __m512 sum = _mm512_setzero_ps();
  for (int64_t j = 0; j < v; j += 16) {
    const __mmask16 m = TailMask(v - j);
    sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(m, Exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, x + j), vmx))));
  }
  log_z = mx + std::log(_mm512_reduce_add_ps(sum));
}

__attribute__((target("avx512f,fma"))) void RowGradAvx512(const float* x, float* dx, int64_t v,
                                                          float log_z, float g) {
  const __m512 vlz = _mm512_set1_ps(log_z), vg = _mm512_set1_ps(g);
  for (int64_t j = 0; j < v; j += 16) {
    const __mmask16 m = TailMask(v - j);
    const __m512 p = Exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, x + j), vlz));
    _mm512_mask_storeu_ps(dx + j, m, _mm512_mul_ps(vg, p));
  }
}
#endif

void RowLogZ(const float* x, int64_t v, float& mx, float& log_z) {
#if defined(__x86_64__)
  if (gptjax::HasAvx512()) return RowLogZAvx512(x, v, mx, log_z);
#endif
  mx = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < v; ++j) mx = std::max(mx, x[j]);
  float sum = 0.0f;
  for (int64_t j = 0; j < v; ++j) sum += std::exp(x[j] - mx);
  log_z = mx + std::log(sum);
}

void RowGrad(const float* x, float* dx, int64_t v, float log_z, float g) {
#if defined(__x86_64__)
  if (gptjax::HasAvx512()) return RowGradAvx512(x, dx, v, log_z, g);
#endif
  for (int64_t j = 0; j < v; ++j) dx[j] = g * std::exp(x[j] - log_z);
}

// The column of `target` in a row of v, or -1 where jnp.take_along_axis would fill.
int64_t TargetColumn(int32_t target, int64_t v) {
  const int64_t t = target < 0 ? target + v : target;
  return t >= 0 && t < v ? t : -1;
}

constexpr int64_t kRowsPerUnit = 8;

ffi::Error CheckShapes(const ffi::Buffer<ffi::F32>& logits, const ffi::Buffer<ffi::S32>& targets,
                       int64_t& n, int64_t& v) {
  auto dims = logits.dimensions();
  if (dims.size() != 2) return ffi::Error::InvalidArgument("cross_entropy: logits must be [N, V]");
  n = dims[0];
  v = dims[1];
  if (targets.element_count() != static_cast<size_t>(n))
    return ffi::Error::InvalidArgument("cross_entropy: targets must be [N]");
  return ffi::Error::Success();
}

ffi::Error LogZFwd(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> logits,
                   ffi::Buffer<ffi::S32> targets, ffi::ResultBuffer<ffi::F32> log_z,
                   ffi::ResultBuffer<ffi::F32> target_logit, ffi::ResultBuffer<ffi::F32> row_max) {
  int64_t n, v;
  if (ffi::Error e = CheckShapes(logits, targets, n, v); e.failure()) return e;
  const float* xd = logits.typed_data();
  const int32_t* td = targets.typed_data();
  float *lz = log_z->typed_data(), *tl = target_logit->typed_data(), *mx = row_max->typed_data();
  gptjax::ParallelRows(pool, n, kRowsPerUnit, [&](int64_t i) {
    RowLogZ(xd + i * v, v, mx[i], lz[i]);
    const int64_t t = TargetColumn(td[i], v);
    tl[i] = t < 0 ? std::numeric_limits<float>::quiet_NaN() : xd[i * v + t];
  });
  return ffi::Error::Success();
}

ffi::Error LogZBwd(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> logits,
                   ffi::Buffer<ffi::S32> targets, ffi::Buffer<ffi::F32> log_z,
                   ffi::Buffer<ffi::F32> g_log_z, ffi::Buffer<ffi::F32> g_target,
                   ffi::ResultBuffer<ffi::F32> dlogits) {
  int64_t n, v;
  if (ffi::Error e = CheckShapes(logits, targets, n, v); e.failure()) return e;
  const float *xd = logits.typed_data(), *lz = log_z.typed_data();
  const float *glz = g_log_z.typed_data(), *gt = g_target.typed_data();
  const int32_t* td = targets.typed_data();
  float* dxd = dlogits->typed_data();
  gptjax::ParallelRows(pool, n, kRowsPerUnit, [&](int64_t i) {
    RowGrad(xd + i * v, dxd + i * v, v, lz[i], glz[i]);
    const int64_t t = TargetColumn(td[i], v);
    if (t >= 0) dxd[i * v + t] += gt[i];
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GptjaxLogZFwd, LogZFwd,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(GptjaxLogZBwd, LogZBwd,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
