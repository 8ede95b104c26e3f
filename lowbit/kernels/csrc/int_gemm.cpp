// lowbit CPU integer GEMM for activation-quantized layers (QUAD / QuaRot W4A8, W4A4, W8A8): y = Q(x) W^T with
// the activations quantized per token at run time and the products summed in int32, never in float:
//   y[m, n] = s_a[m] * sum_g s_w[n, g] * sum_{k in g} q_a[m, k] * (q_w[n, k] - z[n, g])
// q_a, s_a: each row of x (M, K) rounded as lowbit/formats/act.py's quantize_per_token rounds it (symmetric,
//   s_a = max(c * max|x| / qmax, FLT_MIN), q_a = clamp(round(x / s_a), -qmax - 1, qmax), qmax = 2^(b-1) - 1);
// q_w, s_w, z: the packed weight (layout lsb-rows-v1, lowbit/formats/packing.py), z = offset for symmetric codes.
// vpdpbusd multiplies 64 unsigned weight codes by 64 signed activation codes a step; a register tile of NB weight
// rows x MB activation rows shares every load. int32 sums run across a whole group (a whole row when the weight has
// one scale per row) and meet the scales once; the zero point's share uses the integer sum of each row's codes.
// The simulated path (fake-quantized x times the dequantized W) computes the same sums in float: the two agree up
// to fp32 rounding. Sums stay exact while K * 255 * 128 < 2^31 (K < 65,793).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__)
#include <immintrin.h>
#define LOWBIT_INT_GEMM 1
#elif defined(__AVX2__)
#include <immintrin.h>
#define LOWBIT_ACT_AVX2 1  // act_codes rounds 8 values a step (csrc/gemm_i8.cpp multiplies the codes)
#endif

namespace {

// Per-token quantization of one row (K floats) into natural-order codes `q` (K bytes); returns s_a. The same
// fp32 operations, in the same order, as quantize_per_token: the codes are identical.
float quantize_row(const float* x, int64_t K, int qmax, float clip, int8_t* q) {
  float m = 0.f;
  int64_t k = 0;
#ifdef LOWBIT_INT_GEMM
  __m512 vm = _mm512_setzero_ps();
  for (; k + 16 <= K; k += 16) vm = _mm512_max_ps(vm, _mm512_abs_ps(_mm512_loadu_ps(x + k)));
  m = _mm512_reduce_max_ps(vm);
#elif defined(LOWBIT_ACT_AVX2)
  __m256 vm = _mm256_setzero_ps();
  for (; k + 8 <= K; k += 8) vm = _mm256_max_ps(vm, _mm256_andnot_ps(_mm256_set1_ps(-0.f), _mm256_loadu_ps(x + k)));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, vm);
  for (float v : lanes) m = std::max(m, v);
#endif
  for (; k < K; ++k) m = std::max(m, std::fabs(x[k]));
  const float s = std::max(clip * m / float(qmax), FLT_MIN);
  k = 0;
#ifdef LOWBIT_INT_GEMM
  const __m512 vs = _mm512_set1_ps(s), lo = _mm512_set1_ps(float(-qmax - 1)), hi = _mm512_set1_ps(float(qmax));
  for (; k + 16 <= K; k += 16) {
    __m512 v = _mm512_roundscale_ps(_mm512_div_ps(_mm512_loadu_ps(x + k), vs), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    v = _mm512_min_ps(_mm512_max_ps(v, lo), hi);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(v)));
  }
#elif defined(LOWBIT_ACT_AVX2)
  const __m256 vs = _mm256_set1_ps(s), lo = _mm256_set1_ps(float(-qmax - 1)), hi = _mm256_set1_ps(float(qmax));
  for (; k + 8 <= K; k += 8) {
    __m256 v = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(x + k), vs), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256i i32 = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(v, lo), hi));
    const __m128i i16 = _mm_packs_epi32(_mm256_castsi256_si128(i32), _mm256_extracti128_si256(i32, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(q + k), _mm_packs_epi16(i16, i16));
  }
#endif
  for (; k < K; ++k)
    q[k] = static_cast<int8_t>(std::max(float(-qmax - 1), std::min(float(qmax), std::nearbyint(x[k] / s))));
  return s;
}

// Sum of n int8 codes.
int32_t code_sum(const int8_t* q, int64_t n) {
  int32_t total = 0;
  int64_t k = 0;
#ifdef LOWBIT_INT_GEMM
  __m512i v = _mm512_setzero_si512();
  for (; k + 16 <= n; k += 16)
    v = _mm512_add_epi32(v, _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + k))));
  total = _mm512_reduce_add_epi32(v);
