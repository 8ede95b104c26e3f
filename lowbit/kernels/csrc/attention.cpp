// lowbit causal attention over whole sequences (prompts, evaluation windows): softmax(Q Kᵀ · scale with the causal
// mask) V for every query head, grouped KV heads — 64 queries × 64 keys at a time with an online softmax
// (FlashAttention-2's order of work) in AVX-512 registers, where torch's CPU flash kernel reaches 10-60 GFLOP/s on
// this 2-core machine. fp32 inputs compute in fp32; bf16 inputs multiply as bf16 pairs into fp32 sums (AVX512-BF16's
// vdpbf16ps, twice the fp32 rate) for Q Kᵀ and for P V, with the probabilities P rounded to bf16 as FlashAttention
// does on GPUs; the softmax stays fp32. lowbit/nn/attention.py sends transformers' attention here where it applies
// and to torch's SDPA otherwise.
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

// How the products multiply: fp32 lanes, or (AVX512-BF16) bf16 pairs summed into fp32 lanes by vdpbf16ps. An Elem
// holds PER consecutive values of a row along the sum (one fp32 value, or a pair of bf16 values in 32 bits).
struct Fp32 {
  using Elem = float;
  using Vec = __m512;
  static constexpr int64_t PER = 1;
  static Vec load(const Elem* p) { return _mm512_loadu_ps(p); }
  static Vec broadcast(Elem x) { return _mm512_set1_ps(x); }
  static __m512 madd(__m512 acc, Vec a, Vec b) { return _mm512_fmadd_ps(a, b, acc); }
};

#ifdef __AVX512BF16__
struct Bf16 {
  using Elem = uint32_t;
  using Vec = __m512bh;
  static constexpr int64_t PER = 2;
  static Vec load(const Elem* p) { return reinterpret_cast<__m512bh>(_mm512_loadu_si512(p)); }
  static Vec broadcast(Elem x) { return reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(x))); }
  static __m512 madd(__m512 acc, Vec a, Vec b) { return _mm512_dpbf16_ps(acc, a, b); }
};

// 16 fp32 lanes rounded to bf16 bits in the low half of 32-bit lanes.
inline __m512i bf16_bits(__m512 x) {
  return _mm512_cvtepu16_epi32(reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(x)));
}
#endif

// ST (keys, 64) = scale · K (keys, D) · QT (D, 64): the scores transposed, a row per key and a column per query of
// the block. QT: the block's queries transposed (Bf16: QT[p][i] = the pair q[i][2p], q[i][2p + 1]), zero columns past
// its end; K: key rows k_stride Elems apart. Key rows past `keys` read as zeros.
template <typename M>
void scores(const typename M::Elem* K, int64_t k_stride, int64_t keys, const typename M::Elem* QT, int64_t D,
            float scale, const typename M::Elem* zeros, float* ST) {
  for (int64_t j0 = 0; j0 < keys; j0 += 4) {
    const typename M::Elem* rows[4];
    for (int r = 0; r < 4; ++r) rows[r] = j0 + r < keys ? K + (j0 + r) * k_stride : zeros;
    __m512 acc[4][4];
    for (auto& row : acc)
      for (auto& a : row) a = _mm512_setzero_ps();
    for (int64_t d = 0; d < D / M::PER; ++d) {
      const typename M::Elem* qt = QT + d * BLOCK;
      const typename M::Vec q0 = M::load(qt), q1 = M::load(qt + 16), q2 = M::load(qt + 32), q3 = M::load(qt + 48);
      for (int r = 0; r < 4; ++r) {
        const typename M::Vec k = M::broadcast(rows[r][d]);
        acc[r][0] = M::madd(acc[r][0], k, q0);
        acc[r][1] = M::madd(acc[r][1], k, q1);
        acc[r][2] = M::madd(acc[r][2], k, q2);
        acc[r][3] = M::madd(acc[r][3], k, q3);
      }
    }
    const __m512 s = _mm512_set1_ps(scale);
    for (int r = 0; r < 4; ++r)
      for (int c = 0; c < 4; ++c) _mm512_storeu_ps(ST + (j0 + r) * BLOCK + c * 16, _mm512_mul_ps(acc[r][c], s));
  }
}

