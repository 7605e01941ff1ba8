// AVX-512 vector math shared by the gptjax XLA:CPU custom calls (attention.cc, norm.cc,
// activation.cc). Callers check gptjax::HasAvx512() (gemm.h) before using them.

#ifndef GPTJAX_CSRC_VECTOR_MATH_H_
#define GPTJAX_CSRC_VECTOR_MATH_H_

#include <cstdint>

#if defined(__x86_64__)
#include <immintrin.h>

namespace gptjax {

// expf to within a few ulp (Cephes' polynomial); arguments below -87 (denormal results) give 0.
__attribute__((target("avx512f,fma"))) inline __m512 Exp512(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-88.0f)), _mm512_set1_ps(88.7f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_maskz_scalef_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_GE_OQ), p, n);
}

// Lanes [0, min(left, 16)) of a 16-float vector, for the last partial vector of a row.
__attribute__((target("avx512f"))) inline __mmask16 TailMask(int64_t left) {
  return left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1);
}

}  // namespace gptjax

#endif  // defined(__x86_64__)
#endif  // GPTJAX_CSRC_VECTOR_MATH_H_
