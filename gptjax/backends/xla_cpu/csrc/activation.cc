// A Dense layer's bias add and GELU for XLA:CPU, forward and backward, as XLA FFI custom calls
// (gptjax/cpu_kernels.py). XLA:CPU evaluates tanh and erf with 256-bit vectors as separate
// fusions that write their intermediate results out; here each direction is one pass with
// 512-bit vectors, recomputing the transcendental in the backward instead of storing it.
//
// h, y, dy, dh: [N, F]; bias, dbias: [F]; all float32. With x = h + bias:
//   approximate (GPT-2's tanh form): y = x * 0.5 * (1 + tanh(c * (x + 0.044715 x^3))),
//                                    c = sqrt(2 / pi)
//   exact:                           y = x * Phi(x), Phi(x) = 0.5 * (1 + erf(x / sqrt(2)))
//   dh = dy * gelu'(x), dbias = sum over rows of dh (per block of rows, added in block order)

#include <cmath>

#include "gemm.h"
#include "vector_math.h"

namespace ffi = xla::ffi;

namespace {

#if defined(__x86_64__)
using gptjax::Exp512;
using gptjax::TailMask;
#endif

constexpr int64_t kRowsPerBlock = 64;
constexpr float kSqrt2OverPi = 0.7978845608028654f;
constexpr float kCubic = 0.044715f;
constexpr float kInvSqrt2 = 0.7071067811865476f;
constexpr float kInvSqrt2Pi = 0.3989422804014327f;
// erfc(z) ~= t (a1 + t (a2 + t (a3 + t (a4 + t a5)))) exp(-z^2), t = 1 / (1 + p z), z >= 0
// (Abramowitz and Stegun 7.1.26, absolute error below 1.5e-7).
constexpr float kErfP = 0.3275911f;
constexpr float kErfA[5] = {0.254829592f, -0.284496736f, 1.421413741f, -1.453152027f,
                            1.061405429f};

// Phi(x) and its derivative phi(x).
inline void NormalCdfPdf(float x, float& cdf, float& pdf) {
  const float z = std::fabs(x) * kInvSqrt2, t = 1.0f / (1.0f + kErfP * z);
  const float poly = t * (kErfA[0] + t * (kErfA[1] + t * (kErfA[2] + t * (kErfA[3] + t * kErfA[4]))));
  const float e = std::exp(-z * z);
  const float half_erfc = 0.5f * poly * e;
  cdf = x < 0 ? half_erfc : 1.0f - half_erfc;
  pdf = kInvSqrt2Pi * e;
}

inline float Gelu(float x, bool approximate, float* grad) {
  if (approximate) {
    const float u = kSqrt2OverPi * (x + kCubic * x * x * x), t = std::tanh(u);
    if (grad) *grad = 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * kSqrt2OverPi *
                                              (1.0f + 3.0f * kCubic * x * x);
    return 0.5f * x * (1.0f + t);
  }
  float cdf, pdf;
  NormalCdfPdf(x, cdf, pdf);
  if (grad) *grad = cdf + x * pdf;
  return x * cdf;
}

#if defined(__x86_64__)
// 1 / d to about 2^-28 relative error: the 14-bit estimate and one Newton step, several times
// the throughput of a 512-bit division.
__attribute__((target("avx512f,fma"))) inline __m512 Reciprocal512(__m512 d) {
  const __m512 r = _mm512_rcp14_ps(d);
  return _mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(2.0f)));
}

// 16 GELUs of x; their derivatives too when `grad` is not null.
__attribute__((target("avx512f,fma"))) inline __m512 Gelu512(__m512 x, bool approximate,
                                                             __m512* grad) {
  const __m512 one = _mm512_set1_ps(1.0f);
  if (approximate) {
    // 0.5 * (1 + tanh(u)) = sigmoid(2u) = 1 / (1 + exp(-2u)); exp's clamp keeps it finite.
    const __m512 x2 = _mm512_mul_ps(x, x);
    const __m512 two_u = _mm512_mul_ps(_mm512_mul_ps(x, _mm512_set1_ps(2.0f * kSqrt2OverPi)),
                                       _mm512_fmadd_ps(x2, _mm512_set1_ps(kCubic), one));
    const __m512 cdf = Reciprocal512(_mm512_add_ps(one, Exp512(_mm512_sub_ps(_mm512_setzero_ps(), two_u))));
    if (grad) {
      // d/dx x * sigmoid(2u) = cdf + x * cdf * (1 - cdf) * 2u'
      const __m512 du2 = _mm512_mul_ps(_mm512_set1_ps(2.0f * kSqrt2OverPi),
                                       _mm512_fmadd_ps(x2, _mm512_set1_ps(3.0f * kCubic), one));
      const __m512 slope = _mm512_mul_ps(_mm512_mul_ps(cdf, _mm512_sub_ps(one, cdf)), du2);
      *grad = _mm512_fmadd_ps(x, slope, cdf);
    }
    return _mm512_mul_ps(x, cdf);
  }
  const __m512 z = _mm512_mul_ps(_mm512_abs_ps(x), _mm512_set1_ps(kInvSqrt2));
  const __m512 t = Reciprocal512(_mm512_fmadd_ps(z, _mm512_set1_ps(kErfP), one));
  __m512 poly = _mm512_set1_ps(kErfA[4]);
  for (int i = 3; i >= 0; --i) poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(kErfA[i]));
  poly = _mm512_mul_ps(poly, t);
  const __m512 e = Exp512(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(z, z)));
  const __m512 half_erfc = _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), poly), e);
  const __mmask16 negative = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ);
  const __m512 cdf = _mm512_mask_blend_ps(negative, _mm512_sub_ps(one, half_erfc), half_erfc);
  if (grad) *grad = _mm512_fmadd_ps(x, _mm512_mul_ps(_mm512_set1_ps(kInvSqrt2Pi), e), cdf);
  return _mm512_mul_ps(x, cdf);
}

