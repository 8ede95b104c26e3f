// lowbit causal attention over whole sequences (prefill, evaluation, calibration passes): softmax(Q Kᵀ · scale with
// the causal mask) V for every query head, grouped KV heads, in fp32 — 64 queries × 64 keys at a time with an online
// softmax (FlashAttention-2's order of work) in AVX-512 registers. torch's CPU flash kernel runs this at 10-60
// GFLOP/s on 2 cores (its small blocks go through MKL calls); lowbit/nn/attention.py sends transformers' attention
// here where it applies and to torch's SDPA otherwise.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

constexpr int64_t BLOCK = 64;  // queries and keys per block

#ifdef __AVX512F__
// e^x for x <= 0 (scores minus their row's maximum): 2^n · e^r with n = round(x / ln 2), r in [-ln2/2, ln2/2],
// Cephes' degree-6 polynomial for e^r (about 1 ulp), scaled by 2^n with scalef; below -87 it returns ~1e-38.
inline __m512 exp_nonpositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
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
  return _mm512_scalef_ps(p, n);
}

// The lowest min(max(n, 0), 16) lanes.
inline __mmask16 first(int64_t n) { return n <= 0 ? 0 : n >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << n) - 1); }

// S (64, 64) = scale · Qb (64, D) · KT (D, 64) for a block of (zero-padded) queries and packed keys.
void scores(const float* Qb, const float* KT, int64_t D, float scale, float* S) {
  for (int64_t i0 = 0; i0 < BLOCK; i0 += 4) {
    __m512 acc[4][4];
    for (auto& row : acc)
      for (auto& a : row) a = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; ++d) {
      const float* kt = KT + d * BLOCK;
      const __m512 k0 = _mm512_loadu_ps(kt), k1 = _mm512_loadu_ps(kt + 16), k2 = _mm512_loadu_ps(kt + 32),
                   k3 = _mm512_loadu_ps(kt + 48);
      for (int r = 0; r < 4; ++r) {
        const __m512 q = _mm512_set1_ps(Qb[(i0 + r) * D + d]);
        acc[r][0] = _mm512_fmadd_ps(q, k0, acc[r][0]);
        acc[r][1] = _mm512_fmadd_ps(q, k1, acc[r][1]);
        acc[r][2] = _mm512_fmadd_ps(q, k2, acc[r][2]);
        acc[r][3] = _mm512_fmadd_ps(q, k3, acc[r][3]);
      }
    }
    const __m512 s = _mm512_set1_ps(scale);
    for (int r = 0; r < 4; ++r)
      for (int c = 0; c < 4; ++c) _mm512_storeu_ps(S + (i0 + r) * BLOCK + c * 16, _mm512_mul_ps(acc[r][c], s));
  }
}

// O[:, c0 : c0 + 16·NC] += P (64, keys) · V (keys, ...) for one chunk of the head dimension.
template <int NC>
void accumulate(const float* P, const float* V, int64_t v_stride, int64_t keys, int64_t c0, int64_t D, float* O) {
  for (int64_t i0 = 0; i0 < BLOCK; i0 += 4) {
    __m512 acc[4][NC];
    for (int r = 0; r < 4; ++r)
      for (int c = 0; c < NC; ++c) acc[r][c] = _mm512_loadu_ps(O + (i0 + r) * D + c0 + c * 16);
    for (int64_t j = 0; j < keys; ++j) {
      __m512 v[NC];
      for (int c = 0; c < NC; ++c) v[c] = _mm512_loadu_ps(V + j * v_stride + c0 + c * 16);
      for (int r = 0; r < 4; ++r) {
        const __m512 p = _mm512_set1_ps(P[(i0 + r) * BLOCK + j]);
        for (int c = 0; c < NC; ++c) acc[r][c] = _mm512_fmadd_ps(p, v[c], acc[r][c]);
      }
    }
    for (int r = 0; r < 4; ++r)
      for (int c = 0; c < NC; ++c) _mm512_storeu_ps(O + (i0 + r) * D + c0 + c * 16, acc[r][c]);
  }
}

