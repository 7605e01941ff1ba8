// Fused multi-head attention for XLA:CPU, forward and backward, as XLA FFI custom calls
// (gptjax/cpu_kernels.py). Per (batch, head): scores = scale * Q K^T, masked to -1e9 where
// mask is 0, softmax over keys, out = P V; the scores never leave the core's cache. The
// backward takes the probabilities saved by the forward. Layouts: q, out, dout [B, L, H, D],
// k, v [B, S, H, D], mask int8 [1 or B, 1, L, S], probs [B, H, L, S]; all float32 but mask.

#include <cmath>

#include "gemm.h"
#include "vector_math.h"

namespace ffi = xla::ffi;

namespace {

using gptjax::View;
#if defined(__x86_64__)
using gptjax::Exp512;
#endif

constexpr float kNegInf = -1e9f;  // gptjax.layers.NEG_INF

#if defined(__x86_64__)
__attribute__((target("avx512f"))) inline __mmask16 MaskBits(const int8_t* m) {
  const __m512i v = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(m)));
  return _mm512_test_epi32_mask(v, v);
}

__attribute__((target("avx512f,fma"))) void SoftmaxRowAvx512(float* s, const int8_t* mask,
                                                             int64_t n, float scale) {
  const int64_t n16 = n / 16 * 16;
  const __m512 neg_inf = _mm512_set1_ps(kNegInf), vscale = _mm512_set1_ps(scale);
  __m512 vmax = neg_inf;
  for (int64_t j = 0; j < n16; j += 16) {
    const __m512 x =
        _mm512_mask_mul_ps(neg_inf, MaskBits(mask + j), _mm512_loadu_ps(s + j), vscale);
    _mm512_storeu_ps(s + j, x);
    vmax = _mm512_max_ps(vmax, x);
  }
  float mx = _mm512_reduce_max_ps(vmax);
  for (int64_t j = n16; j < n; ++j) {
    s[j] = mask[j] ? s[j] * scale : kNegInf;
    mx = std::max(mx, s[j]);
  }
  const __m512 vmx = _mm512_set1_ps(mx);
  __m512 vsum = _mm512_setzero_ps();
  for (int64_t j = 0; j < n16; j += 16) {
    const __m512 e = Exp512(_mm512_sub_ps(_mm512_loadu_ps(s + j), vmx));
    _mm512_storeu_ps(s + j, e);
    vsum = _mm512_add_ps(vsum, e);
  }
  float sum = _mm512_reduce_add_ps(vsum);
  for (int64_t j = n16; j < n; ++j) sum += (s[j] = std::exp(s[j] - mx));
  const float inv = 1.0f / sum;
  const __m512 vinv = _mm512_set1_ps(inv);
  for (int64_t j = 0; j < n16; j += 16)
    _mm512_storeu_ps(s + j, _mm512_mul_ps(_mm512_loadu_ps(s + j), vinv));
  for (int64_t j = n16; j < n; ++j) s[j] *= inv;
}

// g <- mask ? p * (g - sum(p * g)) * scale : 0
__attribute__((target("avx512f,fma"))) void SoftmaxGradRowAvx512(const float* p, float* g,
                                                                 const int8_t* mask, int64_t n,
                                                                 float scale) {
  const int64_t n16 = n / 16 * 16;
  __m512 vdot = _mm512_setzero_ps();
  for (int64_t j = 0; j < n16; j += 16)
    vdot = _mm512_fmadd_ps(_mm512_loadu_ps(p + j), _mm512_loadu_ps(g + j), vdot);
  float dot = _mm512_reduce_add_ps(vdot);
  for (int64_t j = n16; j < n; ++j) dot += p[j] * g[j];
  const __m512 vd = _mm512_set1_ps(dot), vscale = _mm512_set1_ps(scale);
  for (int64_t j = 0; j < n16; j += 16) {
    const __m512 d =
        _mm512_mul_ps(_mm512_loadu_ps(p + j), _mm512_sub_ps(_mm512_loadu_ps(g + j), vd));
    _mm512_storeu_ps(g + j, _mm512_maskz_mul_ps(MaskBits(mask + j), d, vscale));
  }
  for (int64_t j = n16; j < n; ++j) g[j] = mask[j] ? p[j] * (g[j] - dot) * scale : 0.0f;
}
#endif

void SoftmaxRow(float* s, const int8_t* mask, int64_t n, float scale) {
#if defined(__x86_64__)
  if (gptjax::HasAvx512()) return SoftmaxRowAvx512(s, mask, n, scale);
#endif
  float mx = kNegInf;
  for (int64_t j = 0; j < n; ++j) {
    s[j] = mask[j] ? s[j] * scale : kNegInf;
    mx = std::max(mx, s[j]);
  }
  float sum = 0.0f;
  for (int64_t j = 0; j < n; ++j) sum += (s[j] = std::exp(s[j] - mx));
  for (int64_t j = 0; j < n; ++j) s[j] /= sum;
}