#endif
  for (; k < n; ++k) total += q[k];
  return total;
}

#ifdef LOWBIT_INT_GEMM

// The first min(n, 16) of 16 lanes (csrc/qgemv.cpp has the same helper in its own translation unit).
inline __mmask16 lanes16(int64_t n) { return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1); }

// One group of len activations rounded as the int8 decode GEMV rounds it (csrc/qgemv.cpp, quantize_x: symmetric,
// s = max|x| / 127, codes round(x * 127 / max|x|) to nearest even, within +-127) into q; returns s, and the codes'
// sum in *total. 16 values a step (the scalar loop it replaced took 8 us of a 16-row call at K = 576).
inline float round_group(const float* x, int64_t len, int8_t* q, int32_t* total) {
  const __m512 sign = _mm512_set1_ps(-0.f);
  const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
  __m512 mx = _mm512_setzero_ps();
  for (int64_t i = 0; i < len; i += 16) {
    const __mmask16 m = lanes16(len - i);
    mx = _mm512_max_ps(mx, _mm512_andnot_ps(sign, _mm512_maskz_loadu_ps(m, x + i)));
  }
  const float top = _mm512_reduce_max_ps(mx);
  const __m512 inv = _mm512_set1_ps(top > 0.f ? 127.f / top : 0.f);
  __m512i sum = _mm512_setzero_si512();
  for (int64_t i = 0; i < len; i += 16) {
    const __mmask16 m = lanes16(len - i);
    __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + i), inv));
    v = _mm512_maskz_mov_epi32(m, _mm512_min_epi32(_mm512_max_epi32(v, lo), hi));
    sum = _mm512_add_epi32(sum, v);
    _mm_mask_storeu_epi8(q + i, m, _mm512_cvtsepi32_epi8(v));
  }
  *total = _mm512_reduce_add_epi32(sum);
  return top / 127.f;
}

// Where each 64-byte chunk of a packed row sends its codes: phase p of chunk c holds the p-th code of every byte
// (PER = 8 / BITS codes per byte), so the activations are laid out to match: out[(c * PER + p) * 64 + j] =
// q[c * 64 * PER + j * PER + p]. Lane l of vpdpbusd then sums codes [c * 64 * PER + 4 * PER * l, + 4 * PER).
template <int BITS>
void lay_out(const int8_t* q, int64_t chunks, int8_t* out) {
  constexpr int PER = 8 / BITS, CODES = 64 * PER;
  if (PER == 1) {
    std::copy(q, q + chunks * 64, out);
    return;
  }
#ifdef __AVX512VBMI__
  if (PER == 2) {
    alignas(64) int8_t even[64], odd[64];
    for (int j = 0; j < 64; ++j) even[j] = static_cast<int8_t>(2 * j), odd[j] = static_cast<int8_t>(2 * j + 1);
    const __m512i ie = _mm512_load_si512(even), io = _mm512_load_si512(odd);
    for (int64_t c = 0; c < chunks; ++c) {
      const __m512i a = _mm512_loadu_si512(q + c * CODES), b = _mm512_loadu_si512(q + c * CODES + 64);
      _mm512_storeu_si512(out + c * CODES, _mm512_permutex2var_epi8(a, ie, b));
      _mm512_storeu_si512(out + c * CODES + 64, _mm512_permutex2var_epi8(a, io, b));
    }
    return;
  }
#endif
  for (int64_t c = 0; c < chunks; ++c)
    for (int p = 0; p < PER; ++p)
      for (int j = 0; j < 64; ++j) out[(c * PER + p) * 64 + j] = q[c * CODES + j * PER + p];
}

// The activation side of the quads (ChunkPlan): within chunks [4Q, 4Q + 4), phase p, vector r's quarter i becomes
// chunk 4Q + i's quarter r (a 4 x 4 transpose of 16-byte blocks), as tile() assembles the weight's vectors.
void quad_layout(int8_t* out, int64_t quads, int per) {
  alignas(64) int8_t block[4][64];
  for (int64_t Q = 0; Q < quads; ++Q)
    for (int p = 0; p < per; ++p) {
      for (int i = 0; i < 4; ++i) std::copy_n(out + ((4 * Q + i) * per + p) * 64, 64, block[i]);
      for (int r = 0; r < 4; ++r)
        for (int i = 0; i < 4; ++i) std::copy_n(block[i] + 16 * r, 16, out + ((4 * Q + r) * per + p) * 64 + 16 * i);
    }
}

