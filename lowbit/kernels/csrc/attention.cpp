// lowbit causal attention over whole sequences (prompts, evaluation windows): softmax(Q Kᵀ · scale with the causal
// mask) V for every query head, grouped KV heads — 64 queries × 64 keys at a time with an online softmax
// (FlashAttention-2's order of work) in vector registers (AVX-512: 16 lanes; AVX2 + FMA: 8), where torch's CPU flash
// kernel reaches 10-60 GFLOP/s on this 2-core machine. fp32 inputs compute in fp32; bf16 inputs (AVX512-BF16 builds
// only) multiply as bf16 pairs into fp32 sums (vdpbf16ps, twice the fp32 rate) for Q Kᵀ and for P V, with the
// probabilities P rounded to bf16 as FlashAttention does on GPUs; the softmax stays fp32. lowbit/nn/attention.py
// sends transformers' attention here where it applies and to torch's SDPA otherwise.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

constexpr int64_t BLOCK = 64;  // queries and keys per block

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#define LOWBIT_ATTENTION 1
#endif

#ifdef LOWBIT_ATTENTION
// The vector unit: W fp32 lanes; ROWS × COLS registers of sums in the score and P·V loops (32 registers on AVX-512,
// 16 on AVX2). Lanes(t): the lanes l >= t (a query sees a key when its lane is at least the key's offset);
// max_where(a, m, b): max(a, b) in lanes m, a elsewhere; keep(m, x): x in lanes m, 0 elsewhere. exp_nonpositive:
// e^x for x <= 0 (scores minus their row's maximum) as 2^n · e^r with n = round(x / ln 2), r in [-ln2/2, ln2/2],
// Cephes' degree-6 polynomial for e^r (about 1 ulp); below -87 it returns ~1e-38.
#ifdef __AVX512F__
struct Simd {
  using V = __m512;
  using Lanes = __mmask16;
  static constexpr int64_t W = 16, ROWS = 4, COLS = 4, PV_ROWS = 4;
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, V x) { _mm512_storeu_ps(p, x); }
  static V set1(float x) { return _mm512_set1_ps(x); }
  static V zero() { return _mm512_setzero_ps(); }
  static V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V fnmadd(V a, V b, V c) { return _mm512_fnmadd_ps(a, b, c); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  static V max(V a, V b) { return _mm512_max_ps(a, b); }
  static V round(V x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static V scale2(V p, V n) { return _mm512_scalef_ps(p, n); }  // p · 2^n
  static Lanes from(int64_t t) {
    return t <= 0 ? 0xFFFF : t >= 16 ? 0 : static_cast<Lanes>(~((1u << t) - 1));
  }
  static V max_where(V a, Lanes m, V b) { return _mm512_mask_max_ps(a, m, a, b); }
  static V keep(Lanes m, V x) { return _mm512_maskz_mov_ps(m, x); }
  static void pin(V&) {}
};
#else
struct Simd {
  using V = __m256;
  using Lanes = __m256;
  static constexpr int64_t W = 8, ROWS = 2, COLS = 4, PV_ROWS = 2;
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, V x) { _mm256_storeu_ps(p, x); }
  static V set1(float x) { return _mm256_set1_ps(x); }
  static V zero() { return _mm256_setzero_ps(); }
  static V fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V fnmadd(V a, V b, V c) { return _mm256_fnmadd_ps(a, b, c); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static V max(V a, V b) { return _mm256_max_ps(a, b); }
  static V round(V x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static V scale2(V p, V n) {  // 2^n built in the exponent field: exact for n in [-126, 0], the lanes a mask keeps
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
  }
  static Lanes from(int64_t t) {
    const float bound = static_cast<float>(std::clamp<int64_t>(t, -1, 8));
    return _mm256_cmp_ps(_mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_ps(bound), _CMP_GE_OQ);
  }
  static V max_where(V a, Lanes m, V b) { return _mm256_blendv_ps(a, _mm256_max_ps(a, b), m); }
  static V keep(Lanes m, V x) { return _mm256_and_ps(m, x); }
  // Keeps a loaded vector in its register: without it GCC folds the load into every FMA that reads it (a second
  // load per FMA), and the score and P V loops ran on the load ports: 43 against 66 GFLOP/s on one thread at 2,048
  // tokens; at two threads 0.89x the time (BENCHMARKS.md, session 56).
  static void pin(V& x) { __asm__("" : "+x"(x)); }
};
#endif

static_assert(BLOCK % Simd::ROWS == 0 && BLOCK % Simd::PV_ROWS == 0 && BLOCK % (Simd::COLS * Simd::W) == 0,
              "register blocks must tile the 64 x 64 block");

inline Simd::V exp_nonpositive(Simd::V x) {
  x = Simd::max(x, Simd::set1(-87.0f));
  const Simd::V n = Simd::round(Simd::mul(x, Simd::set1(1.44269504088896341f)));
  Simd::V r = Simd::fnmadd(n, Simd::set1(0.693359375f), x);
  r = Simd::fnmadd(n, Simd::set1(-2.12194440e-4f), r);
  Simd::V p = Simd::set1(1.9875691500e-4f);
  p = Simd::fmadd(p, r, Simd::set1(1.3981999507e-3f));
  p = Simd::fmadd(p, r, Simd::set1(8.3334519073e-3f));
  p = Simd::fmadd(p, r, Simd::set1(4.1665795894e-2f));
  p = Simd::fmadd(p, r, Simd::set1(1.6666665459e-1f));
  p = Simd::fmadd(p, r, Simd::set1(5.0000001201e-1f));
  p = Simd::fmadd(p, Simd::mul(r, r), Simd::add(r, Simd::set1(1.0f)));
  return Simd::scale2(p, n);
}

// How the products multiply: fp32 lanes, or (AVX512-BF16) bf16 pairs summed into fp32 lanes by vdpbf16ps. An Elem
// holds PER consecutive values of a row along the sum (one fp32 value, or a pair of bf16 values in 32 bits).
struct Fp32 {
  using Elem = float;
  using Vec = Simd::V;
  static constexpr int64_t PER = 1;
  static Vec load(const Elem* p) { return Simd::load(p); }
  static Vec broadcast(Elem x) { return Simd::set1(x); }
  static Simd::V madd(Simd::V acc, Vec a, Vec b) { return Simd::fmadd(a, b, acc); }
  static void pin(Vec& v) { Simd::pin(v); }
};

#ifdef __AVX512BF16__
struct Bf16 {
  using Elem = uint32_t;
  using Vec = __m512bh;
  static constexpr int64_t PER = 2;
  static Vec load(const Elem* p) { return reinterpret_cast<__m512bh>(_mm512_loadu_si512(p)); }
  static Vec broadcast(Elem x) { return reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(x))); }
  static __m512 madd(__m512 acc, Vec a, Vec b) { return _mm512_dpbf16_ps(acc, a, b); }
  static void pin(Vec&) {}
};