void SoftmaxGradRow(const float* p, float* g, const int8_t* mask, int64_t n, float scale) {
#if defined(__x86_64__)
  if (gptjax::HasAvx512()) return SoftmaxGradRowAvx512(p, g, mask, n, scale);
#endif
  float dot = 0.0f;
  for (int64_t j = 0; j < n; ++j) dot += p[j] * g[j];
  for (int64_t j = 0; j < n; ++j) g[j] = mask[j] ? p[j] * (g[j] - dot) * scale : 0.0f;
}

// Shapes shared by the forward and the backward.
struct Dims {
  int64_t batch, len, heads, dim, keys, mask_batch;
  bool causal;
  int64_t tok_stride() const { return heads * dim; }  // between tokens in [B, L, H, D]
  // Keys computed for rows [r0, r0 + rows): with `causal`, rows only see keys up to their own.
  int64_t Lim(int64_t r0, int64_t rows) const { return causal ? std::min(keys, r0 + rows) : keys; }
};

// Rows and keys are handled in blocks of this many; with `causal` the blocks above the diagonal
// are skipped, so smaller blocks skip more (62.5% of the products are left at T = 128).
constexpr int64_t kBlock = 32;

ffi::Error CheckDims(const ffi::Buffer<ffi::F32>& q, const ffi::Buffer<ffi::F32>& k,
                     const ffi::Buffer<ffi::F32>& v, const ffi::Buffer<ffi::S8>& mask, bool causal,
                     Dims& d) {
  auto dq = q.dimensions(), dk = k.dimensions(), dv = v.dimensions(), dm = mask.dimensions();
  if (dq.size() != 4 || dk.size() != 4 || dv.size() != 4 || dm.size() != 4)
    return ffi::Error::InvalidArgument("attention: operands must be rank 4");
  d = Dims{dq[0], dq[1], dq[2], dq[3], dk[1], dm[0], causal};
  for (auto dd : {dk, dv})
    if (dd[0] != d.batch || dd[1] != d.keys || dd[2] != d.heads || dd[3] != d.dim)
      return ffi::Error::InvalidArgument("attention: key/value shapes do not match the queries");
  if ((dm[0] != 1 && dm[0] != d.batch) || dm[1] != 1 || dm[2] != d.len || dm[3] != d.keys)
    return ffi::Error::InvalidArgument("attention: mask must be [1 or B, 1, L, S]");
  if (causal && d.len != d.keys)
    return ffi::Error::InvalidArgument("attention: causal needs as many queries as keys");
  return ffi::Error::Success();
}

// Whether query i may see no key at all; the reference softmax is then uniform over all keys,
// including the ones `causal` skips.
bool FullyMasked(const int8_t* mask_row, int64_t n) {
  for (int64_t j = 0; j < n; ++j)
    if (mask_row[j]) return false;
  return true;
}

ffi::Error AttentionFwd(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                        ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S8> mask,
                        ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> probs,
                        float scale, bool causal) {
  Dims d;
  if (ffi::Error e = CheckDims(q, k, v, mask, causal, d); e.failure()) return e;
  if (d.len == 0 || d.keys == 0) return ffi::Error::Success();
  const float *qd = q.typed_data(), *kd = k.typed_data(), *vd = v.typed_data();
  const int8_t* md = mask.typed_data();
  float *od = out->typed_data(), *pd = probs->typed_data();
  const int64_t ts = d.tok_stride(), S = d.keys, groups = d.batch * d.heads;
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t chunk = groups >= 4 * threads ? d.len : gptjax::RoundUp((d.len + 3) / 4, 8);
  const int64_t chunks = (d.len + chunk - 1) / chunk;
  gptjax::ParallelFor(pool, groups * chunks, [&](int64_t unit) {
    thread_local std::vector<float> k_panel, v_panel;
    const int64_t g = unit / chunks, c0 = (unit % chunks) * chunk, c1 = std::min(d.len, c0 + chunk);
    const int64_t b = g / d.heads, h = g % d.heads;
    const float* k0 = kd + b * S * ts + h * d.dim;
    const float* v0 = vd + b * S * ts + h * d.dim;
    // B(kk = dim, j = key) = k[j, kk]; B(kk = key, j = dim) = v[kk, j]
    const int64_t kn = gptjax::PackB(View{k0, 1, ts}, d.dim, S, k_panel);
    const int64_t vn = gptjax::PackB(View{v0, ts, 1}, S, d.dim, v_panel);
    for (int64_t r0 = c0; r0 < c1; r0 += kBlock) {
      const int64_t rows = std::min(kBlock, c1 - r0), lim = d.Lim(r0, rows);
      float* p0 = pd + (g * d.len + r0) * S;
      const int8_t* m0 = md + ((d.mask_batch == 1 ? 0 : b) * d.len + r0) * S;
      float* o0 = od + (b * d.len + r0) * ts + h * d.dim;
      gptjax::GemmPacked(rows, lim, d.dim, View{qd + (b * d.len + r0) * ts + h * d.dim, ts, 1},
                         k_panel.data(), kn, p0, S);
      for (int64_t i = 0; i < rows; ++i) {
        float* row = p0 + i * S;
        SoftmaxRow(row, m0 + i * S, lim, scale);
        if (lim < S) std::fill(row + lim, row + S, 0.0f);
      }
      gptjax::GemmPacked(rows, d.dim, lim, View{p0, S, 1}, v_panel.data(), vn, o0, ts);
      for (int64_t i = 0; lim < S && i < rows; ++i) {
        if (!FullyMasked(m0 + i * S, lim)) continue;
        float* row = p0 + i * S;
        std::fill(row, row + S, 1.0f / S);
        for (int64_t c = 0; c < d.dim; ++c) {
          float sum = 0.0f;
          for (int64_t j = 0; j < S; ++j) sum += v0[j * ts + c];
          o0[i * ts + c] = sum / S;
        }
      }
    }
  });
  return ffi::Error::Success();
}