// O[:, c0 : c0 + 16·NC] += P (64 queries, keys) · V (keys, ...) for one chunk of the head dimension, P given
// transposed (PT: a row per key; Bf16: a row per pair of keys, each Elem a query's pair) and V's rows v_stride Elems
// apart (Bf16: a row per pair of keys, each Elem the pair of one column); `rows` rows of each.
template <typename M, int NC>
void accumulate(const typename M::Elem* PT, const typename M::Elem* V, int64_t v_stride, int64_t rows, int64_t c0,
                int64_t D, float* O) {
  for (int64_t i0 = 0; i0 < BLOCK; i0 += 4) {
    __m512 acc[4][NC];
    for (int r = 0; r < 4; ++r)
      for (int c = 0; c < NC; ++c) acc[r][c] = _mm512_loadu_ps(O + (i0 + r) * D + c0 + c * 16);
    for (int64_t j = 0; j < rows; ++j) {
      typename M::Vec v[NC];
      for (int c = 0; c < NC; ++c) v[c] = M::load(V + j * v_stride + c0 + c * 16);
      for (int r = 0; r < 4; ++r) {
        const typename M::Vec p = M::broadcast(PT[j * BLOCK + i0 + r]);
        for (int c = 0; c < NC; ++c) acc[r][c] = M::madd(acc[r][c], p, v[c]);
      }
    }
    for (int r = 0; r < 4; ++r)
      for (int c = 0; c < NC; ++c) _mm512_storeu_ps(O + (i0 + r) * D + c0 + c * 16, acc[r][c]);
  }
}

// One task: queries [q0, q0 + nq) of one head over keys [0, q0 + nq). q, K, V: the head's query rows and its KV
// head's key and value rows, each with its row stride in Elems (Bf16: q and K are bf16 rows read as pairs, V the
// value rows as pairs, VP below, D Elems a row); out rows (stride out_stride) get softmax · V. The softmax runs down
// the transposed scores, 16 queries to a register: a running maximum and sum per query.
template <typename M>
void attend_rows(const typename M::Elem* q, int64_t q_stride, const typename M::Elem* K, int64_t k_stride,
                 const typename M::Elem* V, int64_t v_stride, int64_t D, int64_t q0, int64_t nq, float scale,
                 float* out, int64_t out_stride) {
  using Elem = typename M::Elem;
  constexpr bool pairs = M::PER == 2;
  std::vector<Elem> QT(D / M::PER * BLOCK, Elem(0)), zeros(D, Elem(0)), PP(pairs ? BLOCK / 2 * BLOCK : 0);
  std::vector<float> ST(BLOCK * BLOCK), O(BLOCK * D, 0.f), factor(BLOCK);
  for (int64_t i = 0; i < nq; ++i)
    for (int64_t d = 0; d < D / M::PER; ++d) QT[d * BLOCK + i] = q[(q0 + i) * q_stride + d];
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512 top[4] = {ninf, ninf, ninf, ninf}, total[4];
  for (auto& t : total) t = _mm512_setzero_ps();
  for (int64_t k0 = 0; k0 < q0 + nq; k0 += BLOCK) {
    const int64_t keys = std::min(BLOCK, q0 + nq - k0), ahead = q0 - k0;  // query i sees keys j <= i + ahead
    scores<M>(K + k0 * k_stride, k_stride, keys, QT.data(), D, scale, zeros.data(), ST.data());
    for (int c = 0; c < 4; ++c) {
      __m512 next = top[c];
      for (int64_t j = 0; j < keys; ++j) {  // lanes (queries c·16 + l) that see key j: l >= j - ahead - c·16
        const __mmask16 seen = static_cast<__mmask16>(~first(j - ahead - c * 16));
        next = _mm512_mask_max_ps(next, seen, next, _mm512_loadu_ps(ST.data() + j * BLOCK + c * 16));
      }
      const __m512 correction = exp_nonpositive(_mm512_sub_ps(top[c], next));  // ~0 on the first block
      __m512 sum = _mm512_setzero_ps();
      for (int64_t j = 0; j < keys; ++j) {
        const __mmask16 seen = static_cast<__mmask16>(~first(j - ahead - c * 16));
        float* st = ST.data() + j * BLOCK + c * 16;
        const __m512 p = _mm512_maskz_mov_ps(seen, exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(st), next)));
        _mm512_storeu_ps(st, p);
        sum = _mm512_add_ps(sum, p);
      }
      total[c] = _mm512_fmadd_ps(total[c], correction, sum);
      top[c] = next;
      _mm512_storeu_ps(factor.data() + c * 16, correction);
    }
    if (k0 > 0)
      for (int64_t i = 0; i < BLOCK; ++i) {
        float* o = O.data() + i * D;
        for (int64_t d = 0; d < D; ++d) o[d] *= factor[i];
      }
    const Elem* probs = reinterpret_cast<const Elem*>(ST.data());
    int64_t rows = keys;