// 16 fp32 lanes rounded to bf16 bits in the low half of 32-bit lanes.
inline __m512i bf16_bits(__m512 x) {
  return _mm512_cvtepu16_epi32(reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(x)));
}
#endif

// ST (keys, 64) = scale · K (keys, D) · QT (D, 64): the scores transposed, a row per key and a column per query of
// the block. QT: the block's queries transposed (Bf16: QT[p][i] = the pair q[i][2p], q[i][2p + 1]), zero columns past
// its end; K: key rows k_stride Elems apart. Key rows past `keys` read as zeros. Simd::ROWS keys × Simd::COLS
// registers of queries at a time.
template <typename M>
void scores(const typename M::Elem* K, int64_t k_stride, int64_t keys, const typename M::Elem* QT, int64_t D,
            float scale, const typename M::Elem* zeros, float* ST) {
  constexpr int64_t R = Simd::ROWS, C = Simd::COLS, W = Simd::W;
  const Simd::V s = Simd::set1(scale);
  for (int64_t j0 = 0; j0 < keys; j0 += R) {
    const typename M::Elem* rows[R];
    for (int64_t r = 0; r < R; ++r) rows[r] = j0 + r < keys ? K + (j0 + r) * k_stride : zeros;
    for (int64_t i0 = 0; i0 < BLOCK; i0 += C * W) {
      Simd::V acc[R][C];
      for (auto& row : acc)
        for (auto& a : row) a = Simd::zero();
      for (int64_t d = 0; d < D / M::PER; ++d) {
        const typename M::Elem* qt = QT + d * BLOCK + i0;
        typename M::Vec q[C];
        for (int64_t c = 0; c < C; ++c) {
          q[c] = M::load(qt + c * W);
          M::pin(q[c]);
        }
        for (int64_t r = 0; r < R; ++r) {
          const typename M::Vec k = M::broadcast(rows[r][d]);
          for (int64_t c = 0; c < C; ++c) acc[r][c] = M::madd(acc[r][c], k, q[c]);
        }
      }
      for (int64_t r = 0; r < R; ++r)
        for (int64_t c = 0; c < C; ++c) Simd::store(ST + (j0 + r) * BLOCK + i0 + c * W, Simd::mul(acc[r][c], s));
    }
  }
}