ffi::Error AttentionBwd(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                        ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S8> mask,
                        ffi::Buffer<ffi::F32> probs, ffi::Buffer<ffi::F32> dout,
                        ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dk,
                        ffi::ResultBuffer<ffi::F32> dv, float scale, bool causal) {
  Dims d;
  if (ffi::Error e = CheckDims(q, k, v, mask, causal, d); e.failure()) return e;
  const float *qd = q.typed_data(), *kd = k.typed_data(), *vd = v.typed_data();
  const float *pd = probs.typed_data(), *god = dout.typed_data();
  const int8_t* md = mask.typed_data();
  float *dqd = dq->typed_data(), *dkd = dk->typed_data(), *dvd = dv->typed_data();
  const int64_t ts = d.tok_stride(), L = d.len, S = d.keys;
  gptjax::ParallelFor(pool, d.batch * d.heads, [&](int64_t g) {
    thread_local std::vector<float> vt_panel, k_panel, q_panel, do_panel, ds;
    const int64_t b = g / d.heads, h = g % d.heads;
    const int64_t tok0 = b * L * ts + h * d.dim, key0 = b * S * ts + h * d.dim;
    const float* p0 = pd + g * L * S;
    const int8_t* m0 = md + (d.mask_batch == 1 ? 0 : b) * L * S;
    const int64_t vtn = gptjax::PackB(View{vd + key0, 1, ts}, d.dim, S, vt_panel);
    const int64_t kn = gptjax::PackB(View{kd + key0, ts, 1}, S, d.dim, k_panel);
    const int64_t qn = gptjax::PackB(View{qd + tok0, ts, 1}, L, d.dim, q_panel);
    const int64_t don = gptjax::PackB(View{god + tok0, ts, 1}, L, d.dim, do_panel);
    ds.resize(L * S);
    // Per row block: dP = dO V^T, dS = mask * P * (dP - rowsum(P dP)) * scale, dQ = dS K.
    for (int64_t r0 = 0; r0 < L; r0 += kBlock) {
      const int64_t rows = std::min(kBlock, L - r0), lim = d.Lim(r0, rows);
      float* ds0 = ds.data() + r0 * S;
      gptjax::GemmPacked(rows, lim, d.dim, View{god + tok0 + r0 * ts, ts, 1}, vt_panel.data(),
                         vtn, ds0, S);
      for (int64_t i = 0; i < rows; ++i)
        SoftmaxGradRow(p0 + (r0 + i) * S, ds0 + i * S, m0 + (r0 + i) * S, lim, scale);
      gptjax::GemmPacked(rows, d.dim, lim, View{ds0, S, 1}, k_panel.data(), kn,
                         dqd + tok0 + r0 * ts, ts);
    }
    // Per key block: dV = P^T dO and dK = dS^T Q over the queries that see the block.
    const int64_t key_block = causal ? kBlock : S;
    for (int64_t c0 = 0; c0 < S; c0 += key_block) {
      const int64_t cols = std::min(key_block, S - c0), first = causal ? c0 : 0;
      gptjax::GemmPacked(cols, d.dim, L - first, View{p0 + first * S + c0, 1, S},
                         do_panel.data() + first * don, don, dvd + key0 + c0 * ts, ts);
      gptjax::GemmPacked(cols, d.dim, L - first, View{ds.data() + first * S + c0, 1, S},
                         q_panel.data() + first * qn, qn, dkd + key0 + c0 * ts, ts);
    }
    // A query that sees no key spreads its weight over all keys, also the skipped ones.
    for (int64_t i = 0; causal && i < L; ++i) {
      const int64_t seen = (i / kBlock + 1) * kBlock;  // key blocks whose dV included row i
      if (seen >= S || !FullyMasked(m0 + i * S, d.Lim(i / kBlock * kBlock, kBlock))) continue;
      for (int64_t j = seen; j < S; ++j)
        for (int64_t c = 0; c < d.dim; ++c)
          dvd[key0 + j * ts + c] += p0[i * S + j] * god[tok0 + i * ts + c];
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GptjaxAttentionFwd, AttentionFwd,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Attr<bool>("causal"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(GptjaxAttentionBwd, AttentionBwd,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Attr<bool>("causal"));