#ifdef __AVX512BF16__
    if constexpr (pairs) {  // the probabilities as bf16 pairs of keys; a key past the block's end pairs with zeros
      rows = (keys + 1) / 2;
      for (int64_t p = 0; p < rows; ++p)
        for (int c = 0; c < 4; ++c) {
          const __m512i even = bf16_bits(_mm512_loadu_ps(ST.data() + 2 * p * BLOCK + c * 16));
          const __m512i odd = 2 * p + 1 < keys ? bf16_bits(_mm512_loadu_ps(ST.data() + (2 * p + 1) * BLOCK + c * 16))
                                               : _mm512_setzero_si512();
          _mm512_storeu_si512(PP.data() + p * BLOCK + c * 16, _mm512_or_si512(even, _mm512_slli_epi32(odd, 16)));
        }
      probs = PP.data();
    }
#endif
    const Elem* Vb = V + k0 / M::PER * v_stride;
    for (int64_t c0 = 0; c0 < D; c0 += 64) {
      switch (std::min<int64_t>(4, (D - c0) / 16)) {
        case 4: accumulate<M, 4>(probs, Vb, v_stride, rows, c0, D, O.data()); break;
        case 3: accumulate<M, 3>(probs, Vb, v_stride, rows, c0, D, O.data()); break;
        case 2: accumulate<M, 2>(probs, Vb, v_stride, rows, c0, D, O.data()); break;
        default: accumulate<M, 1>(probs, Vb, v_stride, rows, c0, D, O.data()); break;
      }
    }
  }
  float sums[BLOCK];
  for (int c = 0; c < 4; ++c) _mm512_storeu_ps(sums + c * 16, total[c]);
  for (int64_t i = 0; i < nq; ++i) {
    const float inv = 1.f / sums[i];
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

bool bf16_attention_applies() {
#ifdef __AVX512BF16__
  return true;
#else
  return false;
#endif
}

// q (B, H, L, D), k and v (B, Hkv, L, D), all fp32 or all bf16 (then with even strides), each with a contiguous last
// dimension (other strides free: the transposed views transformers makes need no copy); H a multiple of Hkv. Returns
// (B, L, H, D) fp32: the layout transformers' attention functions return.
torch::Tensor causal_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, double scale) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "q, k and v must be (batch, heads, length, head_dim)");
  const auto dtype = q.scalar_type();
  const bool bf16 = dtype == torch::kBFloat16;
  TORCH_CHECK((dtype == torch::kFloat32 || bf16) && k.scalar_type() == dtype && v.scalar_type() == dtype,
              "q, k and v must be all fp32 or all bf16");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, "head_dim must be contiguous");
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), D = q.size(3), Hkv = k.size(1);
  TORCH_CHECK(k.size(0) == B && v.sizes() == k.sizes() && k.size(2) == L && k.size(3) == D && H % Hkv == 0,
              "k and v must be (batch, kv_heads, length, head_dim) with length and head_dim of q");
  TORCH_CHECK(causal_attention_applies(D), "causal_attention needs AVX-512 and a head_dim multiple of 16");
  TORCH_CHECK(!bf16 || bf16_attention_applies(), "bf16 causal_attention needs a build with AVX512-BF16");
  for (const auto* t : {&q, &k})
    TORCH_CHECK(!bf16 || (t->stride(0) % 2 == 0 && t->stride(1) % 2 == 0 && t->stride(2) % 2 == 0),
                "bf16 q and k need even strides");
  auto out = torch::empty({B, L, H, D}, torch::kFloat32);