// O[:, c0 : c0 + W·NC] += P (64 queries, keys) · V (keys, ...) for one chunk of the head dimension, P given
// transposed (PT: a row per key; Bf16: a row per pair of keys, each Elem a query's pair) and V's rows v_stride Elems
// apart (Bf16: a row per pair of keys, each Elem the pair of one column); `rows` rows of each.
template <typename M, int NC>
void accumulate(const typename M::Elem* PT, const typename M::Elem* V, int64_t v_stride, int64_t rows, int64_t c0,
                int64_t D, float* O) {
  constexpr int64_t R = Simd::PV_ROWS, W = Simd::W;
  for (int64_t i0 = 0; i0 < BLOCK; i0 += R) {
    Simd::V acc[R][NC];
    for (int64_t r = 0; r < R; ++r)
      for (int c = 0; c < NC; ++c) acc[r][c] = Simd::load(O + (i0 + r) * D + c0 + c * W);
    for (int64_t j = 0; j < rows; ++j) {
      typename M::Vec v[NC];
      for (int c = 0; c < NC; ++c) {
        v[c] = M::load(V + j * v_stride + c0 + c * W);
        M::pin(v[c]);
      }
      for (int64_t r = 0; r < R; ++r) {
        const typename M::Vec p = M::broadcast(PT[j * BLOCK + i0 + r]);
        for (int c = 0; c < NC; ++c) acc[r][c] = M::madd(acc[r][c], p, v[c]);
      }
    }
    for (int64_t r = 0; r < R; ++r)
      for (int c = 0; c < NC; ++c) Simd::store(O + (i0 + r) * D + c0 + c * W, acc[r][c]);
  }
}