__attribute__((target("avx512f,fma"))) void GeluRowFwdAvx512(const float* h, const float* bias,
                                                             float* y, int64_t f, bool approximate) {
  for (int64_t j = 0; j < f; j += 16) {
    const __mmask16 m = TailMask(f - j);
    const __m512 x = _mm512_add_ps(_mm512_maskz_loadu_ps(m, h + j), _mm512_maskz_loadu_ps(m, bias + j));
    _mm512_mask_storeu_ps(y + j, m, Gelu512(x, approximate, nullptr));
  }
}

__attribute__((target("avx512f,fma"))) void GeluRowBwdAvx512(const float* h, const float* bias,
                                                             const float* dy, float* dh,
                                                             float* dbias, int64_t f,
                                                             bool approximate) {
  for (int64_t j = 0; j < f; j += 16) {
    const __mmask16 m = TailMask(f - j);
    const __m512 x = _mm512_add_ps(_mm512_maskz_loadu_ps(m, h + j), _mm512_maskz_loadu_ps(m, bias + j));
    __m512 grad;
    Gelu512(x, approximate, &grad);
    const __m512 out = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, dy + j), grad);
    _mm512_mask_storeu_ps(dh + j, m, out);
    _mm512_mask_storeu_ps(dbias + j, m, _mm512_add_ps(out, _mm512_maskz_loadu_ps(m, dbias + j)));
  }
}
#endif

void GeluRowFwd(const float* h, const float* bias, float* y, int64_t f, bool approximate) {
#if defined(__x86_64__)
  if (gptjax::HasAvx512()) return GeluRowFwdAvx512(h, bias, y, f, approximate);
#endif
  for (int64_t j = 0; j < f; ++j) y[j] = Gelu(h[j] + bias[j], approximate, nullptr);
}

void GeluRowBwd(const float* h, const float* bias, const float* dy, float* dh, float* dbias,
                int64_t f, bool approximate) {
#if defined(__x86_64__)
  if (gptjax::HasAvx512()) return GeluRowBwdAvx512(h, bias, dy, dh, dbias, f, approximate);
#endif
  for (int64_t j = 0; j < f; ++j) {
    float grad;
    Gelu(h[j] + bias[j], approximate, &grad);
    dh[j] = dy[j] * grad;
    dbias[j] += dh[j];
  }
}

ffi::Error CheckShapes(const ffi::Buffer<ffi::F32>& h, const ffi::Buffer<ffi::F32>& bias,
                       int64_t& n, int64_t& f) {
  auto dims = h.dimensions();
  if (dims.size() != 2) return ffi::Error::InvalidArgument("bias_gelu: h must be [N, F]");
  n = dims[0];
  f = dims[1];
  if (bias.element_count() != static_cast<size_t>(f))
    return ffi::Error::InvalidArgument("bias_gelu: bias must be [F]");
  return ffi::Error::Success();
}

ffi::Error BiasGeluFwd(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> h, ffi::Buffer<ffi::F32> bias,
                       ffi::ResultBuffer<ffi::F32> y, bool approximate) {
  int64_t n, f;
  if (ffi::Error e = CheckShapes(h, bias, n, f); e.failure()) return e;
  const float *hd = h.typed_data(), *bd = bias.typed_data();
  float* yd = y->typed_data();
  gptjax::ParallelRows(pool, n, kRowsPerBlock,
                       [&](int64_t i) { GeluRowFwd(hd + i * f, bd, yd + i * f, f, approximate); });
  return ffi::Error::Success();
}

ffi::Error BiasGeluBwd(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> h, ffi::Buffer<ffi::F32> bias,
                       ffi::Buffer<ffi::F32> dy, ffi::ResultBuffer<ffi::F32> dh,
                       ffi::ResultBuffer<ffi::F32> dbias, bool approximate) {
  int64_t n, f;
  if (ffi::Error e = CheckShapes(h, bias, n, f); e.failure()) return e;
  const float *hd = h.typed_data(), *bd = bias.typed_data(), *dyd = dy.typed_data();
  float* dhd = dh->typed_data();
  const std::vector<float> sums = gptjax::ParallelRowsWithSums(
      pool, n, kRowsPerBlock, f, [&](int64_t i, float* s) {
        GeluRowBwd(hd + i * f, bd, dyd + i * f, dhd + i * f, s, f, approximate);
      });
  std::copy(sums.begin(), sums.end(), dbias->typed_data());
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GptjaxBiasGeluFwd, BiasGeluFwd,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("approximate"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(GptjaxBiasGeluBwd, BiasGeluBwd,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("approximate"));