#ifdef __AVX512F__
  const int64_t blocks = (L + BLOCK - 1) / BLOCK, group = H / Hkv, half = (L + 1) / 2;
  float* op = out.data_ptr<float>();
  // bf16: the value rows as pairs, VP[b][g][p][d] = V[2p][d] | V[2p + 1][d] << 16 (a zero row past an odd end).
  std::vector<uint32_t> pairs(bf16 ? B * Hkv * half * D : 0);
  if (bf16) {
    const uint16_t* vb = reinterpret_cast<const uint16_t*>(v.data_ptr<at::BFloat16>());
    at::parallel_for(0, B * Hkv * half, 64, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t b = r / (Hkv * half), g = (r / half) % Hkv, p = r % half;
        const uint16_t* even = vb + b * v.stride(0) + g * v.stride(1) + 2 * p * v.stride(2);
        const uint16_t* odd = 2 * p + 1 < L ? even + v.stride(2) : nullptr;
        uint32_t* dst = pairs.data() + r * D;
        for (int64_t d = 0; d < D; ++d) dst[d] = even[d] | (odd != nullptr ? uint32_t(odd[d]) << 16 : 0u);
      }
    });
  }
  const char* qp = static_cast<const char*>(q.data_ptr());
  const char* kp = static_cast<const char*>(k.data_ptr());
  const char* vp = static_cast<const char*>(v.data_ptr());
  const int64_t size = bf16 ? 2 : 4;  // bytes per element
  // Tasks (sequence, head, query block); a head's blocks in the order 0, last, 1, last - 1, ... so that the
  // contiguous share of each thread holds as many cheap early blocks as costly late ones.
  at::parallel_for(0, B * H * blocks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / (H * blocks), h = (t / blocks) % H, i = t % blocks, g = h / group;
      const int64_t qb = i % 2 == 0 ? i / 2 : blocks - 1 - i / 2, nq = std::min(BLOCK, L - qb * BLOCK);
      const char* qh = qp + (b * q.stride(0) + h * q.stride(1)) * size;
      const char* kh = kp + (b * k.stride(0) + g * k.stride(1)) * size;
      float* oh = op + b * L * H * D + h * D;
      if (bf16) {
#ifdef __AVX512BF16__
        attend_rows<Bf16>(reinterpret_cast<const uint32_t*>(qh), q.stride(2) / 2, reinterpret_cast<const uint32_t*>(kh),
                          k.stride(2) / 2, pairs.data() + (b * Hkv + g) * half * D, D, D, qb * BLOCK, nq,
                          static_cast<float>(scale), oh, H * D);
#endif
      } else {
        attend_rows<Fp32>(reinterpret_cast<const float*>(qh), q.stride(2), reinterpret_cast<const float*>(kh),
                          k.stride(2), reinterpret_cast<const float*>(vp + (b * v.stride(0) + g * v.stride(1)) * size),
                          v.stride(2), D, qb * BLOCK, nq, static_cast<float>(scale), oh, H * D);
      }
    }
  });
#endif
  return out;
}

}  // namespace

void bind_attention(pybind11::module& m) {
  m.def("causal_attention", &causal_attention, "causal softmax attention over whole sequences (fp32 or bf16 "
        "products, grouped KV)",
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("causal_attention_applies", &causal_attention_applies, "whether causal_attention runs this head_dim here");
  m.def("bf16_attention_applies", &bf16_attention_applies, "whether causal_attention takes bf16 (AVX512-BF16)");
}