// Which weight group each lane of each chunk reads, and after which chunks the int32 sums meet the scales: a run of
// chunks that lie inside one group accumulates in int32 and is scaled once.
// Quads: where every chunk lies inside one group and a group spans at most two chunks (int4 g128, int2 g256, int8
// g64/g128), the sums would meet the scales after every chunk or two: as many float conversions and multiplies as
// dot products. There the leading whole chunks run four at a time, each vector holding a 16-byte quarter of each of
// the four chunks (so its lanes cover up to four groups), and the sums meet the scales once per four chunks.
struct ChunkPlan {
  std::vector<int32_t> lane;   // (chunks * 16,) lane's group relative to first[c]
  std::vector<int32_t> first;  // (chunks,)
  std::vector<uint8_t> flush;  // (chunks,) 1: scale and add the int32 sums after this chunk
  int64_t quads = 0;           // chunks [0, 4 * quads) run as quads
  std::vector<int32_t> qlane;  // (quads * 16,) lane's group relative to qfirst[q]
  std::vector<int32_t> qfirst; // (quads,)
};

ChunkPlan chunk_plan(int64_t K, int64_t gs, int64_t groups, int64_t chunks, int per, bool quads) {
  const int64_t codes = 64 * per;
  ChunkPlan p;
  if (quads && gs % codes == 0 && gs <= 2 * codes) {
    p.quads = K / codes / 4;  // whole chunks only (the last one may be masked)
    p.qlane.resize(p.quads * 16);
    p.qfirst.resize(p.quads);
    for (int64_t q = 0; q < p.quads; ++q) {
      p.qfirst[q] = static_cast<int32_t>(4 * q * codes / gs);
      for (int l = 0; l < 16; ++l) p.qlane[q * 16 + l] = static_cast<int32_t>((4 * q + l / 4) * codes / gs - p.qfirst[q]);
    }
  }
  p.lane.resize(chunks * 16);
  p.first.resize(chunks);
  p.flush.resize(chunks);
  std::vector<int64_t> single(chunks);
  for (int64_t c = 0; c < chunks; ++c) {
    p.first[c] = static_cast<int32_t>(std::min(c * codes / gs, groups - 1));
    for (int l = 0; l < 16; ++l)
      p.lane[c * 16 + l] = static_cast<int32_t>(std::min((c * codes + 4 * per * l) / gs, groups - 1) - p.first[c]);
    const int64_t last = std::min(groups - 1, std::min(K - 1, c * codes + codes - 1) / gs);
    single[c] = last == p.first[c] ? last : -1;
  }
  for (int64_t c = 0; c < chunks; ++c)
    p.flush[c] = c + 1 == chunks || single[c] < 0 || single[c] != single[c + 1];
  return p;
}