// One task: queries [q0, q0 + nq) of one head over keys [0, q0 + nq). q: the head's rows (stride q_stride),
// KT: the KV head's packed keys (blocks of (D, 64)), V: its value rows (stride v_stride); out rows (stride
// out_stride) get softmax · V.
void attend_rows(const float* q, int64_t q_stride, const float* KT, const float* V, int64_t v_stride, int64_t D,
                 int64_t q0, int64_t nq, float scale, float* out, int64_t out_stride) {
  std::vector<float> Qb(BLOCK * D, 0.f), S(BLOCK * BLOCK), O(BLOCK * D, 0.f);
  std::vector<float> top(BLOCK, -std::numeric_limits<float>::infinity()), total(BLOCK, 0.f);
  for (int64_t i = 0; i < nq; ++i) std::copy_n(q + (q0 + i) * q_stride, D, Qb.data() + i * D);
  const int64_t last = (q0 + nq - 1) / BLOCK;
  for (int64_t kb = 0; kb <= last; ++kb) {
    const int64_t k0 = kb * BLOCK, keys = std::min(BLOCK, q0 + nq - k0);  // keys of this block anyone attends to
    scores(Qb.data(), KT + kb * D * BLOCK, D, scale, S.data());
    for (int64_t i = 0; i < BLOCK; ++i) {
      float* s = S.data() + i * BLOCK;
      const int64_t seen = std::clamp<int64_t>(q0 + i - k0 + 1, 0, BLOCK);  // keys of the block query i attends to
      const __mmask16 mask[4] = {first(seen), first(seen - 16), first(seen - 32), first(seen - 48)};
      if (seen == 0) {  // (a padding row of the block, or a row before this block: nothing to add)
        std::fill_n(s, BLOCK, 0.f);
        continue;
      }
      const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
      __m512 mx = ninf;
      for (int c = 0; c < 4; ++c) mx = _mm512_max_ps(mx, _mm512_mask_loadu_ps(ninf, mask[c], s + c * 16));
      const float rowmax = _mm512_reduce_max_ps(mx), next = std::max(top[i], rowmax);
      const float correction = std::exp(top[i] - next);  // 0 for the first block (top = -inf)
      const __m512 shift = _mm512_set1_ps(next);
      __m512 sum = _mm512_setzero_ps();
      for (int c = 0; c < 4; ++c) {
        const __m512 x = _mm512_sub_ps(_mm512_loadu_ps(s + c * 16), shift);
        const __m512 p = _mm512_maskz_mov_ps(mask[c], exp_nonpositive(x));
        _mm512_storeu_ps(s + c * 16, p);
        sum = _mm512_add_ps(sum, p);
      }
      total[i] = total[i] * correction + _mm512_reduce_add_ps(sum);
      top[i] = next;
      if (correction != 1.f) {
        float* o = O.data() + i * D;
        for (int64_t d = 0; d < D; ++d) o[d] *= correction;
      }
    }
    const float* Vb = V + k0 * v_stride;
    for (int64_t c0 = 0; c0 < D; c0 += 64) {
      switch (std::min<int64_t>(4, (D - c0) / 16)) {
        case 4: accumulate<4>(S.data(), Vb, v_stride, keys, c0, D, O.data()); break;
        case 3: accumulate<3>(S.data(), Vb, v_stride, keys, c0, D, O.data()); break;
        case 2: accumulate<2>(S.data(), Vb, v_stride, keys, c0, D, O.data()); break;
        default: accumulate<1>(S.data(), Vb, v_stride, keys, c0, D, O.data()); break;
      }
    }
  }
  for (int64_t i = 0; i < nq; ++i) {
    const float inv = 1.f / total[i];
    float* o = out + (q0 + i) * out_stride;
    for (int64_t d = 0; d < D; ++d) o[d] = O[i * D + d] * inv;
  }
}
#endif

bool causal_attention_applies(int64_t head_dim) {
#ifdef __AVX512F__
  return head_dim > 0 && head_dim % 16 == 0 && head_dim <= 512;
#else
  return false;
#endif
}

// q (B, H, L, D), k and v (B, Hkv, L, D) fp32, each with a contiguous last dimension (other strides free: the
// transposed views transformers makes need no copy); H a multiple of Hkv. Returns (B, L, H, D) fp32: the layout
// transformers' attention functions return.
torch::Tensor causal_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, double scale) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "q, k and v must be (batch, heads, length, head_dim)");
  TORCH_CHECK(q.scalar_type() == torch::kFloat32 && k.scalar_type() == torch::kFloat32 &&
                  v.scalar_type() == torch::kFloat32, "q, k and v must be fp32");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, "head_dim must be contiguous");
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), D = q.size(3), Hkv = k.size(1);
  TORCH_CHECK(k.size(0) == B && v.sizes() == k.sizes() && k.size(2) == L && k.size(3) == D && H % Hkv == 0,
              "k and v must be (batch, kv_heads, length, head_dim) with length and head_dim of q");
  TORCH_CHECK(causal_attention_applies(D), "causal_attention needs AVX-512 and a head_dim multiple of 16");
  auto out = torch::empty({B, L, H, D}, torch::kFloat32);
#ifdef __AVX512F__
  const int64_t blocks = (L + BLOCK - 1) / BLOCK;
  auto packed = torch::zeros({B, Hkv, blocks, D, BLOCK}, torch::kFloat32);  // keys transposed per block of 64
  const float* kp = k.data_ptr<float>();
  float* pk = packed.data_ptr<float>();
  at::parallel_for(0, B * Hkv * blocks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / (Hkv * blocks), g = (t / blocks) % Hkv, kb = t % blocks;
      float* dst = pk + t * D * BLOCK;
      for (int64_t j = 0; j < BLOCK && kb * BLOCK + j < L; ++j) {
        const float* row = kp + b * k.stride(0) + g * k.stride(1) + (kb * BLOCK + j) * k.stride(2);
        for (int64_t d = 0; d < D; ++d) dst[d * BLOCK + j] = row[d];
      }
    }
  });
  const float* qp = q.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t group = H / Hkv;
  at::parallel_for(0, B * H * blocks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / (H * blocks), h = (t / blocks) % H, qb = t % blocks, g = h / group;
      attend_rows(qp + b * q.stride(0) + h * q.stride(1), q.stride(2), pk + (b * Hkv + g) * blocks * D * BLOCK,
                  vp + b * v.stride(0) + g * v.stride(1), v.stride(2), D, qb * BLOCK,
                  std::min(BLOCK, L - qb * BLOCK), static_cast<float>(scale), op + b * L * H * D + h * D, H * D);
    }
  });
#endif
  return out;
}

}  // namespace

void bind_attention(pybind11::module& m) {
  m.def("causal_attention", &causal_attention, "causal softmax attention over whole sequences (fp32, grouped KV)",
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("causal_attention_applies", &causal_attention_applies, "whether causal_attention runs this head_dim here");
}
