// LayerNorm and RMSNorm over the last axis for XLA:CPU, forward and backward, as XLA FFI custom
// calls (gptjax/cpu_kernels.py). One pass over the rows per direction, where XLA:CPU runs five to
// eight separate fusions (reductions and elementwise ops) per norm.
//
// x, y, dy, dx: [N, D]; scale, bias, dscale, dbias: [D]; mean, rstd: [N]; all float32.
//   LayerNorm: xhat = (x - mean) * rstd, rstd = 1 / sqrt(mean((x - mean)^2) + eps)
//   RMSNorm:   xhat = x * rstd,          rstd = 1 / sqrt(mean(x^2) + eps), mean = 0
//   y = xhat * scale (+ bias)
// Backward, with g = dy * scale:
//   dx = rstd * (g - mean(g) - xhat * mean(g * xhat))   (RMSNorm: without the mean(g) term)
//   dscale = sum over rows of dy * xhat, dbias = sum over rows of dy
// The column sums are taken per block of rows and then added in block order, so the result
// does not depend on which thread ran which block.

#include <cmath>

#include "gemm.h"
#include "vector_math.h"

namespace ffi = xla::ffi;

namespace {

#if defined(__x86_64__)
using gptjax::TailMask;
#endif

constexpr int64_t kRowsPerBlock = 64;

#if defined(__x86_64__)
// Mean and 1/sqrt(var + eps) of one row (two passes: the row stays in L1).
__attribute__((target("avx512f,fma"))) void RowStatsAvx512(const float* x, int64_t d, float eps,
                                                           bool rms, float& mean, float& rstd) {
  __m512 acc = _mm512_setzero_ps();
  if (!rms) {
    for (int64_t j = 0; j < d; j += 16)
      acc = _mm512_add_ps(acc, _mm512_maskz_loadu_ps(TailMask(d - j), x + j));
    mean = _mm512_reduce_add_ps(acc) / d;
    acc = _mm512_setzero_ps();
  } else {
    mean = 0.0f;
  }
  const __m512 vmean = _mm512_set1_ps(mean);
  for (int64_t j = 0; j < d; j += 16) {
    const __mmask16 m = TailMask(d - j);
    const __m512 c = _mm512_maskz_sub_ps(m, _mm512_maskz_loadu_ps(m, x + j), vmean);
    acc = _mm512_fmadd_ps(c, c, acc);
  }
  rstd = 1.0f / std::sqrt(_mm512_reduce_add_ps(acc) / d + eps);
}

__attribute__((target("avx512f,fma"))) void NormRowFwdAvx512(const float* x, const float* scale,
                                                             const float* bias, float* y,
                                                             int64_t d, float mean, float rstd) {
  const __m512 vmean = _mm512_set1_ps(mean), vrstd = _mm512_set1_ps(rstd);
  for (int64_t j = 0; j < d; j += 16) {
    const __mmask16 m = TailMask(d - j);
    const __m512 xhat = _mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, x + j), vmean), vrstd);
    __m512 out = _mm512_mul_ps(xhat, _mm512_maskz_loadu_ps(m, scale + j));
    if (bias != nullptr) out = _mm512_add_ps(out, _mm512_maskz_loadu_ps(m, bias + j));
    _mm512_mask_storeu_ps(y + j, m, out);
  }
}

__attribute__((target("avx512f,fma"))) void NormRowBwdAvx512(
    const float* x, const float* dy, const float* scale, float* dx, float* dscale, float* dbias,
    int64_t d, float mean, float rstd, bool rms) {
  const __m512 vmean = _mm512_set1_ps(mean), vrstd = _mm512_set1_ps(rstd);
  __m512 sum_g = _mm512_setzero_ps(), sum_gx = _mm512_setzero_ps();
  for (int64_t j = 0; j < d; j += 16) {
    const __mmask16 m = TailMask(d - j);
    const __m512 xhat = _mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, x + j), vmean), vrstd);
    const __m512 vdy = _mm512_maskz_loadu_ps(m, dy + j);
    const __m512 g = _mm512_mul_ps(vdy, _mm512_maskz_loadu_ps(m, scale + j));
    sum_g = _mm512_add_ps(sum_g, g);
    sum_gx = _mm512_fmadd_ps(g, xhat, sum_gx);
    _mm512_mask_storeu_ps(dscale + j, m, _mm512_fmadd_ps(vdy, xhat, _mm512_maskz_loadu_ps(m, dscale + j)));
    _mm512_mask_storeu_ps(dbias + j, m, _mm512_add_ps(vdy, _mm512_maskz_loadu_ps(m, dbias + j)));
  }
  const __m512 a = _mm512_set1_ps(rms ? 0.0f : _mm512_reduce_add_ps(sum_g) / d);
  const __m512 b = _mm512_set1_ps(_mm512_reduce_add_ps(sum_gx) / d);
  for (int64_t j = 0; j < d; j += 16) {
    const __mmask16 m = TailMask(d - j);
    const __m512 xhat = _mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, x + j), vmean), vrstd);
    const __m512 g = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, dy + j), _mm512_maskz_loadu_ps(m, scale + j));
    const __m512 out = _mm512_mul_ps(vrstd, _mm512_fnmadd_ps(xhat, b, _mm512_sub_ps(g, a)));
    _mm512_mask_storeu_ps(dx + j, m, out);
  }
}
#endif