// One register tile: NB packed rows (`rows[i]`, fp32 scales `sw[i]`, padded by 16) times MB activation rows
// (`a`, `astride` bytes apart; per-group scales `ga`, `gstride` floats apart, or null) -> acc[i][j] (16 lanes each,
// summed by the caller).
template <int BITS, int NB, int MB>
inline void tile(const uint8_t* const* rows, const float* const* sw, const int8_t* a, int64_t astride, const float* ga,
                 int64_t gstride, int64_t chunks, __mmask64 tail, const ChunkPlan& plan, __m512 (&acc)[NB][MB]) {
  constexpr int PER = 8 / BITS;
  const __m512i mask = _mm512_set1_epi8(static_cast<char>((1 << BITS) - 1));
  __m512i isum[NB][MB];
  for (int i = 0; i < NB; ++i)
    for (int j = 0; j < MB; ++j) isum[i][j] = _mm512_setzero_si512(), acc[i][j] = _mm512_setzero_ps();
  // The int32 sums times each lane's group scales (lane -> group first + lanes[l]) into acc; sums reset.
  auto flush = [&](const int32_t* lane_groups, int32_t first) {
    const __m512i lanes = _mm512_loadu_si512(lane_groups);
    __m512 sa[MB];  // per-group activation scales (grouped rounding) or 1 (per-token: applied by the caller)
#pragma unroll
    for (int j = 0; j < MB; ++j)
      sa[j] = ga ? _mm512_permutexvar_ps(lanes, _mm512_loadu_ps(ga + j * gstride + first)) : _mm512_set1_ps(1.f);
#pragma unroll
    for (int i = 0; i < NB; ++i) {
      const __m512 s = _mm512_permutexvar_ps(lanes, _mm512_loadu_ps(sw[i] + first));
#pragma unroll
      for (int j = 0; j < MB; ++j) {
        acc[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[i][j]), ga ? _mm512_mul_ps(s, sa[j]) : s, acc[i][j]);
        isum[i][j] = _mm512_setzero_si512();
      }
    }
  };
  // One vector of codes per weight row against MB activation vectors (chunk-vector index cv: (c * PER + p) * 64).
  auto dot = [&](const __m512i (&b)[NB], int64_t cv) {
#pragma unroll
    for (int p = 0; p < PER; ++p) {
      __m512i v[NB];
#pragma unroll
      for (int i = 0; i < NB; ++i) v[i] = BITS == 8 ? b[i] : _mm512_and_si512(p ? _mm512_srli_epi16(b[i], p * BITS) : b[i], mask);
#pragma unroll
      for (int j = 0; j < MB; ++j) {
        const __m512i x = _mm512_loadu_si512(a + j * astride + (cv * PER + p) * 64);
#pragma unroll
        for (int i = 0; i < NB; ++i) isum[i][j] = _mm512_dpbusd_epi32(isum[i][j], v[i], x);
      }
    }
  };
  int64_t c = 0;
  for (int64_t q = 0; q < plan.quads; ++q, c += 4) {
#pragma GCC unroll 4  // the four vectors' loads and phases interleave (BENCHMARKS.md, ninth pass)
    for (int r = 0; r < 4; ++r) {  // vector r: quarter r of chunks c .. c + 3
      __m512i b[NB];
#pragma unroll
      for (int i = 0; i < NB; ++i) {
        const uint8_t* w = rows[i] + c * 64 + 16 * r;
        __m512i t = _mm512_castsi128_si512(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w)));
        t = _mm512_inserti32x4(t, _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 64)), 1);
        t = _mm512_inserti32x4(t, _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 128)), 2);
        b[i] = _mm512_inserti32x4(t, _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 192)), 3);
      }
      dot(b, c + r);
    }
    flush(plan.qlane.data() + q * 16, plan.qfirst[q]);
  }
  for (; c < chunks; ++c) {
    __m512i b[NB];
#pragma unroll
    for (int i = 0; i < NB; ++i)
      b[i] = c + 1 < chunks ? _mm512_loadu_si512(rows[i] + c * 64) : _mm512_maskz_loadu_epi8(tail, rows[i] + c * 64);
    dot(b, c);
    if (plan.flush[c]) flush(plan.lane.data() + c * 16, plan.first[c]);
  }
}

// The 16 horizontal sums of v[0..15] in one vector: lane 4k + e holds the sum of v[4e + k]. Four levels of
// shuffles and adds (45 instructions) instead of 16 separate reductions (~130).
inline __m512 reduce16(const __m512* v) {
  __m512 s1[8], s2[4], s3[2];
  for (int i = 0; i < 8; ++i)  // 256-bit halves: (a.l0 + a.l2, a.l1 + a.l3, b.l0 + b.l2, b.l1 + b.l3)
    s1[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44),
                          _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xEE));
  for (int i = 0; i < 4; ++i)  // 128-bit lane k: the 4-float partial sum of v[4i + k]
    s2[i] = _mm512_add_ps(_mm512_shuffle_f32x4(s1[2 * i], s1[2 * i + 1], 0x88),
                          _mm512_shuffle_f32x4(s1[2 * i], s1[2 * i + 1], 0xDD));
  for (int i = 0; i < 2; ++i)  // lane k: 2-float partials of v[8i + k], v[8i + 4 + k]
    s3[i] = _mm512_add_ps(_mm512_shuffle_ps(s2[2 * i], s2[2 * i + 1], 0x88),
                          _mm512_shuffle_ps(s2[2 * i], s2[2 * i + 1], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_ps(s3[0], s3[1], 0x88), _mm512_shuffle_ps(s3[0], s3[1], 0xDD));
}

struct Problem {
  int64_t M, N, row_bytes, groups, chunks, astride;
  const uint8_t* codes;
  const at::Half* scales;
  const uint8_t* zeros;   // (rows, groups) or null: offset
  bool shared;
  float offset;
  const int8_t* aq;       // (M, astride) laid-out activation codes
  const float* as;        // (M,) s_a per token (1 with per-group scales)
  const float* ga;        // (M, groups + 16) per-group activation scales, or null (per token)
  const float* asum;      // (M, groups) each row's codes summed per group (times its group's scale if ga)
  float* y;               // (M, N)
};