// One task: queries [q0, q0 + nq) of one head over keys [0, q0 + nq). q, K, V: the head's query rows and its KV
// head's key and value rows, each with its row stride in Elems (Bf16: q and K are bf16 rows read as pairs, V the
// value rows as pairs, VP below, D Elems a row); out rows (stride out_stride) get softmax · V. The softmax runs down
// the transposed scores, W queries to a register: a running maximum and sum per query.
template <typename M>
void attend_rows(const typename M::Elem* q, int64_t q_stride, const typename M::Elem* K, int64_t k_stride,
                 const typename M::Elem* V, int64_t v_stride, int64_t D, int64_t q0, int64_t nq, float scale,
                 float* out, int64_t out_stride) {
  using Elem = typename M::Elem;
  constexpr bool pairs = M::PER == 2;
  constexpr int64_t W = Simd::W, NV = BLOCK / W;  // registers per row of the block
  std::vector<Elem> QT(D / M::PER * BLOCK, Elem(0)), zeros(D, Elem(0)), PP(pairs ? BLOCK / 2 * BLOCK : 0);
  std::vector<float> ST(BLOCK * BLOCK), O(BLOCK * D, 0.f), factor(BLOCK);
  for (int64_t i = 0; i < nq; ++i)
    for (int64_t d = 0; d < D / M::PER; ++d) QT[d * BLOCK + i] = q[(q0 + i) * q_stride + d];
  Simd::V top[NV], total[NV];
  for (auto& t : top) t = Simd::set1(-std::numeric_limits<float>::infinity());
  for (auto& t : total) t = Simd::zero();
  for (int64_t k0 = 0; k0 < q0 + nq; k0 += BLOCK) {
    const int64_t keys = std::min(BLOCK, q0 + nq - k0), ahead = q0 - k0;  // query i sees keys j <= i + ahead
    scores<M>(K + k0 * k_stride, k_stride, keys, QT.data(), D, scale, zeros.data(), ST.data());
    for (int64_t c = 0; c < NV; ++c) {
      Simd::V next = top[c];
      for (int64_t j = 0; j < keys; ++j)  // lanes (queries c·W + l) that see key j: l >= j - ahead - c·W
        next = Simd::max_where(next, Simd::from(j - ahead - c * W), Simd::load(ST.data() + j * BLOCK + c * W));
      const Simd::V correction = exp_nonpositive(Simd::sub(top[c], next));  // ~0 on the first block
      Simd::V sum = Simd::zero();
      for (int64_t j = 0; j < keys; ++j) {
        float* st = ST.data() + j * BLOCK + c * W;
        const Simd::V p = Simd::keep(Simd::from(j - ahead - c * W), exp_nonpositive(Simd::sub(Simd::load(st), next)));
        Simd::store(st, p);
        sum = Simd::add(sum, p);
      }
      total[c] = Simd::fmadd(total[c], correction, sum);
      top[c] = next;
      Simd::store(factor.data() + c * W, correction);
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
    for (int64_t c0 = 0; c0 < D; c0 += Simd::COLS * W) {
      switch (std::min<int64_t>(Simd::COLS, (D - c0) / W)) {
        case 4: accumulate<M, 4>(probs, Vb, v_stride, rows, c0, D, O.data()); break;
        case 3: accumulate<M, 3>(probs, Vb, v_stride, rows, c0, D, O.data()); break;
        case 2: accumulate<M, 2>(probs, Vb, v_stride, rows, c0, D, O.data()); break;
        default: accumulate<M, 1>(probs, Vb, v_stride, rows, c0, D, O.data()); break;
      }
    }
  }
  float sums[BLOCK];
  for (int64_t c = 0; c < NV; ++c) Simd::store(sums + c * W, total[c]);
  for (int64_t i = 0; i < nq; ++i) {
    const float inv = 1.f / sums[i];
    float* o = out + (q0 + i) * out_stride;
    for (int64_t d = 0; d < D; ++d) o[d] = O[i * D + d] * inv;
  }
}
#endif

bool causal_attention_applies(int64_t head_dim) {
#ifdef LOWBIT_ATTENTION
  return head_dim > 0 && head_dim % 16 == 0 && head_dim <= 512;
#else
  return false;
#endif
}

// The longest sequence worth sending here: AVX2's 16 registers hold a quarter of AVX-512's sums, and against torch's
// flash kernel (SmolLM2's and a 1B LLaMA's head shapes, 2 threads, benchmarks/attention.py) this kernel measured
// 1.58-1.96x its speed at 512 tokens, 1.18-1.42x at 1,024, 1.09-1.28x at 1,536 and 0.92-1.11x at 2,048 on an AVX2
// CPU (0.86-1.09x at 3,072-4,096); on AVX-512 it led at every length measured.
int64_t causal_attention_longest() {
#ifdef __AVX512F__
  return std::numeric_limits<int64_t>::max();
#else
  return 1536;
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
  TORCH_CHECK(causal_attention_applies(D), "causal_attention needs AVX-512 or AVX2 + FMA and a head_dim multiple of 16");
  TORCH_CHECK(!bf16 || bf16_attention_applies(), "bf16 causal_attention needs a build with AVX512-BF16");
  for (const auto* t : {&q, &k})
    TORCH_CHECK(!bf16 || (t->stride(0) % 2 == 0 && t->stride(1) % 2 == 0 && t->stride(2) % 2 == 0),
                "bf16 q and k need even strides");
  auto out = torch::empty({B, L, H, D}, torch::kFloat32);
#ifdef LOWBIT_ATTENTION
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
  m.def("causal_attention_longest", &causal_attention_longest, "the longest sequence causal_attention should take "
        "here (torch's kernel is faster beyond it)");
  m.def("bf16_attention_applies", &bf16_attention_applies, "whether causal_attention takes bf16 (AVX512-BF16)");
}