void RowStats(const float* x, int64_t d, float eps, bool rms, float& mean, float& rstd) {
#if defined(__x86_64__)
  if (gptjax::HasAvx512()) return RowStatsAvx512(x, d, eps, rms, mean, rstd);
#endif
  float sum = 0.0f;
  for (int64_t j = 0; !rms && j < d; ++j) sum += x[j];
  mean = rms ? 0.0f : sum / d;
  float sq = 0.0f;
  for (int64_t j = 0; j < d; ++j) sq += (x[j] - mean) * (x[j] - mean);
  rstd = 1.0f / std::sqrt(sq / d + eps);
}

void NormRowFwd(const float* x, const float* scale, const float* bias, float* y, int64_t d,
                float mean, float rstd) {
#if defined(__x86_64__)
  if (gptjax::HasAvx512()) return NormRowFwdAvx512(x, scale, bias, y, d, mean, rstd);
#endif
  for (int64_t j = 0; j < d; ++j)
    y[j] = (x[j] - mean) * rstd * scale[j] + (bias != nullptr ? bias[j] : 0.0f);
}

void NormRowBwd(const float* x, const float* dy, const float* scale, float* dx, float* dscale,
                float* dbias, int64_t d, float mean, float rstd, bool rms) {
#if defined(__x86_64__)
  if (gptjax::HasAvx512()) return NormRowBwdAvx512(x, dy, scale, dx, dscale, dbias, d, mean, rstd, rms);
#endif
  float sum_g = 0.0f, sum_gx = 0.0f;
  for (int64_t j = 0; j < d; ++j) {
    const float xhat = (x[j] - mean) * rstd, g = dy[j] * scale[j];
    sum_g += g;
    sum_gx += g * xhat;
    dscale[j] += dy[j] * xhat;
    dbias[j] += dy[j];
  }
  const float a = rms ? 0.0f : sum_g / d, b = sum_gx / d;
  for (int64_t j = 0; j < d; ++j) {
    const float xhat = (x[j] - mean) * rstd;
    dx[j] = rstd * (dy[j] * scale[j] - a - xhat * b);
  }
}

ffi::Error CheckShapes(const ffi::Buffer<ffi::F32>& x, const ffi::Buffer<ffi::F32>& scale,
                       const ffi::Buffer<ffi::F32>& bias, int64_t& n, int64_t& d) {
  auto dims = x.dimensions();
  if (dims.size() != 2) return ffi::Error::InvalidArgument("norm: x must be [N, D]");
  n = dims[0];
  d = dims[1];
  if (scale.element_count() != static_cast<size_t>(d) ||
      bias.element_count() != static_cast<size_t>(d))
    return ffi::Error::InvalidArgument("norm: scale and bias must be [D]");
  return ffi::Error::Success();
}

ffi::Error NormFwd(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale,
                   ffi::Buffer<ffi::F32> bias, ffi::ResultBuffer<ffi::F32> y,
                   ffi::ResultBuffer<ffi::F32> mean, ffi::ResultBuffer<ffi::F32> rstd, float eps,
                   bool rms, bool has_bias) {
  int64_t n, d;
  if (ffi::Error e = CheckShapes(x, scale, bias, n, d); e.failure()) return e;
  const float *xd = x.typed_data(), *sd = scale.typed_data();
  const float* bd = has_bias ? bias.typed_data() : nullptr;
  float *yd = y->typed_data(), *md = mean->typed_data(), *rd = rstd->typed_data();
  gptjax::ParallelRows(pool, n, kRowsPerBlock, [&](int64_t i) {
    RowStats(xd + i * d, d, eps, rms, md[i], rd[i]);
    NormRowFwd(xd + i * d, sd, bd, yd + i * d, d, md[i], rd[i]);
  });
  return ffi::Error::Success();
}

ffi::Error NormBwd(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale,
                   ffi::Buffer<ffi::F32> mean, ffi::Buffer<ffi::F32> rstd,
                   ffi::Buffer<ffi::F32> dy, ffi::ResultBuffer<ffi::F32> dx,
                   ffi::ResultBuffer<ffi::F32> dscale, ffi::ResultBuffer<ffi::F32> dbias,
                   bool rms) {
  int64_t n, d;
  if (ffi::Error e = CheckShapes(x, scale, scale, n, d); e.failure()) return e;
  if (mean.element_count() != static_cast<size_t>(n) || rstd.element_count() != static_cast<size_t>(n))
    return ffi::Error::InvalidArgument("norm: mean and rstd must be [N]");
  const float *xd = x.typed_data(), *sd = scale.typed_data(), *dyd = dy.typed_data();
  const float *md = mean.typed_data(), *rd = rstd.typed_data();
  float* dxd = dx->typed_data();
  // The column sums: dscale in [0, d), dbias in [d, 2d).
  const std::vector<float> sums = gptjax::ParallelRowsWithSums(
      pool, n, kRowsPerBlock, 2 * d, [&](int64_t i, float* s) {
        NormRowBwd(xd + i * d, dyd + i * d, sd, dxd + i * d, s, s + d, d, md[i], rd[i], rms);
      });
  std::copy(sums.begin(), sums.begin() + d, dscale->typed_data());
  std::copy(sums.begin() + d, sums.end(), dbias->typed_data());
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GptjaxNormFwd, NormFwd,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("eps")
                                  .Attr<bool>("rms")
                                  .Attr<bool>("has_bias"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(GptjaxNormBwd, NormBwd,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("rms"));