// Rows [n0, n0 + NB) of W against activation rows [m0, m1) in blocks of MB.
template <int BITS, int NB, int MB>
void rows_block(const Problem& P, const ChunkPlan& plan, int64_t n0, int64_t m0, int64_t m1, std::vector<float>& sw) {
  const int64_t stride = P.groups + 16;
  const uint8_t* rows[NB];
  const float* swp[NB];
  const float* zsp[NB];  // s_w[n, g] * z[n, g]: the zero point's share per unit of a group's code sum
  for (int i = 0; i < NB; ++i) {
    const int64_t n = n0 + i, srow = P.shared ? 0 : n * P.groups;
    rows[i] = P.codes + n * P.row_bytes;
    float* s = sw.data() + 2 * i * stride;
    float* zs = s + stride;
    for (int64_t g = 0; g < P.groups; ++g) {
      s[g] = float(P.scales[srow + g]);
      zs[g] = s[g] * (P.zeros ? float(P.zeros[srow + g]) : P.offset);
    }
    swp[i] = s;
    zsp[i] = zs;
  }
  const int64_t tail = P.row_bytes - (P.chunks - 1) * 64;
  const __mmask64 tail_mask = tail >= 64 ? ~__mmask64(0) : ((__mmask64(1) << tail) - 1);
  for (int64_t m = m0; m < m1; m += MB) {
    __m512 acc[NB][MB];
    const float* ga = P.ga ? P.ga + m * (P.groups + 16) : nullptr;
    tile<BITS, NB, MB>(rows, swp, P.aq + m * P.astride, P.astride, ga, P.groups + 16, P.chunks, tail_mask, plan, acc);
    // Less the zero point's share, sum_g zs[n, g] * asum[m, g], lane-wise before the horizontal sums.
    for (int64_t g = 0; g < P.groups; g += 16) {
      const __mmask16 gm = lanes16(P.groups - g);
#pragma unroll
      for (int j = 0; j < MB; ++j) {
        const __m512 as = _mm512_maskz_loadu_ps(gm, P.asum + std::min(m + j, P.M - 1) * P.groups + g);
#pragma unroll
        for (int i = 0; i < NB; ++i) acc[i][j] = _mm512_fnmadd_ps(_mm512_maskz_loadu_ps(gm, zsp[i] + g), as, acc[i][j]);
      }
    }
    float sums[NB][MB];
    if constexpr (NB == 4 && MB == 4) {  // 16 horizontal sums at once (a K = 512 row's tile spent a third on them)
      alignas(64) float r[16];
      _mm512_store_ps(r, reduce16(&acc[0][0]));
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j) sums[i][j] = r[4 * j + i];
    } else {
      for (int i = 0; i < NB; ++i)
        for (int j = 0; j < MB; ++j) sums[i][j] = _mm512_reduce_add_ps(acc[i][j]);
    }
    for (int i = 0; i < NB; ++i)
      for (int j = 0; j < MB && m + j < P.M; ++j) P.y[(m + j) * P.N + n0 + i] = P.as[m + j] * sums[i][j];
  }
}

constexpr int TILE_N = 4, TILE_M = 4;  // register tile: weight rows x activation rows (3x8, 4x5, 2x8 measured no better)

template <int BITS>
void gemm(const Problem& P, const ChunkPlan& plan) {
  const int64_t blocks = (P.N + TILE_N - 1) / TILE_N;
  // Activation rows per pass: a panel that stays in a core's L2 (about 256 KiB) while every weight row meets it.
  const int64_t panel = std::max<int64_t>(TILE_M, (int64_t(1) << 18) / std::max<int64_t>(1, P.astride) / TILE_M * TILE_M);
  for (int64_t p0 = 0; p0 < P.M; p0 += panel) {
    const int64_t p1 = std::min(P.M, p0 + panel);
    const int64_t full = p0 + (p1 - p0) / TILE_M * TILE_M;  // rows in whole tiles; the rest one at a time
    at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
      std::vector<float> sw(2 * TILE_N * (P.groups + 16), 0.f);
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t n0 = b * TILE_N;
        if (n0 + TILE_N <= P.N) {
          rows_block<BITS, TILE_N, TILE_M>(P, plan, n0, p0, full, sw);
          rows_block<BITS, TILE_N, 1>(P, plan, n0, full, p1, sw);
        } else {
          for (int64_t n = n0; n < P.N; ++n) {
            rows_block<BITS, 1, TILE_M>(P, plan, n, p0, full, sw);
            rows_block<BITS, 1, 1>(P, plan, n, full, p1, sw);
          }
        }
      }
    });
  }
}

#endif  // LOWBIT_INT_GEMM

}  // namespace

bool vnni_applies(int64_t bits, int64_t group_size, bool table);  // csrc/qgemv.cpp: the one rule for both files
bool int8_x_applies(int64_t bits, int64_t group_size, bool table);
torch::Tensor qgemm_i8_avx2(const torch::Tensor& x, const torch::Tensor& codes, const torch::Tensor& scales,
                            const c10::optional<torch::Tensor>& zeros, int64_t bits, int64_t group_size,
                            int64_t offset);
torch::Tensor qgemm_i8_tiles(const torch::Tensor& x, const torch::Tensor& codes, const torch::Tensor& scales,
                             const c10::optional<torch::Tensor>& zeros, int64_t bits, int64_t group_size,
                             int64_t offset);  // csrc/gemm_i8.cpp
bool gemm_i8_tiles_built();
torch::Tensor qgemm_act_tiles(const torch::Tensor& x, const torch::Tensor& codes, const torch::Tensor& scales,
                              const c10::optional<torch::Tensor>& zeros, int64_t bits, int64_t group_size,
                              int64_t offset, int64_t act_bits, double clip_ratio);

// From this many rows an AVX2 build's qgemm_i8 runs csrc/gemm_i8.cpp's tile GEMM (the weight unpacked once into
// int8 tiles), below it the decode kernel's 4-row tiles. The tile GEMM's time over theirs (2 threads, int4 g128
// and int2 g64): at 4 rows 0.4-0.7x on SmolLM2's layers, 0.9-1.06x on a 1B shape's 8192 x 2048; at 2-3 rows
// 0.5-1.1x on SmolLM2's, 1.4-1.6x on the 1B shape's (unpacking the weight into tiles is not yet paid back).
constexpr int64_t kTileGemmRows = 4;

// Codes and scales of quantize_per_token (symmetric): x (M, K) fp32 (rows may be strided) -> (codes int8 (M, K),
// scale (M, 1)). The many-row GEMM of kernels/cpu.py multiplies these codes with oneDNN's int8 GEMM, an AVX2
// build's qgemm_act with csrc/gemm_i8.cpp's tiles.
std::vector<torch::Tensor> act_codes(torch::Tensor x, int64_t act_bits, double clip_ratio) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.stride(1) == 1 && x.stride(0) >= x.size(1),
              "x must be fp32 (M, K) with contiguous rows");
  TORCH_CHECK(act_bits >= 2 && act_bits <= 8, "act_bits must be 2..8");
  const int64_t M = x.size(0), K = x.size(1);
  auto q = torch::empty({M, K}, x.options().dtype(torch::kInt8));
  auto s = torch::empty({M, 1}, x.options());
  const int qmax = (1 << (act_bits - 1)) - 1;
  const float* xp = x.data_ptr<float>();
  float* sp = s.data_ptr<float>();
  int8_t* qp = q.data_ptr<int8_t>();
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) sp[m] = quantize_row(xp + m * x.stride(0), K, qmax, float(clip_ratio), qp + m * K);
  });
  return {q, s};
}

namespace {

// Checks the packed weight's tensors against x (M, K) (rows may be strided: a slice of a wider input).
void check_weight(const torch::Tensor& x, const torch::Tensor& codes, const torch::Tensor& scales,
                  const c10::optional<torch::Tensor>& zeros, int64_t bits, int64_t group_size) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.stride(1) == 1 && x.stride(0) >= x.size(1),
              "x must be fp32 (M, K) with contiguous rows");
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == torch::kUInt8 && codes.is_contiguous(), "codes must be uint8 (N, row_bytes)");
  TORCH_CHECK(scales.dim() == 2 && scales.scalar_type() == torch::kFloat16 && scales.is_contiguous(), "scales must be fp16 (rows, groups)");
  const int64_t K = x.size(1), groups = scales.size(1);
  TORCH_CHECK(group_size > 0 && groups == (K + group_size - 1) / group_size && codes.size(1) == (K * bits + 7) / 8,
              "x, codes and scales do not match");
  TORCH_CHECK(!zeros.has_value() || (zeros->scalar_type() == torch::kUInt8 && zeros->is_contiguous() &&
                                      zeros->sizes() == scales.sizes()), "zeros must be uint8 like scales");
}

// Rounds x (M, K) to int8 codes laid out for BITS-bit packed rows and multiplies them with the weight. act_bits > 0:
// one scale per token (quantize_row); act_bits == 0: one scale per row and weight group, s = max|x_g| / 127,
// q = clamp(round(x * 127 / max|x_g|), -127, 127), as qgemv's int8 decode path rounds a row (llama.cpp's Q8).
torch::Tensor run(const torch::Tensor& x, const torch::Tensor& codes, const torch::Tensor& scales,
                  const c10::optional<torch::Tensor>& zeros,
                  int64_t bits, int64_t group_size, int64_t offset, int64_t act_bits, double clip_ratio) {
  const int64_t M = x.size(0), K = x.size(1), N = codes.size(0), row_bytes = codes.size(1), groups = scales.size(1);
  auto y = torch::empty({M, N}, x.options());
#ifdef LOWBIT_INT_GEMM
  const int per = 8 / int(bits);
  const int64_t chunks = (row_bytes + 63) / 64, astride = chunks * 64 * per;
  const int64_t gstride = groups + 16;
  const bool grouped = act_bits == 0;
  // Reused across calls (a prefill makes ~200 of them): fresh multi-MB buffers would fault in their pages each time.
  // Every byte the GEMM reads is written below (rows are laid out whole, padding included).
  // (References, not the thread_local names, inside the parallel loops: those would name each worker's own.)
  static thread_local std::vector<int8_t> aq_buf;
  static thread_local std::vector<float> as_buf, asum_buf, ga_buf;
  std::vector<int8_t>& aq = aq_buf;
  std::vector<float>&as = as_buf, &asum = asum_buf, &ga = ga_buf;
  aq.resize(M * astride);
  as.assign(M, 1.f);
  asum.resize(M * groups);
  ga.resize(grouped ? M * gstride : 0);
  const int qmax = grouped ? 127 : (1 << (act_bits - 1)) - 1;
  // Quads only where four-row tiles run: a one-row tile spends more assembling the quarters than it saves.
  const ChunkPlan plan = chunk_plan(K, group_size, groups, chunks, per, M >= TILE_M);
  const float* xp = x.data_ptr<float>();
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    std::vector<int8_t> q(astride, 0);  // natural order, zero padded to whole chunks
    for (int64_t m = m0; m < m1; ++m) {
      const float* xr = xp + m * x.stride(0);
      if (!grouped) as[m] = quantize_row(xr, K, qmax, float(clip_ratio), q.data());
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t k0 = g * group_size, len = std::min(group_size, K - k0);
        float s = 1.f;
        int32_t total;
        if (grouped)
          s = ga[m * gstride + g] = round_group(xr + k0, len, q.data() + k0, &total);
        else
          total = code_sum(q.data() + k0, len);
        asum[m * groups + g] = s * float(total);
      }
      int8_t* out = aq.data() + m * astride;
      switch (bits) {
        case 1: lay_out<1>(q.data(), chunks, out); break;
        case 2: lay_out<2>(q.data(), chunks, out); break;
        case 4: lay_out<4>(q.data(), chunks, out); break;
        default: lay_out<8>(q.data(), chunks, out); break;
      }
      quad_layout(out, plan.quads, per);
    }
  });
  Problem P{M, N, row_bytes, groups, chunks, astride, codes.data_ptr<uint8_t>(),
            scales.data_ptr<at::Half>(), zeros.has_value() ? zeros->data_ptr<uint8_t>() : nullptr,
            scales.size(0) == 1 && N != 1, float(offset), aq.data(), as.data(), grouped ? ga.data() : nullptr,
            asum.data(), y.data_ptr<float>()};
  switch (bits) {
    case 1: gemm<1>(P, plan); break;
    case 2: gemm<2>(P, plan); break;
    case 4: gemm<4>(P, plan); break;
    default: gemm<8>(P, plan); break;
  }
#endif
  return y;
}

}  // namespace

// y = Q(x) W^T (see the top of this file) for x (M, K) fp32, any M: activations quantized per token.
// On an AVX2 build (no VNNI): csrc/gemm_i8.cpp's tile GEMM, codes of 1, 2 or 4 bits.
torch::Tensor qgemm_act(torch::Tensor x, torch::Tensor codes, torch::Tensor scales, c10::optional<torch::Tensor> zeros,
                        int64_t bits, int64_t group_size, int64_t offset, int64_t act_bits, double clip_ratio) {
  check_weight(x, codes, scales, zeros, bits, group_size);
  TORCH_CHECK(act_bits >= 2 && act_bits <= 8, "qgemm_act takes 2-8 bit activations");
#ifdef LOWBIT_INT_GEMM
  TORCH_CHECK(vnni_applies(bits, group_size, false), "qgemm_act needs 1, 2, 4 or 8-bit integer codes in whole lanes");
  return run(x, codes, scales, zeros, bits, group_size, offset, act_bits, clip_ratio);
#else
  TORCH_CHECK(gemm_i8_tiles_built() && int8_x_applies(bits, group_size, false), "qgemm_act needs AVX512-VNNI, or "
              "AVX2 and 1, 2 or 4-bit integer codes in whole lanes");
  return qgemm_act_tiles(x, codes, scales, zeros, bits, group_size, offset, act_bits, clip_ratio);
#endif
}

// y = x W^T for fp32 rows of a weight-only layer (small batches; on AVX2 builds any number of rows): each row
// rounded to int8 per weight group exactly as the int8 decode GEMV rounds one row, so every row keeps that
// kernel's error bound.
torch::Tensor qgemm_i8(torch::Tensor x, torch::Tensor codes, torch::Tensor scales, c10::optional<torch::Tensor> zeros,
                       int64_t bits, int64_t group_size, int64_t offset) {
  check_weight(x, codes, scales, zeros, bits, group_size);
  TORCH_CHECK(int8_x_applies(bits, group_size, false), "qgemm_i8 needs integer codes in whole lanes the int8 GEMV takes (int8_x_applies)");
#ifdef LOWBIT_INT_GEMM
  return run(x, codes, scales, zeros, bits, group_size, offset, 0, 1.0);
#else  // an AVX2 build: each row rounded alike; a few rows meet tiles of the packed weight 4 at a time
  // (csrc/qgemv.cpp), more rows an int8 copy of each 16-column tile of it (csrc/gemm_i8.cpp)
  if (gemm_i8_tiles_built() && x.size(0) >= kTileGemmRows)
    return qgemm_i8_tiles(x, codes, scales, zeros, bits, group_size, offset);
  return qgemm_i8_avx2(x, codes, scales, zeros, bits, group_size, offset);
#endif
}

namespace {

// One packed row's K codes minus z into o (whole bytes first: a loop the compiler vectorizes).
template <int BITS>
void unpack_row(const uint8_t* row, int64_t K, int z, int8_t* o) {
  constexpr int PER = 8 / BITS, MASK = (1 << BITS) - 1;
  const int64_t whole = K / PER;
  for (int64_t j = 0; j < whole; ++j) {
    const int b = row[j];
    for (int p = 0; p < PER; ++p) o[j * PER + p] = static_cast<int8_t>(((b >> (p * BITS)) & MASK) - z);
  }
  for (int64_t k = whole * PER; k < K; ++k) o[k] = static_cast<int8_t>(((row[whole] >> ((k - whole * PER) * BITS)) & MASK) - z);
}

}  // namespace

// Rows [r0, r1) of a packed weight with one zero point per row (channel or tensor granularity) as int8 codes minus
// their zero point, q - z (in int8 for codes of up to 4 bits, or symmetric 8-bit ones): the tile
// kernels/cpu.py's many-row integer GEMM multiplies (oneDNN's int8 x int8 -> int32) and scales per row afterwards.
void unpack_int8(torch::Tensor codes, c10::optional<torch::Tensor> zeros, int64_t bits, int64_t offset, int64_t r0,
                 int64_t r1, torch::Tensor out) {
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == torch::kUInt8 && codes.is_contiguous(), "codes must be uint8 (N, row_bytes)");
  TORCH_CHECK(bits == 1 || bits == 2 || bits == 4 || bits == 8, "unpack_int8 takes 1, 2, 4 or 8-bit codes");
  TORCH_CHECK(out.dim() == 2 && out.scalar_type() == torch::kInt8 && out.is_contiguous() && out.size(0) == r1 - r0, "out must be int8 (r1 - r0, K)");
  TORCH_CHECK(0 <= r0 && r0 <= r1 && r1 <= codes.size(0), "rows out of range");
  const int64_t K = out.size(1), row_bytes = codes.size(1);
  TORCH_CHECK(row_bytes == (K * bits + 7) / 8, "codes do not match K and bits");
  const uint8_t* zp = nullptr;
  if (zeros.has_value()) {
    TORCH_CHECK(zeros->scalar_type() == torch::kUInt8 && zeros->is_contiguous() &&
                (zeros->numel() == codes.size(0) || zeros->numel() == 1), "zeros must be uint8, one per row or one");
    zp = zeros->data_ptr<uint8_t>();
  }
  const bool shared = zp && zeros->numel() == 1 && codes.size(0) != 1;
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  int8_t* op = out.data_ptr<int8_t>();
  at::parallel_for(r0, r1, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const int z = zp ? int(zp[shared ? 0 : n]) : int(offset);
      const uint8_t* row = cp + n * row_bytes;
      int8_t* o = op + (n - r0) * K;
      switch (bits) {
        case 1: unpack_row<1>(row, K, z, o); break;
        case 2: unpack_row<2>(row, K, z, o); break;
        case 4: unpack_row<4>(row, K, z, o); break;
        default: unpack_row<8>(row, K, z, o); break;
      }
    }
  });
}
