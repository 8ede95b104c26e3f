// lowbit CPU decode kernel: y = x @ W^T for one input row, W bit-packed (layout lsb-rows-v1, see
// lowbit/formats/packing.py). Each group of codes is unpacked into a small float buffer and dotted with the
// matching slice of x; the packed weight is read once and no dequantized copy of W is ever written.
//   int formats:      y_n = sum_g s_ng * (sum_k q_k x_k - z_ng * sum_k x_k)     (z = offset for symmetric)
//   codebook formats: y_n = sum_g s_ng * sum_k levels[q_k] x_k
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

// Unpack `len` codes of `bits` bits starting at the byte-aligned `row` into `out` (as floats, or as level
// values when `lut` is given). `avail` is the number of readable bytes from `row`.
template <int BITS>
inline void unpack_group(const uint8_t* row, int64_t len, int64_t avail, const float* lut, float* out) {
  constexpr int MASK = (1 << BITS) - 1;
  if constexpr (BITS == 8) {
    for (int64_t i = 0; i < len; ++i) out[i] = lut ? lut[row[i]] : float(row[i]);
  } else if constexpr (8 % BITS == 0) {
    constexpr int PER = 8 / BITS;
    const int64_t nbytes = (len + PER - 1) / PER;
    for (int64_t j = 0; j < nbytes; ++j) {
      const int b = row[j];
      for (int i = 0; i < PER; ++i) {
        const int q = (b >> (i * BITS)) & MASK;
        out[j * PER + i] = lut ? lut[q] : float(q);
      }
    }
  } else {
    for (int64_t i = 0; i < len; ++i) {
      const int64_t bit = i * BITS;
      const int64_t byte = bit >> 3;
      int v = row[byte];
      if (byte + 1 < avail) v |= int(row[byte + 1]) << 8;
      const int q = (v >> (bit & 7)) & MASK;
      out[i] = lut ? lut[q] : float(q);
    }
  }
}

template <int BITS>
void gemv_rows(const float* x, const float* xsum, const uint8_t* codes, int64_t row_bytes, const at::Half* scales,
               const uint8_t* zeros, bool shared_scales, const float* lut, float offset, int64_t K,
               int64_t group_size, int64_t groups, int64_t n0, int64_t n1, float* y) {
  std::vector<float> buf(group_size + 8);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = codes + n * row_bytes;
    const int64_t srow = shared_scales ? 0 : n * groups;
    float acc_row = 0.f;
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t k0 = g * group_size;
      const int64_t len = std::min(group_size, K - k0);
      const int64_t b0 = (k0 * BITS) / 8;  // group starts are byte aligned: group_size % 8 == 0
      unpack_group<BITS>(row + b0, len, row_bytes - b0, lut, buf.data());
      const float* xg = x + k0;
      float acc = 0.f;
#pragma omp simd reduction(+ : acc)
      for (int64_t i = 0; i < len; ++i) acc += buf[i] * xg[i];
      const float s = float(scales[srow + g]);
      if (lut) {
        acc_row += s * acc;
      } else {
        const float z = zeros ? float(zeros[srow + g]) : offset;
        acc_row += s * (acc - z * xsum[g]);
      }
    }
    y[n] = acc_row;
  }
}

// One activation row rounded to int8 for the int8-activation GEMV (the VNNI and AVX2 blocks below fill it; a chunk
// is kChunkBytes of a packed row: 64 with VNNI, 32 with AVX2, one lane per 4 bytes).
struct QuantizedX {
  std::vector<int8_t> q;      // (chunks * PER * kChunkBytes,) the rounded x laid out by phase
  std::vector<float> scale;   // (groups + 16,) s_x per group, zero padded
  std::vector<float> sum;     // (groups + 16,) s_x * sum of the group's rounded values (the zero point's share)
  std::vector<int32_t> lane;  // (chunks * kChunkBytes / 4,) each lane's group, relative to the chunk's first group
  std::vector<int32_t> first; // (chunks,) the chunk's first group
};

// The ISA-independent half of rounding a row: the rounded values `lin` (k order, zero padded to whole chunks) laid
// out by phase (phase p of chunk c holds the p-th code of each of its CHUNK bytes), and each lane's group.
template <int BITS, int CHUNK>
void lay_out_by_phase(QuantizedX& r, const int8_t* lin, int64_t gs, int64_t groups, int64_t chunks) {
  constexpr int PER = 8 / BITS, CODES = CHUNK * PER, LANES = CHUNK / 4;
  for (int64_t c = 0; c < chunks; ++c)
    for (int p = 0; p < PER; ++p) {
      int8_t* dst = r.q.data() + (c * PER + p) * CHUNK;
      for (int j = 0; j < CHUNK; ++j) dst[j] = lin[c * CODES + j * PER + p];
    }
  for (int64_t c = 0; c < chunks; ++c) {
    r.first[c] = static_cast<int32_t>(c * CODES / gs);
    for (int l = 0; l < LANES; ++l) {
      const int64_t g = std::min<int64_t>((c * CODES + 4 * PER * l) / gs, groups - 1);
      r.lane[c * LANES + l] = static_cast<int32_t>(g - r.first[c]);
    }
  }
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#include <cstring>
#include <type_traits>
#define LOWBIT_AVX512 1

// ---- AVX-512 path: 16 weights per step, never a dequantized buffer -------------------------------------------
// The first min(n, 16) of 16 lanes (n >= 1): the mask of a 16-wide step with n values left.
inline __mmask16 lanes16(int64_t n) {
  return n >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << n) - 1);
}

// 16 codes of BITS bits starting at byte p (byte aligned; chunks start at multiples of 8 codes), as int32 lanes.
// `avail` = readable bytes from p to the end of the codes tensor: near the end the bytes are copied first.
template <int BITS>
inline __m512i codes16(const uint8_t* p, int64_t avail) {
  if constexpr (BITS == 8) {
    __m128i b;
    if (avail >= 16) {
      b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    } else {
      alignas(16) uint8_t t[16] = {0};
      std::memcpy(t, p, avail);
      b = _mm_load_si128(reinterpret_cast<const __m128i*>(t));
    }
    return _mm512_cvtepu8_epi32(b);
  } else if constexpr (BITS == 3) {  // 16 codes = 6 bytes: shift a 64-bit word per lane
    uint64_t v = 0;
    if (avail >= 8) std::memcpy(&v, p, 8);  // constant size: one load
    else if (avail > 0) std::memcpy(&v, p, avail);
    const __m512i w = _mm512_set1_epi64(static_cast<long long>(v));
    const __m512i lo = _mm512_srlv_epi64(w, _mm512_setr_epi64(0, 3, 6, 9, 12, 15, 18, 21));
    const __m512i hi = _mm512_srlv_epi64(w, _mm512_setr_epi64(24, 27, 30, 33, 36, 39, 42, 45));
    const __m512i c = _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi64_epi32(lo)),
                                         _mm512_cvtepi64_epi32(hi), 1);
    return _mm512_and_si512(c, _mm512_set1_epi32(7));
  } else {  // 1, 2, 4 bits: 16 codes = 2·BITS bytes; lane i takes byte i / (8/BITS), shifted by its slot
    static_assert(BITS == 1 || BITS == 2 || BITS == 4, "1, 2, 3, 4 or 8 bits");
    constexpr int PER = 8 / BITS, NB = 2 * BITS;
    using Word = std::conditional_t<NB == 2, uint16_t, std::conditional_t<NB == 4, uint32_t, uint64_t>>;
    uint64_t v = 0;
    if (avail >= NB) {  // one load of exactly the bytes needed (a wider partial store would stall the load)
      Word word;
      std::memcpy(&word, p, NB);
      v = word;
    } else if (avail > 0) {
      std::memcpy(&v, p, avail);
    }
    const __m128i bytes = _mm_cvtsi64_si128(static_cast<long long>(v));
    const __m128i spread = _mm_shuffle_epi8(bytes, _mm_setr_epi8(0 / PER, 1 / PER, 2 / PER, 3 / PER, 4 / PER, 5 / PER,
                                                                 6 / PER, 7 / PER, 8 / PER, 9 / PER, 10 / PER,
                                                                 11 / PER, 12 / PER, 13 / PER, 14 / PER, 15 / PER));
    const __m512i shifts = _mm512_setr_epi32(0 % PER * BITS, 1 % PER * BITS, 2 % PER * BITS, 3 % PER * BITS,
                                             4 % PER * BITS, 5 % PER * BITS, 6 % PER * BITS, 7 % PER * BITS,
                                             8 % PER * BITS, 9 % PER * BITS, 10 % PER * BITS, 11 % PER * BITS,
                                             12 % PER * BITS, 13 % PER * BITS, 14 % PER * BITS, 15 % PER * BITS);
    const __m512i c = _mm512_srlv_epi32(_mm512_cvtepu8_epi32(spread), shifts);
    return _mm512_and_si512(c, _mm512_set1_epi32((1 << BITS) - 1));
  }
}

// How codes become values: integers, a table of <= 16 levels in one register, or a larger table (gather).
enum class Decode { Int, Table16, Gather };

using Table = __m512;  // <= 16 levels in one register

inline Table load_table(const float* lut, int levels) {
  alignas(64) float t[16] = {0};
  std::memcpy(t, lut, sizeof(float) * std::min(16, levels));
  return _mm512_load_ps(t);
}

template <Decode D>
inline __m512 decode16(__m512i q, __m512 table, const float* lut) {
  if constexpr (D == Decode::Int) return _mm512_cvtepi32_ps(q);
  else if constexpr (D == Decode::Table16) return _mm512_permutexvar_ps(q, table);
  else return _mm512_i32gather_ps(q, lut, 4);
}

// sum_g scale_g * sum_{k in g} value(q_k) x_k for one packed row; groups of `gs` codes (a multiple of 8).
template <int BITS, Decode D>
inline float row_dot(const uint8_t* row, int64_t avail, const float* x, int64_t K, int64_t gs,
                     const at::Half* scales, Table table, const float* lut) {
  __m512 acc_row = _mm512_setzero_ps();
  for (int64_t k0 = 0, g = 0; k0 < K; k0 += gs, ++g) {
    const int64_t len = std::min(gs, K - k0);
    __m512 acc = _mm512_setzero_ps(), acc2 = _mm512_setzero_ps();  // two chains hide the FMA latency
    int64_t k = 0;
    for (; k + 32 <= len; k += 32) {
      const int64_t b = (k0 + k) * BITS / 8, b2 = (k0 + k + 16) * BITS / 8;
      const __m512 v = decode16<D>(codes16<BITS>(row + b, avail - b), table, lut);
      const __m512 v2 = decode16<D>(codes16<BITS>(row + b2, avail - b2), table, lut);
      acc = _mm512_fmadd_ps(v, _mm512_loadu_ps(x + k0 + k), acc);
      acc2 = _mm512_fmadd_ps(v2, _mm512_loadu_ps(x + k0 + k + 16), acc2);
    }
    acc = _mm512_add_ps(acc, acc2);
    for (; k + 16 <= len; k += 16) {
      const int64_t b = (k0 + k) * BITS / 8;
      const __m512 v = decode16<D>(codes16<BITS>(row + b, avail - b), table, lut);
      acc = _mm512_fmadd_ps(v, _mm512_loadu_ps(x + k0 + k), acc);
    }
    if (k < len) {  // 8..15 codes left (len is a multiple of 8 except at the row's end)
      const __mmask16 m = lanes16(len - k);
      const int64_t b = (k0 + k) * BITS / 8;
      const __m512 v = decode16<D>(codes16<BITS>(row + b, avail - b), table, lut);
      acc = _mm512_fmadd_ps(v, _mm512_maskz_loadu_ps(m, x + k0 + k), acc);
    }
    acc_row = _mm512_fmadd_ps(_mm512_set1_ps(float(scales[g])), acc, acc_row);
  }
  return _mm512_reduce_add_ps(acc_row);
}

// The zero point's share of one output, sum_g s_g * z_g * xsum_g (z_g = offset for symmetric codes), 16 groups
// a step: `scales` and `zeros` point at the row's groups.
inline float zero_point_share(const at::Half* scales, const uint8_t* zeros, float offset, const float* xsum,
                              int64_t groups) {
  __m512 corr = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; g += 16) {
    const __mmask16 m = lanes16(groups - g);
    const __m512 s = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, scales + g));
    const __m512 z = zeros ? _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m, zeros + g)))
                           : _mm512_set1_ps(offset);
    corr = _mm512_fmadd_ps(_mm512_mul_ps(s, z), _mm512_maskz_loadu_ps(m, xsum + g), corr);
  }
  return _mm512_reduce_add_ps(corr);
}

#endif  // AVX-512

#if defined(LOWBIT_AVX512) && defined(__AVX512VNNI__)
#define LOWBIT_VNNI 1
constexpr int64_t kChunkBytes = 64;  // bytes of a row per chunk (one zmm)
// ---- int8-activation path (VNNI): 64 codes x 64 int8 activations per instruction ---------------------------
// x is rounded to int8 per weight group (symmetric, s_x[g] = max|x_g| / 127), as llama.cpp's Q8 dot products
// round it, and laid out for the packed bytes: a row is read in chunks of 64 bytes (64 * PER codes, PER = 8 /
// BITS); phase p of a chunk holds the p-th code of every byte, so xq[(c * PER + p) * 64 + j] = round(x[k] / s_x)
// for k = c * 64 * PER + j * PER + p. Lane l of vpdpbusd sums bytes 4l..4l+3, i.e. codes
// [c * 64 * PER + 4 * PER * l, + 4 * PER): one weight group when group_size % (4 * PER) == 0, whose combined scale
// s_w[g] * s_x[g] the lane takes through a permute. The zero point's share uses the same rounded x, so the
// result is sum_g s_w[g] * sum_k (q_k - z_g) * s_x[g] * xq_k up to fp32 rounding.

// Fills the calling thread's reusable buffers (a decode step calls this ~200 times per token: no allocations). It
// runs before the rows split across threads, so it is vectorized: each group's rounding 16 values a step into a
// linear buffer (round to nearest even, as nearbyint), then one pass lays the bytes out by phase.
template <int BITS>
const QuantizedX& quantize_x(const float* x, int64_t K, int64_t gs, int64_t groups, int64_t chunks) {
  constexpr int PER = 8 / BITS, CODES = 64 * PER;
  static thread_local QuantizedX r;
  static thread_local std::vector<int8_t> lin;  // (chunks * CODES,) the rounded x in k order, zero padded
  r.q.resize(chunks * PER * 64);
  lin.assign(chunks * CODES, 0);
  r.scale.assign(groups + 16, 0.f);
  r.sum.assign(groups + 16, 0.f);
  r.lane.resize(chunks * 16);
  r.first.resize(chunks);
  const __m512 sign = _mm512_set1_ps(-0.f);
  const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t k0 = g * gs, len = std::min(K, k0 + gs) - k0;
    __m512 mx = _mm512_setzero_ps();
    for (int64_t i = 0; i < len; i += 16) {
      const __mmask16 m = lanes16(len - i);
      mx = _mm512_max_ps(mx, _mm512_andnot_ps(sign, _mm512_maskz_loadu_ps(m, x + k0 + i)));
    }
    const float top = _mm512_reduce_max_ps(mx);
    r.scale[g] = top / 127.f;
    const __m512 inv = _mm512_set1_ps(top > 0.f ? 127.f / top : 0.f);
    __m512i total = _mm512_setzero_si512();
    for (int64_t i = 0; i < len; i += 16) {
      const __mmask16 m = lanes16(len - i);
      __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + k0 + i), inv));
      v = _mm512_maskz_mov_epi32(m, _mm512_min_epi32(_mm512_max_epi32(v, lo), hi));
      total = _mm512_add_epi32(total, v);
      _mm_mask_storeu_epi8(lin.data() + k0 + i, m, _mm512_cvtsepi32_epi8(v));
    }
    r.sum[g] = static_cast<float>(_mm512_reduce_add_epi32(total)) * r.scale[g];
  }
  lay_out_by_phase<BITS, kChunkBytes>(r, lin.data(), gs, groups, chunks);
  return r;
}

// cs[g] = s_w[n, g] * s_x[g] for one row's groups (cs is zero padded by the caller for the 16-wide loads).
inline void combined_scales(const QuantizedX& xq, const at::Half* row_scales, int64_t groups, float* cs) {
  for (int64_t g = 0; g < groups; g += 16) {  // 16 groups a step: at 2 bits g64 a row has a group per 16 bytes
    const __mmask16 m = lanes16(groups - g);
    _mm512_mask_storeu_ps(cs + g, m, _mm512_mul_ps(_mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, row_scales + g)),
                                                   _mm512_maskz_loadu_ps(m, xq.scale.data() + g)));
  }
}

// The 16 lanes' int32 sums of one 64-byte chunk of codes `b` times the chunk's int8 activations `xc` (PER phases of
// 64 bytes each, laid out by quantize_x).
template <int BITS>
inline __m512i chunk_dot(__m512i b, const int8_t* xc) {
  constexpr int PER = 8 / BITS;
  const __m512i mask = _mm512_set1_epi8(static_cast<char>((1 << BITS) - 1));
  __m512i dot = _mm512_setzero_si512();
#pragma unroll
  for (int p = 0; p < PER; ++p) {
    const __m512i v = BITS == 8 ? b : _mm512_and_si512(p ? _mm512_srli_epi16(b, p * BITS) : b, mask);
    dot = _mm512_dpbusd_epi32(dot, v, _mm512_loadu_si512(xc + p * 64));
  }
  return dot;
}

// The rows [n0, n1) of y = W x with int8 x: per row, the combined scales, then each 64-byte chunk's 16 lane sums
// times the 16 lanes' combined scales, which `chunk_scales(c, cs)` returns; the last chunk (masked to the row's
// bytes) is peeled off the loop.
template <int BITS, class ChunkScales>
void gemv_rows_vnni_with(const QuantizedX& xq, const uint8_t* codes, int64_t row_bytes, const at::Half* scales,
                         const uint8_t* zeros, bool shared_scales, float offset, int64_t groups, int64_t chunks,
                         int64_t n0, int64_t n1, float* y, ChunkScales chunk_scales) {
  constexpr int PER = 8 / BITS;
  static thread_local std::vector<float> cs_buf;  // s_w[n, g] * s_x[g], zero padded for the 16-wide loads
  cs_buf.assign(groups + 16, 0.f);
  float* cs = cs_buf.data();  // a plain pointer in the loops: a thread_local name costs a TLS lookup per use
  const int64_t tail = row_bytes - (chunks - 1) * 64;
  const __mmask64 tail_mask = tail >= 64 ? ~__mmask64(0) : ((__mmask64(1) << tail) - 1);
  for (int64_t n = n0; n < n1; ++n) {
    const int64_t srow = shared_scales ? 0 : n * groups;
    combined_scales(xq, scales + srow, groups, cs);
    const uint8_t* row = codes + n * row_bytes;
    __m512 acc = _mm512_setzero_ps();
    auto chunk = [&](int64_t c, __m512i b) __attribute__((always_inline)) {
      const __m512i dot = chunk_dot<BITS>(b, xq.q.data() + c * PER * 64);
      acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), chunk_scales(c, cs), acc);
    };
    for (int64_t c = 0; c + 1 < chunks; ++c) chunk(c, _mm512_loadu_si512(row + c * 64));
    chunk(chunks - 1, _mm512_maskz_loadu_epi8(tail_mask, row + (chunks - 1) * 64));
    const float out = _mm512_reduce_add_ps(acc);
    y[n] = out - zero_point_share(scales + srow, zeros ? zeros + srow : nullptr, offset, xq.sum.data(), groups);
  }
}

// When a group spans whole chunks (gs a multiple of a chunk's 64 * PER codes: int4 g128, int8 g64 and wider) every
// lane of a chunk has the same combined scale: one broadcast per chunk. Any other group size of whole lanes: each
// chunk permutes its own lane table into the 16 lanes' combined scales. Same sums in the same order either way.
// Interleaved timings on this CPU (BENCHMARKS.md, issue 25's seventh pass), broadcast against the lane table:
// int4 g128 0.74-0.92x the time on the 1B shape's 8192 x 2048 and 2048 x 8192 (0.88-1.08x on SmolLM2's 576 x 1536),
// int8 g128 0.75-0.97x. Also tried and not kept: the uniform-lane layouts (int2 g64) with a
// hoisted lane table and software prefetch (0.87-1.05x on the 1B shape, int1 up to 1.16x slower), and 2 or 4
// rows per pass (faster in L2, 1.25-1.4x slower from DRAM).
template <int BITS>  // (total_bytes: unused, the masked loads stay inside the row)
void gemv_rows_i8(const QuantizedX& xq, const uint8_t* codes, int64_t row_bytes, int64_t /*total_bytes*/, const at::Half* scales,
                    const uint8_t* zeros, bool shared_scales, float offset, int64_t groups, int64_t gs,
                    int64_t chunks, int64_t n0, int64_t n1, float* y) {
  constexpr int64_t CODES = 64 * (8 / BITS);
  if (gs % CODES == 0) {
    const int64_t chunks_per_group = gs / CODES;
    gemv_rows_vnni_with<BITS>(xq, codes, row_bytes, scales, zeros, shared_scales, offset, groups, chunks, n0, n1, y,
                              [chunks_per_group](int64_t c, const float* cs) __attribute__((always_inline)) {
                                return _mm512_set1_ps(cs[c / chunks_per_group]);
                              });
  } else {
    const int32_t* lane = xq.lane.data();
    const int32_t* first = xq.first.data();
    gemv_rows_vnni_with<BITS>(xq, codes, row_bytes, scales, zeros, shared_scales, offset, groups, chunks, n0, n1, y,
                              [lane, first](int64_t c, const float* cs) __attribute__((always_inline)) {
                                return _mm512_permutexvar_ps(_mm512_loadu_si512(lane + c * 16),
                                                             _mm512_loadu_ps(cs + first[c]));
                              });
  }
}
#endif  // VNNI

#if !defined(LOWBIT_AVX512) && defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#include <cstring>
#define LOWBIT_AVX2 1

// ---- AVX2 path (CPUs without AVX-512: most Intel client CPUs, AMD before Zen 4): 8 weights per step -----------
// The same kernels as the AVX-512 block above at half the width, under the same names, so that gemv_into and
// qgemv_mixed dispatch to whichever block was compiled.
inline float hsum8(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}

// An AVX2 lane mask of the first min(n, 8) lanes (n >= 0), for _mm256_maskload_ps.
inline __m256i lanes8(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::min<int64_t>(n, 8))),
                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// 8 codes of BITS bits starting at byte p (byte aligned: 8 codes are BITS whole bytes), as int32 lanes. `avail` =
// readable bytes from p; near the end of the codes tensor only those are read.
template <int BITS>
inline __m256i codes8(const uint8_t* p, int64_t avail) {
  if constexpr (BITS == 8) {
    uint64_t v = 0;
    if (avail >= 8) std::memcpy(&v, p, 8);
    else if (avail > 0) std::memcpy(&v, p, avail);
    return _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(static_cast<long long>(v)));
  } else {  // 1-4 bits: the 8 codes lie in one 32-bit word, code i at bit i * BITS
    static_assert(BITS >= 1 && BITS <= 4, "1, 2, 3, 4 or 8 bits");
    uint32_t v = 0;
    if (avail >= BITS) std::memcpy(&v, p, BITS);  // exactly the bytes needed: one load
    else if (avail > 0) std::memcpy(&v, p, avail);
    const __m256i shifts = _mm256_setr_epi32(0, BITS, 2 * BITS, 3 * BITS, 4 * BITS, 5 * BITS, 6 * BITS, 7 * BITS);
    const __m256i c = _mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(v)), shifts);
    return _mm256_and_si256(c, _mm256_set1_epi32((1 << BITS) - 1));
  }
}

// How codes become values: integers, a table of <= 16 levels in two registers, or a larger table (gather).
enum class Decode { Int, Table16, Gather };
struct Table { __m256 lo, hi; };

template <Decode D>
inline __m256 decode8(__m256i q, const Table& t, const float* lut) {
  if constexpr (D == Decode::Int) {
    return _mm256_cvtepi32_ps(q);
  } else if constexpr (D == Decode::Table16) {  // levels 0-7 from lo, 8-15 from hi (bit 3 moved to the sign bit)
    return _mm256_blendv_ps(_mm256_permutevar8x32_ps(t.lo, q), _mm256_permutevar8x32_ps(t.hi, q),
                            _mm256_castsi256_ps(_mm256_slli_epi32(q, 28)));
  } else {
    return _mm256_i32gather_ps(lut, q, 4);
  }
}

inline Table load_table(const float* lut, int levels) {
  alignas(32) float t[16] = {0};
  std::memcpy(t, lut, sizeof(float) * std::min(16, levels));
  return Table{_mm256_load_ps(t), _mm256_load_ps(t + 8)};
}

// sum_g scale_g * sum_{k in g} value(q_k) x_k for one packed row; groups of `gs` codes (a multiple of 8).
template <int BITS, Decode D>
inline float row_dot(const uint8_t* row, int64_t avail, const float* x, int64_t K, int64_t gs,
                     const at::Half* scales, const Table& table, const float* lut) {
  __m256 acc_row = _mm256_setzero_ps();
  for (int64_t k0 = 0, g = 0; k0 < K; k0 += gs, ++g) {
    const int64_t len = std::min(gs, K - k0);
    __m256 acc = _mm256_setzero_ps(), acc2 = _mm256_setzero_ps();  // two chains hide the FMA latency
    int64_t k = 0;
    for (; k + 16 <= len; k += 16) {
      const int64_t b = (k0 + k) * BITS / 8, b2 = b + BITS;
      acc = _mm256_fmadd_ps(decode8<D>(codes8<BITS>(row + b, avail - b), table, lut), _mm256_loadu_ps(x + k0 + k), acc);
      acc2 = _mm256_fmadd_ps(decode8<D>(codes8<BITS>(row + b2, avail - b2), table, lut),
                             _mm256_loadu_ps(x + k0 + k + 8), acc2);
    }
    for (; k < len; k += 8) {  // the last 8, or 1-7 at the row's end (x masked to zero beyond it)
      const int64_t b = (k0 + k) * BITS / 8;
      const __m256 xv = len - k >= 8 ? _mm256_loadu_ps(x + k0 + k) : _mm256_maskload_ps(x + k0 + k, lanes8(len - k));
      acc = _mm256_fmadd_ps(decode8<D>(codes8<BITS>(row + b, avail - b), table, lut), xv, acc);
    }
    acc_row = _mm256_fmadd_ps(_mm256_set1_ps(float(scales[g])), _mm256_add_ps(acc, acc2), acc_row);
  }
  return hsum8(acc_row);
}

// 8 fp16 values from p (all 8 readable) as fp32.
inline __m256 half8(const at::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }

// The zero point's share of one output, sum_g s_g * z_g * xsum_g (z_g = offset for symmetric codes).
inline float zero_point_share(const at::Half* scales, const uint8_t* zeros, float offset, const float* xsum,
                              int64_t groups) {
  __m256 corr = _mm256_setzero_ps();
  int64_t g = 0;
  for (; g + 8 <= groups; g += 8) {
    uint64_t zb = 0;
    if (zeros) std::memcpy(&zb, zeros + g, 8);
    const __m256 z = zeros ? _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(static_cast<long long>(zb))))
                           : _mm256_set1_ps(offset);
    corr = _mm256_fmadd_ps(_mm256_mul_ps(half8(scales + g), z), _mm256_loadu_ps(xsum + g), corr);
  }
  float out = hsum8(corr);
  for (; g < groups; ++g) out += float(scales[g]) * (zeros ? float(zeros[g]) : offset) * xsum[g];
  return out;
}

// M activation rows (x + m * K, outputs y + m * N) against the same mixed-codebook rows: each 8 codes are decoded
// once and meet all M rows (a small batch of a LowRA layer; one row per call would decode every code M times).
template <int BITS, int M>
void gemv_mixed_rows_simd_m(const float* x, const uint8_t* codes, int64_t row_bytes, int64_t total_bytes,
                            const at::Half* books, const at::Half* absmax, const int32_t* perm, int64_t K,
                            int64_t block, int64_t blocks, int64_t r0, int64_t n0, int64_t n1, float* y, int64_t N) {
  for (int64_t n = n0; n < n1; ++n) {
    float t[16] = {0};
    for (int i = 0; i < (1 << BITS); ++i) t[i] = float(books[n * (1 << BITS) + i]);
    const Table table = load_table(t, 16);
    const uint8_t* row = codes + n * row_bytes;
    const int64_t avail = total_bytes - n * row_bytes;
    const at::Half* a = absmax + (r0 + n) * blocks;
    __m256 acc_row[M];
    for (int m = 0; m < M; ++m) acc_row[m] = _mm256_setzero_ps();
    for (int64_t k0 = 0, g = 0; k0 < K; k0 += block, ++g) {
      const int64_t len = std::min(block, K - k0);
      __m256 acc[M];
      for (int m = 0; m < M; ++m) acc[m] = _mm256_setzero_ps();
      for (int64_t k = 0; k < len; k += 8) {
        const int64_t b = (k0 + k) * BITS / 8;
        const __m256 v = decode8<Decode::Table16>(codes8<BITS>(row + b, avail - b), table, nullptr);
        if (len - k >= 8) {
          for (int m = 0; m < M; ++m) acc[m] = _mm256_fmadd_ps(v, _mm256_loadu_ps(x + m * K + k0 + k), acc[m]);
        } else {  // the row's last 1-7 columns: x masked to zero beyond them
          const __m256i mask = lanes8(len - k);
          for (int m = 0; m < M; ++m) acc[m] = _mm256_fmadd_ps(v, _mm256_maskload_ps(x + m * K + k0 + k, mask), acc[m]);
        }
      }
      const __m256 s = _mm256_set1_ps(float(a[g]));
      for (int m = 0; m < M; ++m) acc_row[m] = _mm256_fmadd_ps(s, acc[m], acc_row[m]);
    }
    for (int m = 0; m < M; ++m) y[m * N + perm[r0 + n]] = hsum8(acc_row[m]);
  }
}

// ---- int8-activation path (AVX2): 32 code bytes x 32 int8 activations per vpmaddubsw ----------------------------
// x is rounded per weight group as the VNNI path rounds it (same scale, same round-to-nearest-even), laid out for
// 32-byte chunks of a row: xq[(c * PER + p) * 32 + j] = round(x[k] / s_x) for k = c * 32 * PER + j * PER + p.
// vpmaddubsw sums adjacent byte pairs into int16 (|sum| <= 2 * 15 * 127: no saturation for codes of up to 4 bits;
// 8-bit codes would saturate and stay on the fp32 path), the PER phases add in int16 (<= 7,620), and vpmaddwd
// with ones gives lane l the sum over bytes 4l..4l+3, i.e. codes [c * 32 * PER + 4 * PER * l, + 4 * PER): one
// weight group when group_size % (4 * PER) == 0, as on the VNNI path.
constexpr int64_t kChunkBytes = 32;

}  // namespace

// csrc/gemm_i8.cpp (built under the same condition as this block): x's groups rounded to int8, 8 values a step.
void round_groups_int8(const float* x, int64_t K, int64_t gs, int64_t groups, int8_t* a, float* scale, float* sum);

namespace {

// Rounds x (K,) into r (its buffers reused: a decode step calls this ~200 times per token).
template <int BITS>
void quantize_x_into(QuantizedX& r, const float* x, int64_t K, int64_t gs, int64_t groups, int64_t chunks) {
  constexpr int PER = 8 / BITS, CODES = kChunkBytes * PER;
  static thread_local std::vector<int8_t> lin;  // (chunks * CODES,) the rounded x in k order, zero padded
  r.q.resize(chunks * CODES);
  lin.assign(chunks * CODES, 0);
  r.scale.assign(groups + 16, 0.f);
  r.sum.assign(groups + 16, 0.f);
  r.lane.resize(chunks * 8);
  r.first.resize(chunks);
  round_groups_int8(x, K, gs, groups, lin.data(), r.scale.data(), r.sum.data());
  lay_out_by_phase<BITS, kChunkBytes>(r, lin.data(), gs, groups, chunks);
}

template <int BITS>
const QuantizedX& quantize_x(const float* x, int64_t K, int64_t gs, int64_t groups, int64_t chunks) {
  static thread_local QuantizedX r;
  quantize_x_into<BITS>(r, x, K, gs, groups, chunks);
  return r;
}

// The weight rows [n0, n1) times M int8 activation rows xq[0..M) (a decode row, or up to 4 rows of a small batch)
// into y[m][n]: each 32-byte chunk of codes is loaded and split into its PER phases once, then vpmaddubsw meets
// every row's activations. The 8 lanes of a chunk meet their groups' combined scales s_w[n, g] * s_x[m, g] — one
// broadcast per chunk where a group spans whole chunks, else a permute of the chunk's lane table (the same for
// every row: it depends on K and the group size only).
// The row's last chunk is loaded whole where the codes tensor (`total_bytes`) holds 32 bytes from its start: bytes
// past the row's end (the next row's codes) meet the zero padding of every row's activations and add nothing; only
// the tensor's last row, when short, is copied into a zero-padded buffer. WHOLE: every chunk lies inside one group
// (gs a multiple of a chunk's codes), a compile-time choice so that neither loop pays for the other's scales.
template <int BITS, int M, bool WHOLE>
void gemv_rows_i8_m(const QuantizedX* const* xq, const uint8_t* codes, int64_t row_bytes, int64_t total_bytes,
                    const at::Half* scales, const uint8_t* zeros, bool shared_scales, float offset, int64_t groups,
                    int64_t gs, int64_t chunks, int64_t n0, int64_t n1, float* const* y) {
  constexpr int PER = 8 / BITS;
  const int64_t stride = groups + 16;
  static thread_local std::vector<float> cs_buf;  // (M, groups + 16) combined scales, zero padded
  cs_buf.assign(M * stride, 0.f);
  float* cs = cs_buf.data();  // a plain pointer in the loops: a thread_local name costs a TLS lookup per use
  const int64_t tail = row_bytes - (chunks - 1) * kChunkBytes;
  const int32_t* lane = xq[0]->lane.data();
  const int32_t* first = xq[0]->first.data();
  const __m256i mask = _mm256_set1_epi8(static_cast<char>((1 << BITS) - 1)), ones = _mm256_set1_epi16(1);
  for (int64_t n = n0; n < n1; ++n) {
    const int64_t srow = shared_scales ? 0 : n * groups;
    for (int m = 0; m < M; ++m)
      for (int64_t g = 0; g < groups; ++g) cs[m * stride + g] = float(scales[srow + g]) * xq[m]->scale[g];
    const uint8_t* row = codes + n * row_bytes;
    __m256 acc[M];
    for (int m = 0; m < M; ++m) acc[m] = _mm256_setzero_ps();
    auto chunk = [&](int64_t c, __m256i b) __attribute__((always_inline)) {
      __m256i v[PER];
      for (int p = 0; p < PER; ++p) v[p] = _mm256_and_si256(p ? _mm256_srli_epi16(b, p * BITS) : b, mask);
      const __m256i idx = WHOLE ? ones : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(lane + c * 8));
      for (int m = 0; m < M; ++m) {
        const int8_t* xc = xq[m]->q.data() + c * PER * kChunkBytes;
        __m256i pairs = _mm256_setzero_si256();  // int16 pair sums of the PER phases (<= 7,620: no saturation)
        for (int p = 0; p < PER; ++p)
          pairs = _mm256_add_epi16(pairs, _mm256_maddubs_epi16(v[p], _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xc + p * kChunkBytes))));
        const float* csm = cs + m * stride;
        const __m256 s = WHOLE ? _mm256_set1_ps(csm[first[c]])  // the chunk's one group
                               : _mm256_permutevar8x32_ps(_mm256_loadu_ps(csm + first[c]), idx);
        acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, ones)), s, acc[m]);
      }
    };
    for (int64_t c = 0; c + 1 < chunks; ++c) chunk(c, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + c * kChunkBytes)));
    const int64_t last_start = n * row_bytes + (chunks - 1) * kChunkBytes;
    if (last_start + kChunkBytes <= total_bytes) {
      chunk(chunks - 1, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + last_start)));
    } else {
      alignas(32) uint8_t last[kChunkBytes] = {0};
      std::memcpy(last, codes + last_start, tail);
      chunk(chunks - 1, _mm256_load_si256(reinterpret_cast<const __m256i*>(last)));
    }
    for (int m = 0; m < M; ++m)
      y[m][n] = hsum8(acc[m]) - zero_point_share(scales + srow, zeros ? zeros + srow : nullptr, offset,
                                                 xq[m]->sum.data(), groups);
  }
}

// One activation row (the decode GEMV), as the VNNI path's gemv_rows_i8.
template <int BITS>
void gemv_rows_i8(const QuantizedX& xq, const uint8_t* codes, int64_t row_bytes, int64_t total_bytes, const at::Half* scales,
                  const uint8_t* zeros, bool shared_scales, float offset, int64_t groups, int64_t gs,
                  int64_t chunks, int64_t n0, int64_t n1, float* y) {
  const QuantizedX* xs[1] = {&xq};
  float* ys[1] = {y};
  if (gs % (kChunkBytes * (8 / BITS)) == 0)
    gemv_rows_i8_m<BITS, 1, true>(xs, codes, row_bytes, total_bytes, scales, zeros, shared_scales, offset, groups, gs,
                                  chunks, n0, n1, ys);
  else
    gemv_rows_i8_m<BITS, 1, false>(xs, codes, row_bytes, total_bytes, scales, zeros, shared_scales, offset, groups, gs,
                                   chunks, n0, n1, ys);
}

// A small batch x (M, K) (qgemm_i8 on an AVX2 build): every row rounded as the one-row kernel rounds it; tiles of
// 16 weight rows (in L1/L2) meet 4 activation rows at a time, so the weight is read from memory once.
template <int BITS>
void gemm_rows_i8(const float* x, int64_t x_stride, int64_t M, int64_t K, const uint8_t* codes, int64_t N,
                  int64_t row_bytes, const at::Half* scales, const uint8_t* zeros, bool shared_scales, float offset,
                  int64_t groups, int64_t gs, float* y) {
  const int64_t chunks = (row_bytes + kChunkBytes - 1) / kChunkBytes;
  const bool whole = gs % (kChunkBytes * (8 / BITS)) == 0;
  std::vector<QuantizedX> xs(M);
  for (int64_t m = 0; m < M; ++m) quantize_x_into<BITS>(xs[m], x + m * x_stride, K, gs, groups, chunks);
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t t = n0; t < n1; t += 16) {
      const int64_t t1 = std::min(n1, t + 16);
      for (int64_t m0 = 0; m0 < M; m0 += 4) {
        const QuantizedX* xq[4];
        float* ys[4];
        const int64_t rows = std::min<int64_t>(4, M - m0);
        for (int64_t i = 0; i < rows; ++i) xq[i] = &xs[m0 + i], ys[i] = y + (m0 + i) * N;
#define LOWBIT_TILE(R) (whole ? gemv_rows_i8_m<BITS, R, true>(xq, codes, row_bytes, N * row_bytes, scales, zeros, shared_scales, offset, groups, gs, chunks, t, t1, ys) \
                            : gemv_rows_i8_m<BITS, R, false>(xq, codes, row_bytes, N * row_bytes, scales, zeros, shared_scales, offset, groups, gs, chunks, t, t1, ys))
        switch (rows) {
          case 4: LOWBIT_TILE(4); break;
          case 3: LOWBIT_TILE(3); break;
          case 2: LOWBIT_TILE(2); break;
          default: LOWBIT_TILE(1);
        }
#undef LOWBIT_TILE
      }
    }
  });
}
#endif  // AVX2

#if defined(LOWBIT_AVX512) || defined(LOWBIT_AVX2)
#define LOWBIT_FLOAT_SIMD 1  // gemv_rows_simd and gemv_mixed_rows_simd exist

// The fp32 SIMD GEMV's row loops, one for both blocks (row_dot, zero_point_share and load_table are the block's).
template <int BITS, Decode D>
void gemv_rows_simd(const float* x, const float* xsum, const uint8_t* codes, int64_t row_bytes, int64_t total_bytes,
                    const at::Half* scales, const uint8_t* zeros, bool shared_scales, const float* lut, float offset,
                    int64_t K, int64_t group_size, int64_t groups, int64_t n0, int64_t n1, float* y) {
  Table table{};
  if constexpr (D == Decode::Table16) table = load_table(lut, 1 << BITS);
  for (int64_t n = n0; n < n1; ++n) {
    const int64_t srow = shared_scales ? 0 : n * groups;
    const int64_t start = n * row_bytes;
    float out = row_dot<BITS, D>(codes + start, total_bytes - start, x, K, group_size, scales + srow, table, lut);
    if constexpr (D == Decode::Int)  // the zero point's share: sum_g s_g z_g sum_{k in g} x_k
      out -= zero_point_share(scales + srow, zeros ? zeros + srow : nullptr, offset, xsum, groups);
    y[n] = out;
  }
}

// Mixed-codebook rows (see gemv_mixed_rows): each row's levels in the block's table registers.
template <int BITS>
void gemv_mixed_rows_simd(const float* x, const uint8_t* codes, int64_t row_bytes, int64_t total_bytes,
                          const at::Half* books, const at::Half* absmax, const int32_t* perm, int64_t K,
                          int64_t block, int64_t blocks, int64_t r0, int64_t n0, int64_t n1, float* y) {
  for (int64_t n = n0; n < n1; ++n) {
    float t[16] = {0};
    for (int i = 0; i < (1 << BITS); ++i) t[i] = float(books[n * (1 << BITS) + i]);
    const int64_t start = n * row_bytes;
    y[perm[r0 + n]] = row_dot<BITS, Decode::Table16>(codes + start, total_bytes - start, x, K, block,
                                                     absmax + (r0 + n) * blocks, load_table(t, 16), nullptr);
  }
}
#endif
#if defined(LOWBIT_VNNI) || defined(LOWBIT_AVX2)
#define LOWBIT_INT8_X 1  // quantize_x and gemv_rows_i8 exist (8-bit codes on VNNI only)
#endif

}  // namespace

// Whether csrc/int_gemm.cpp's integer GEMMs take a weight: integer codes of 1, 2, 4 or 8 bits whose groups hold
// whole vpdpbusd lanes (4 bytes), on a CPU build with AVX512-VNNI.
bool vnni_applies(int64_t bits, int64_t group_size, bool table) {
#ifdef LOWBIT_VNNI
  if (table || (bits != 1 && bits != 2 && bits != 4 && bits != 8)) return false;
  return group_size % (4 * (8 / bits)) == 0;
#else
  return false;
#endif
}

// Whether the GEMV's int8-activation path takes a weight (one row here, or each row of a small batch in
// qgemm_i8): as vnni_applies on an AVX512-VNNI build; on an AVX2 build integer codes of 1, 2 or 4 bits (8-bit codes
// would saturate vpmaddubsw's int16 pair sums) whose groups hold whole 4-byte lanes.
bool int8_x_applies(int64_t bits, int64_t group_size, bool table) {
#if defined(LOWBIT_VNNI)
  return vnni_applies(bits, group_size, table);
#elif defined(LOWBIT_AVX2)
  if (table || (bits != 1 && bits != 2 && bits != 4)) return false;
  return group_size % (4 * (8 / bits)) == 0;
#else
  return false;
#endif
}

namespace {

// The input row and group size every GEMV call takes.
void check_x(const torch::Tensor& x, int64_t group_size) {
  TORCH_CHECK(x.dim() == 1 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(), "x must be contiguous fp32 (K,)");
  TORCH_CHECK(group_size > 0 && group_size % 8 == 0, "group_size must be a positive multiple of 8");
}

// One packed weight of a GEMV call: its rows' codes, scales and zero points, and where its outputs go.
struct Rows {
  const uint8_t* codes;
  const at::Half* scales;
  const uint8_t* zeros;  // nullptr: symmetric codes (the offset is the zero point)
  bool shared;           // one scale row for every output row
  int64_t N;             // output rows
  float* y;
};

// Checks one weight against x (K,) and the format; returns its Rows writing into a new (N,) fp32 tensor `y`.
Rows check_rows(const torch::Tensor& x, const torch::Tensor& codes, const torch::Tensor& scales,
                const c10::optional<torch::Tensor>& zeros, int64_t bits, int64_t group_size, torch::Tensor& y) {
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == torch::kUInt8 && codes.is_contiguous(), "codes must be uint8 (N, row_bytes)");
  TORCH_CHECK(scales.dim() == 2 && scales.scalar_type() == torch::kFloat16 && scales.is_contiguous(), "scales must be fp16 (rows, groups)");
  const int64_t N = codes.size(0), row_bytes = codes.size(1), K = x.size(0), groups = scales.size(1);
  TORCH_CHECK(groups == (K + group_size - 1) / group_size, "scales do not match K and group_size");
  TORCH_CHECK(row_bytes == (K * bits + 7) / 8, "codes do not match K and bits");
  const uint8_t* zp = nullptr;
  if (zeros.has_value()) {
    TORCH_CHECK(zeros->scalar_type() == torch::kUInt8 && zeros->is_contiguous() && zeros->sizes() == scales.sizes(), "zeros must be uint8 like scales");
    zp = zeros->data_ptr<uint8_t>();
  }
  y = torch::empty({N}, x.options());
  return Rows{codes.data_ptr<uint8_t>(), scales.data_ptr<at::Half>(), zp, scales.size(0) == 1 && N != 1, N,
              y.data_ptr<float>()};
}

// y_w = W_w x for every weight w of one format (bits, group size, offset, levels) and one x (checked by the
// callers: check_x, check_rows): x is rounded (int8 path) or summed per group once, and one parallel region covers
// the rows of all of them — a layer's q/k/v or gate/up in one call (csrc/decode.cpp), or a single weight (qgemv).
void gemv_into(const torch::Tensor& x, const std::vector<Rows>& ws, const c10::optional<torch::Tensor>& levels,
               int64_t bits, int64_t group_size, int64_t offset, bool int8_x) {
  const int64_t K = x.size(0), groups = (K + group_size - 1) / group_size, row_bytes = (K * bits + 7) / 8;
  const float* lut = nullptr;
  if (levels.has_value()) {
    TORCH_CHECK(levels->scalar_type() == torch::kFloat32 && levels->is_contiguous() && levels->numel() >= (1 << bits), "levels must be fp32 with 2^bits entries");
    lut = levels->data_ptr<float>();
  }
  const int64_t lut_size = levels.has_value() ? levels->numel() : 0;
  const float* xp = x.data_ptr<float>();
  int64_t total_rows = 0;
  for (const Rows& w : ws) total_rows += w.N;
  // Runs fn(w, r0, r1) over the rows [n0, n1) of the concatenation of the weights, piece by piece.
  auto each = [&](int64_t n0, int64_t n1, auto&& fn) {
    int64_t start = 0;
    for (const Rows& w : ws) {
      const int64_t lo = std::max(n0, start), hi = std::min(n1, start + w.N);
      if (lo < hi) fn(w, lo - start, hi - start);
      start += w.N;
    }
  };
#ifdef LOWBIT_INT8_X
  if (int8_x && K > 0 && int8_x_applies(bits, group_size, levels.has_value())) {  // K > 0: a row has a last chunk
    const int64_t chunks = (row_bytes + kChunkBytes - 1) / kChunkBytes;
    switch (bits) {
#define LOWBIT_I8_CASE(B)                                                                                    \
  case B: {                                                                                                  \
    const QuantizedX& xq = quantize_x<B>(xp, K, group_size, groups, chunks);                                  \
    at::parallel_for(0, total_rows, 8, [&](int64_t n0, int64_t n1) {                                         \
      each(n0, n1, [&](const Rows& w, int64_t r0, int64_t r1) {                                              \
        gemv_rows_i8<B>(xq, w.codes, row_bytes, w.N * row_bytes, w.scales, w.zeros, w.shared, float(offset),  \
                        groups, group_size, chunks, r0, r1, w.y);                                            \
      });                                                                                                    \
    });                                                                                                      \
    return;                                                                                                  \
  }
      LOWBIT_I8_CASE(1) LOWBIT_I8_CASE(2) LOWBIT_I8_CASE(4)
#ifdef LOWBIT_VNNI
      LOWBIT_I8_CASE(8)
#endif
#undef LOWBIT_I8_CASE
    }
  }
#endif
  std::vector<float> xsum(groups, 0.f);
  for (int64_t g = 0; g < groups; ++g)
    for (int64_t k = g * group_size; k < std::min(K, (g + 1) * group_size); ++k) xsum[g] += xp[k];
  at::parallel_for(0, total_rows, 8, [&](int64_t n0, int64_t n1) {
    each(n0, n1, [&](const Rows& w, int64_t r0, int64_t r1) {
      const int64_t total = w.N * row_bytes;
#ifdef LOWBIT_FLOAT_SIMD
      switch (bits) {
#define LOWBIT_SIMD(B)                                                                                          \
  case B:                                                                                                     \
    if (!lut) gemv_rows_simd<B, Decode::Int>(xp, xsum.data(), w.codes, row_bytes, total, w.scales, w.zeros,  \
                                             w.shared, lut, float(offset), K, group_size, groups, r0, r1, w.y); \
    else if (B <= 4 && lut_size <= 16) gemv_rows_simd<B, Decode::Table16>(xp, xsum.data(), w.codes, row_bytes, \
                                             total, w.scales, w.zeros, w.shared, lut, float(offset), K,       \
                                             group_size, groups, r0, r1, w.y);                                \
    else gemv_rows_simd<B, Decode::Gather>(xp, xsum.data(), w.codes, row_bytes, total, w.scales, w.zeros,   \
                                           w.shared, lut, float(offset), K, group_size, groups, r0, r1, w.y); \
    return;
        LOWBIT_SIMD(1) LOWBIT_SIMD(2) LOWBIT_SIMD(3) LOWBIT_SIMD(4) LOWBIT_SIMD(8)
#undef LOWBIT_SIMD
        default: break;  // 5-7 bits: the portable loop below
      }
#endif
      switch (bits) {
#define LOWBIT_CASE(B) case B: gemv_rows<B>(xp, xsum.data(), w.codes, row_bytes, w.scales, w.zeros, w.shared, lut, float(offset), K, group_size, groups, r0, r1, w.y); break;
        LOWBIT_CASE(1) LOWBIT_CASE(2) LOWBIT_CASE(3) LOWBIT_CASE(4) LOWBIT_CASE(5) LOWBIT_CASE(6) LOWBIT_CASE(7) LOWBIT_CASE(8)
#undef LOWBIT_CASE
        default: TORCH_CHECK(false, "bits must be 1..8");
      }
    });
  });
}

}  // namespace

// qgemm_i8 on a build without AVX512-VNNI (csrc/int_gemm.cpp checked the arguments): x (M, K) fp32 rows with unit
// column stride, each rounded to int8 per weight group as the one-row kernel rounds it -> (M, N).
torch::Tensor qgemm_i8_avx2(const torch::Tensor& x, const torch::Tensor& codes, const torch::Tensor& scales,
                            const c10::optional<torch::Tensor>& zeros, int64_t bits, int64_t group_size,
                            int64_t offset) {
  const int64_t M = x.size(0), N = codes.size(0);
  auto y = torch::empty({M, N}, x.options());
#ifdef LOWBIT_AVX2
  const int64_t K = x.size(1);
  if (K == 0 || M == 0) return y.zero_();
  const uint8_t* zp = zeros.has_value() ? zeros->data_ptr<uint8_t>() : nullptr;
  const bool shared = scales.size(0) == 1 && N != 1;
  switch (bits) {
#define LOWBIT_CASE(B) case B: gemm_rows_i8<B>(x.data_ptr<float>(), x.stride(0), M, K, codes.data_ptr<uint8_t>(), N, \
                                         codes.size(1), scales.data_ptr<at::Half>(), zp, shared, float(offset),   \
                                         scales.size(1), group_size, y.data_ptr<float>()); break;
    LOWBIT_CASE(1) LOWBIT_CASE(2) LOWBIT_CASE(4)
#undef LOWBIT_CASE
  }
#endif
  return y;
}

namespace {

torch::Tensor qgemv(torch::Tensor x, torch::Tensor codes, torch::Tensor scales, c10::optional<torch::Tensor> zeros,
                    c10::optional<torch::Tensor> levels, int64_t bits, int64_t group_size, int64_t offset,
                    bool int8_x) {
  check_x(x, group_size);
  torch::Tensor y;
  const Rows rows = check_rows(x, codes, scales, zeros, bits, group_size, y);
  gemv_into(x, {rows}, levels, bits, group_size, offset, int8_x);
  return y;
}

// Several weights of one format times the same x in one call: [W_0 x, W_1 x, ...] (see gemv_into).
std::vector<torch::Tensor> qgemv_multi(torch::Tensor x, std::vector<torch::Tensor> codes,
                                       std::vector<torch::Tensor> scales,
                                       std::vector<c10::optional<torch::Tensor>> zeros,
                                       c10::optional<torch::Tensor> levels, int64_t bits, int64_t group_size,
                                       int64_t offset, bool int8_x) {
  check_x(x, group_size);
  TORCH_CHECK(codes.size() == scales.size() && codes.size() == zeros.size() && !codes.empty(), "one codes, scales and zeros entry per weight");
  std::vector<torch::Tensor> ys(codes.size());
  std::vector<Rows> ws;
  for (size_t i = 0; i < codes.size(); ++i) ws.push_back(check_rows(x, codes[i], scales[i], zeros[i], bits, group_size, ys[i]));
  gemv_into(x, ws, levels, bits, group_size, offset, int8_x);
  return ys;
}

// Mixed-codebook rows (LowRA, lowbit/qmixed.py): stored rows [r0, r1) all have BITS-bit codes, each row its own
// fp16 codebook of 2^BITS levels, one fp16 absmax per block of columns:
//   y[perm[r]] = sum_blk a_{r,blk} * sum_k book_r[q_k] x_k
template <int BITS>
void gemv_mixed_rows(const float* x, const uint8_t* codes, int64_t row_bytes, const at::Half* books,
                     const at::Half* absmax, const int32_t* perm, int64_t K, int64_t block, int64_t blocks,
                     int64_t r0, int64_t n0, int64_t n1, float* y) {
  std::vector<float> buf(block + 8);
  float lut[1 << BITS];
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = codes + n * row_bytes;
    for (int i = 0; i < (1 << BITS); ++i) lut[i] = float(books[n * (1 << BITS) + i]);
    const at::Half* a = absmax + (r0 + n) * blocks;
    float acc_row = 0.f;
    for (int64_t g = 0; g < blocks; ++g) {
      const int64_t k0 = g * block;
      const int64_t len = std::min(block, K - k0);
      const int64_t b0 = (k0 * BITS) / 8;
      unpack_group<BITS>(row + b0, len, row_bytes - b0, lut, buf.data());
      const float* xg = x + k0;
      float acc = 0.f;
#pragma omp simd reduction(+ : acc)
      for (int64_t i = 0; i < len; ++i) acc += buf[i] * xg[i];
      acc_row += float(a[g]) * acc;
    }
    y[perm[r0 + n]] = acc_row;
  }
}

// x (K,) -> (N,), or a few rows x (M, K) -> (M, N) (a small batch: on AVX2 four rows share each decoded code).
torch::Tensor qgemv_mixed(torch::Tensor x, std::vector<int64_t> widths, std::vector<torch::Tensor> codes,
                          std::vector<torch::Tensor> books, torch::Tensor absmax, torch::Tensor perm, int64_t block) {
  TORCH_CHECK((x.dim() == 1 || x.dim() == 2) && x.scalar_type() == torch::kFloat32 && x.is_contiguous(), "x must be contiguous fp32 (K,) or (M, K)");
  TORCH_CHECK(widths.size() == codes.size() && codes.size() == books.size(), "one codes and codebook tensor per width");
  TORCH_CHECK(absmax.scalar_type() == torch::kFloat16 && absmax.is_contiguous() && absmax.dim() == 2, "absmax must be fp16 (out, blocks)");
  TORCH_CHECK(perm.scalar_type() == torch::kInt32 && perm.is_contiguous(), "perm must be int32");
  TORCH_CHECK(block > 0 && block % 8 == 0, "block_size must be a positive multiple of 8");
  const int64_t M = x.dim() == 2 ? x.size(0) : 1, K = x.size(-1), N = absmax.size(0), blocks = absmax.size(1);
  TORCH_CHECK(blocks == (K + block - 1) / block && perm.numel() == N, "absmax/perm do not match the weight");
  auto y = x.dim() == 2 ? torch::empty({M, N}, x.options()) : torch::empty({N}, x.options());
  float* yp = y.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  int64_t r0 = 0;
  for (size_t s = 0; s < widths.size(); ++s) {
    const int64_t bits = widths[s], rows = codes[s].size(0), row_bytes = codes[s].size(1);
    TORCH_CHECK(codes[s].scalar_type() == torch::kUInt8 && codes[s].is_contiguous() && row_bytes == (K * bits + 7) / 8, "codes do not match K and bits");
    TORCH_CHECK(books[s].scalar_type() == torch::kFloat16 && books[s].is_contiguous() && books[s].size(0) == rows && books[s].size(1) == (1 << bits), "codebooks must be fp16 (rows, 2^bits)");
    TORCH_CHECK(r0 + rows <= N, "segments hold more rows than absmax");
    const uint8_t* cp = codes[s].data_ptr<uint8_t>();
    const at::Half* bp = books[s].data_ptr<at::Half>();
    const at::Half* ap = absmax.data_ptr<at::Half>();
    const int32_t* pp = perm.data_ptr<int32_t>();
    at::parallel_for(0, rows, 8, [&](int64_t n0, int64_t n1) {
      int64_t m = 0;
#ifdef LOWBIT_AVX2
      for (; m + 1 < M; m += 4) {  // tiles of 2-4 rows; a last single row takes the one-row kernel below
        const int64_t tile = std::min<int64_t>(4, M - m);
        switch (bits * 8 + tile) {
#define LOWBIT_TILE(B, R) case B * 8 + R: gemv_mixed_rows_simd_m<B, R>(xp + m * K, cp, row_bytes, rows * row_bytes, bp, ap, pp, K, block, blocks, r0, n0, n1, yp + m * N, N); break;
#define LOWBIT_TILES(B) LOWBIT_TILE(B, 2) LOWBIT_TILE(B, 3) LOWBIT_TILE(B, 4)
          LOWBIT_TILES(1) LOWBIT_TILES(2) LOWBIT_TILES(3) LOWBIT_TILES(4)
#undef LOWBIT_TILES
#undef LOWBIT_TILE
          default: TORCH_CHECK(false, "mixed rows must be 1..4 bits");
        }
      }
#endif
      for (; m < M; ++m) {
        const float* xm = xp + m * K;
        float* ym = yp + m * N;
#ifdef LOWBIT_FLOAT_SIMD
        switch (bits) {
#define LOWBIT_SIMD(B) case B: gemv_mixed_rows_simd<B>(xm, cp, row_bytes, rows * row_bytes, bp, ap, pp, K, block, blocks, r0, n0, n1, ym); continue;
          LOWBIT_SIMD(1) LOWBIT_SIMD(2) LOWBIT_SIMD(3) LOWBIT_SIMD(4)
#undef LOWBIT_SIMD
        }
#endif
        switch (bits) {
#define LOWBIT_CASE(B) case B: gemv_mixed_rows<B>(xm, cp, row_bytes, bp, ap, pp, K, block, blocks, r0, n0, n1, ym); break;
          LOWBIT_CASE(1) LOWBIT_CASE(2) LOWBIT_CASE(3) LOWBIT_CASE(4)
#undef LOWBIT_CASE
          default: TORCH_CHECK(false, "mixed rows must be 1..4 bits");
        }
      }
    });
    r0 += rows;
  }
  TORCH_CHECK(r0 == N, "segments do not cover every row");
  return y;
}


// Store 16 / 8 dequantized fp32 lanes at `dst` (the first `n` lanes, n >= 1) as the tile's element type: bf16
// (rounded once, AVX512-BF16) or fp32 as is.
#if defined(LOWBIT_AVX512)
inline void store16(float* dst, __mmask16 m, __m512 w) { _mm512_mask_storeu_ps(dst, m, w); }
#if defined(__AVX512BF16__)
inline void store16(at::BFloat16* dst, __mmask16 m, __m512 w) { _mm256_mask_storeu_epi16(dst, m, (__m256i)_mm512_cvtneps_pbh(w)); }
#endif
// Whether the 16-lane decode writes tiles of T: fp32 always, bf16 where AVX512-BF16 rounds them.
template <typename T>
constexpr bool kVectorTile = std::is_same_v<T, float>
#if defined(__AVX512BF16__)
    || std::is_same_v<T, at::BFloat16>
#endif
    ;
#elif defined(LOWBIT_AVX2)
inline void store8(float* dst, int64_t n, __m256 w) {
  if (n >= 8) _mm256_storeu_ps(dst, w);
  else _mm256_maskstore_ps(dst, lanes8(n), w);
}
#endif

// Rows [r0, r1) of a uniform packed weight dequantized into `out` ((r1 - r0, K), T = bf16 or fp32): see dequant_rows.
template <typename T>
void dequant_rows_as(const uint8_t* cp, int64_t row_bytes, const at::Half* sp, const uint8_t* zp, const float* lut,
                     int64_t lut_size, int64_t bits, int64_t group_size, int64_t offset, int64_t groups, bool shared,
                     int64_t K, int64_t r0, int64_t r1, T* op) {
#if defined(LOWBIT_AVX512)
  alignas(64) float t[16] = {0};
  if (lut) std::memcpy(t, lut, sizeof(float) * std::min<int64_t>(16, lut_size));
  const __m512 table = _mm512_load_ps(t);
#elif defined(LOWBIT_AVX2)
  const Table table = lut ? load_table(lut, static_cast<int>(std::min<int64_t>(16, lut_size))) : Table{};
#endif
  at::parallel_for(r0, r1, 16, [&](int64_t n0, int64_t n1) {
    std::vector<float> buf(group_size + 16);
    for (int64_t n = n0; n < n1; ++n) {
      const int64_t srow = shared ? 0 : n * groups;
      const uint8_t* row = cp + n * row_bytes;
      T* dst = op + (n - r0) * K;
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t k0 = g * group_size, len = std::min(group_size, K - k0), b0 = (k0 * bits) / 8;
        const float s = float(sp[srow + g]);
        const float z = lut ? 0.f : (zp ? float(zp[srow + g]) : float(offset));
#if defined(LOWBIT_AVX512)
        if (kVectorTile<T> && (bits <= 4 || bits == 8)) {  // 16 codes a step straight from the packed bytes
          const __m512 vs = _mm512_set1_ps(s), vz = _mm512_set1_ps(z);
          for (int64_t i = 0; i < len; i += 16) {
            const __mmask16 m = lanes16(len - i);
            const int64_t b = ((k0 + i) * bits) / 8;
            __m512 v;
            switch (bits) {
#define LOWBIT_DECODE(B) case B: v = lut ? (lut_size <= 16 && B <= 4 ? decode16<Decode::Table16>(codes16<B>(row + b, row_bytes - b), table, lut) : decode16<Decode::Gather>(codes16<B>(row + b, row_bytes - b), table, lut)) : decode16<Decode::Int>(codes16<B>(row + b, row_bytes - b), table, lut); break;
              LOWBIT_DECODE(1) LOWBIT_DECODE(2) LOWBIT_DECODE(3) LOWBIT_DECODE(4) LOWBIT_DECODE(8)
#undef LOWBIT_DECODE
              default: v = _mm512_setzero_ps();
            }
            if constexpr (kVectorTile<T>) store16(dst + k0 + i, m, _mm512_mul_ps(_mm512_sub_ps(v, vz), vs));
          }
          continue;
        }
#elif defined(LOWBIT_AVX2)
        if (std::is_same_v<T, float> && (bits <= 4 || bits == 8)) {  // 8 codes a step straight from the packed bytes
          const __m256 vs = _mm256_set1_ps(s), vz = _mm256_set1_ps(z);
          for (int64_t i = 0; i < len; i += 8) {
            const int64_t b = ((k0 + i) * bits) / 8;
            __m256 v;
            switch (bits) {
#define LOWBIT_DECODE(B) case B: v = lut ? (lut_size <= 16 && B <= 4 ? decode8<Decode::Table16>(codes8<B>(row + b, row_bytes - b), table, lut) : decode8<Decode::Gather>(codes8<B>(row + b, row_bytes - b), table, lut)) : decode8<Decode::Int>(codes8<B>(row + b, row_bytes - b), table, lut); break;
              LOWBIT_DECODE(1) LOWBIT_DECODE(2) LOWBIT_DECODE(3) LOWBIT_DECODE(4) LOWBIT_DECODE(8)
#undef LOWBIT_DECODE
              default: v = _mm256_setzero_ps();
            }
            if constexpr (std::is_same_v<T, float>) store8(dst + k0 + i, len - i, _mm256_mul_ps(_mm256_sub_ps(v, vz), vs));
          }
          continue;
        }
#endif
        switch (bits) {
#define LOWBIT_CASE(B) case B: unpack_group<B>(row + b0, len, row_bytes - b0, lut, buf.data()); break;
          LOWBIT_CASE(1) LOWBIT_CASE(2) LOWBIT_CASE(3) LOWBIT_CASE(4) LOWBIT_CASE(5) LOWBIT_CASE(6) LOWBIT_CASE(7) LOWBIT_CASE(8)
#undef LOWBIT_CASE
        }
        for (int64_t i = 0; i < len; ++i) dst[k0 + i] = T((buf[i] - z) * s);
      }
    }
  });
}

// Dequantize rows [r0, r1) of a uniform packed weight into `out` ((r1 - r0, K) bf16 or fp32, contiguous): the tile a
// prefill, batch or training step multiplies (kernels/cpu.py, qmatmul_cpu_tiled). w = (q - z) * s for integer codes,
// levels[q] * s for a codebook; computed in fp32, rounded once to bf16 for a bf16 tile.
void dequant_rows(torch::Tensor codes, torch::Tensor scales, c10::optional<torch::Tensor> zeros,
                  c10::optional<torch::Tensor> levels, int64_t bits, int64_t group_size, int64_t offset, int64_t r0,
                  int64_t r1, torch::Tensor out) {
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == torch::kUInt8 && codes.is_contiguous(), "codes must be uint8 (N, row_bytes)");
  TORCH_CHECK(scales.dim() == 2 && scales.scalar_type() == torch::kFloat16 && scales.is_contiguous(), "scales must be fp16 (rows, groups)");
  TORCH_CHECK((out.scalar_type() == torch::kBFloat16 || out.scalar_type() == torch::kFloat) && out.is_contiguous() && out.dim() == 2 && out.size(0) == r1 - r0, "out must be contiguous bf16 or fp32 (r1 - r0, K)");
  TORCH_CHECK(group_size > 0 && group_size % 8 == 0 && bits >= 1 && bits <= 8, "group_size must be a multiple of 8, bits 1..8");
  const int64_t N = codes.size(0), row_bytes = codes.size(1), K = out.size(1), groups = scales.size(1);
  TORCH_CHECK(0 <= r0 && r0 <= r1 && r1 <= N && row_bytes == (K * bits + 7) / 8 && groups == (K + group_size - 1) / group_size, "rows, codes and scales do not match");
  TORCH_CHECK(!levels.has_value() || (levels->scalar_type() == torch::kFloat && levels->is_contiguous()), "levels must be contiguous fp32");
  const uint8_t* zp = zeros.has_value() ? zeros->data_ptr<uint8_t>() : nullptr;
  const float* lut = levels.has_value() ? levels->data_ptr<float>() : nullptr;
  const int64_t lut_size = levels.has_value() ? levels->numel() : 0;
  const bool shared = scales.size(0) == 1 && N != 1;
  if (out.scalar_type() == torch::kFloat)
    dequant_rows_as(codes.data_ptr<uint8_t>(), row_bytes, scales.data_ptr<at::Half>(), zp, lut, lut_size, bits,
                    group_size, offset, groups, shared, K, r0, r1, out.data_ptr<float>());
  else
    dequant_rows_as(codes.data_ptr<uint8_t>(), row_bytes, scales.data_ptr<at::Half>(), zp, lut, lut_size, bits,
                    group_size, offset, groups, shared, K, r0, r1, out.data_ptr<at::BFloat16>());
}

// Stored rows [r0, r1) of one width segment of a mixed-codebook weight into `out` (T = bf16 or fp32): see
// dequant_mixed_rows.
template <typename T>
void dequant_mixed_rows_as(const uint8_t* cp, int64_t row_bytes, const at::Half* bp, const at::Half* ap, int64_t bits,
                           int64_t block, int64_t blocks, int64_t first, int64_t K, int64_t r0, int64_t r1, T* op) {
  at::parallel_for(r0, r1, 16, [&](int64_t n0, int64_t n1) {
    std::vector<float> buf(block + 16);
    float lut[16] = {0};
    for (int64_t n = n0; n < n1; ++n) {
      for (int i = 0; i < (1 << bits); ++i) lut[i] = float(bp[n * (1 << bits) + i]);
      const uint8_t* row = cp + n * row_bytes;
      const at::Half* a = ap + (first + n) * blocks;
      T* dst = op + (n - r0) * K;
#if defined(LOWBIT_AVX512)
      const __m512 table = _mm512_loadu_ps(lut);
#elif defined(LOWBIT_AVX2)
      const Table table = load_table(lut, 1 << bits);
#endif
      for (int64_t g = 0; g < blocks; ++g) {
        const int64_t k0 = g * block, len = std::min(block, K - k0), b0 = (k0 * bits) / 8;
        const float s = float(a[g]);
#if defined(LOWBIT_AVX512)
        if constexpr (kVectorTile<T>) {
          const __m512 vs = _mm512_set1_ps(s);
          for (int64_t i = 0; i < len; i += 16) {  // 16 codes a step straight from the packed bytes
            const __mmask16 m = lanes16(len - i);
            const int64_t b = ((k0 + i) * bits) / 8;
            __m512i q;
            switch (bits) {
              case 1: q = codes16<1>(row + b, row_bytes - b); break;
              case 2: q = codes16<2>(row + b, row_bytes - b); break;
              case 3: q = codes16<3>(row + b, row_bytes - b); break;
              default: q = codes16<4>(row + b, row_bytes - b);
            }
            store16(dst + k0 + i, m, _mm512_mul_ps(decode16<Decode::Table16>(q, table, lut), vs));
          }
          continue;
        }
#elif defined(LOWBIT_AVX2)
        if constexpr (std::is_same_v<T, float>) {
          const __m256 vs = _mm256_set1_ps(s);
          for (int64_t i = 0; i < len; i += 8) {  // 8 codes a step straight from the packed bytes
            const int64_t b = ((k0 + i) * bits) / 8;
            __m256i q;
            switch (bits) {
              case 1: q = codes8<1>(row + b, row_bytes - b); break;
              case 2: q = codes8<2>(row + b, row_bytes - b); break;
              case 3: q = codes8<3>(row + b, row_bytes - b); break;
              default: q = codes8<4>(row + b, row_bytes - b);
            }
            store8(dst + k0 + i, len - i, _mm256_mul_ps(decode8<Decode::Table16>(q, table, lut), vs));
          }
          continue;
        }
#endif
        switch (bits) {
#define LOWBIT_CASE(B) case B: unpack_group<B>(row + b0, len, row_bytes - b0, lut, buf.data()); break;
          LOWBIT_CASE(1) LOWBIT_CASE(2) LOWBIT_CASE(3) LOWBIT_CASE(4)
#undef LOWBIT_CASE
        }
        for (int64_t i = 0; i < len; ++i) dst[k0 + i] = T(buf[i] * s);
      }
    }
  });
}

// Dequantize stored rows [r0, r1) of one width segment of a mixed-codebook weight (LowRA, lowbit/qmixed.py) into
// `out` ((r1 - r0, K) bf16 or fp32, contiguous): w = book_r[q] * a_{r,blk}, computed in fp32, rounded once to bf16
// for a bf16 tile. `codes` and `books` are the segment's (rows are segment-relative); `absmax` (N, blocks) is the
// whole weight's, whose stored row of segment row r is `first + r`. The tile a LowRA prefill, batch or training step
// multiplies (kernels/cpu.py).
void dequant_mixed_rows(torch::Tensor codes, torch::Tensor books, torch::Tensor absmax, int64_t bits, int64_t block,
                        int64_t first, int64_t r0, int64_t r1, torch::Tensor out) {
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == torch::kUInt8 && codes.is_contiguous(), "codes must be uint8 (rows, row_bytes)");
  TORCH_CHECK(bits >= 1 && bits <= 4 && block > 0 && block % 8 == 0, "mixed rows are 1..4 bits, block_size a multiple of 8");
  TORCH_CHECK(books.scalar_type() == torch::kFloat16 && books.is_contiguous() && books.dim() == 2 && books.size(0) == codes.size(0) && books.size(1) == (1 << bits), "codebooks must be fp16 (rows, 2^bits)");
  TORCH_CHECK(absmax.scalar_type() == torch::kFloat16 && absmax.is_contiguous() && absmax.dim() == 2, "absmax must be fp16 (out, blocks)");
  TORCH_CHECK((out.scalar_type() == torch::kBFloat16 || out.scalar_type() == torch::kFloat) && out.is_contiguous() && out.dim() == 2 && out.size(0) == r1 - r0, "out must be contiguous bf16 or fp32 (r1 - r0, K)");
  const int64_t rows = codes.size(0), row_bytes = codes.size(1), K = out.size(1), blocks = absmax.size(1);
  TORCH_CHECK(0 <= r0 && r0 <= r1 && r1 <= rows && row_bytes == (K * bits + 7) / 8 && blocks == (K + block - 1) / block && first >= 0 && first + rows <= absmax.size(0), "rows, codes and absmax do not match");
  if (out.scalar_type() == torch::kFloat)
    dequant_mixed_rows_as(codes.data_ptr<uint8_t>(), row_bytes, books.data_ptr<at::Half>(), absmax.data_ptr<at::Half>(),
                          bits, block, blocks, first, K, r0, r1, out.data_ptr<float>());
  else
    dequant_mixed_rows_as(codes.data_ptr<uint8_t>(), row_bytes, books.data_ptr<at::Half>(), absmax.data_ptr<at::Half>(),
                          bits, block, blocks, first, K, r0, r1, out.data_ptr<at::BFloat16>());
}

// Float GEMV y = W x for one fp32 input row and a row-major float W (N, K): the float LM head a packed model keeps,
// in fp32, or in fp16 / bf16 where its values are fp16 / bf16 numbers (the native decode step: half the bytes, the
// same products, fp32 sums). Memory-bound: fp16 / bf16 rows stream one at a time, fp32 rows four at a time sharing
// each load of x. torch's fp32 matrix-vector product reached about a third of this CPU's read bandwidth on the
// 49152 x 576 head (6.8 ms vs 2.3 ms, 2 threads).
#ifdef LOWBIT_AVX512
inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load16(const at::Half* p, __mmask16 m) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p)); }
inline __m512 load16(const at::BFloat16* p, __mmask16 m) {  // bf16 is the top half of an fp32: shift into place
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}
#elif defined(LOWBIT_AVX2)
inline __m256 load8(const at::Half* p) { return half8(p); }
inline __m256 load8(const at::BFloat16* p) {
  return _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}
#endif

template <typename W>
torch::Tensor gemv_float(const torch::Tensor& x, const torch::Tensor& w) {
  const int64_t N = w.size(0), K = w.size(1);
  auto y = torch::empty({N}, x.options());
  const float* xp = x.data_ptr<float>();
  const W* wp = w.data_ptr<W>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    int64_t n = n0;
#ifdef LOWBIT_AVX512
    if constexpr (sizeof(W) == 2) {  // fp16 / bf16 (a float head): one row at a time, 64 weights a step
      // One sequential stream per thread and four accumulators: against four rows a pass with software prefetch
      // (kept for fp32 below), 0.87-0.91x the time on a 1B model's 128256 x 2048 bf16 head and 0.63-0.76x on
      // SmolLM2's 49152 x 576 (BENCHMARKS.md, issue 25's seventh pass); fp32 weights measured 0.88-1.05x: unchanged.
      for (; n < n1; ++n) {
        const W* r = wp + n * K;
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        int64_t k = 0;
        for (; k + 64 <= K; k += 64) {
          a0 = _mm512_fmadd_ps(load16(r + k, 0xFFFF), _mm512_loadu_ps(xp + k), a0);
          a1 = _mm512_fmadd_ps(load16(r + k + 16, 0xFFFF), _mm512_loadu_ps(xp + k + 16), a1);
          a2 = _mm512_fmadd_ps(load16(r + k + 32, 0xFFFF), _mm512_loadu_ps(xp + k + 32), a2);
          a3 = _mm512_fmadd_ps(load16(r + k + 48, 0xFFFF), _mm512_loadu_ps(xp + k + 48), a3);
        }
        for (; k < K; k += 16) {
          const __mmask16 m = lanes16(K - k);
          a0 = _mm512_fmadd_ps(load16(r + k, m), _mm512_maskz_loadu_ps(m, xp + k), a0);
        }
        yp[n] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
      }
    } else {  // fp32: four rows a pass share each load of x, the next four rows prefetched
      constexpr int64_t LINE = 64 / sizeof(W);  // weights per 64-byte line: prefetch once per line of each row
      for (; n + 4 <= n1; n += 4) {
        const W* r = wp + n * K;
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int64_t k = 0; k < K; k += 16) {
          if (k % LINE == 0) {  // the next 4 rows, one line each
            _mm_prefetch(reinterpret_cast<const char*>(r + 4 * K + k), _MM_HINT_T0);
            _mm_prefetch(reinterpret_cast<const char*>(r + 5 * K + k), _MM_HINT_T0);
            _mm_prefetch(reinterpret_cast<const char*>(r + 6 * K + k), _MM_HINT_T0);
            _mm_prefetch(reinterpret_cast<const char*>(r + 7 * K + k), _MM_HINT_T0);
          }
          const __mmask16 m = lanes16(K - k);
          const __m512 xv = _mm512_maskz_loadu_ps(m, xp + k);
          a0 = _mm512_fmadd_ps(load16(r + k, m), xv, a0);
          a1 = _mm512_fmadd_ps(load16(r + K + k, m), xv, a1);
          a2 = _mm512_fmadd_ps(load16(r + 2 * K + k, m), xv, a2);
          a3 = _mm512_fmadd_ps(load16(r + 3 * K + k, m), xv, a3);
        }
        yp[n] = _mm512_reduce_add_ps(a0);
        yp[n + 1] = _mm512_reduce_add_ps(a1);
        yp[n + 2] = _mm512_reduce_add_ps(a2);
        yp[n + 3] = _mm512_reduce_add_ps(a3);
      }
    }
#elif defined(LOWBIT_AVX2)
    if constexpr (sizeof(W) == 2) {  // fp16 / bf16: one row at a time, 32 weights a step, the tail below
      for (; n < n1; ++n) {
        const W* r = wp + n * K;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        int64_t k = 0;
        for (; k + 32 <= K; k += 32) {
          a0 = _mm256_fmadd_ps(load8(r + k), _mm256_loadu_ps(xp + k), a0);
          a1 = _mm256_fmadd_ps(load8(r + k + 8), _mm256_loadu_ps(xp + k + 8), a1);
          a2 = _mm256_fmadd_ps(load8(r + k + 16), _mm256_loadu_ps(xp + k + 16), a2);
          a3 = _mm256_fmadd_ps(load8(r + k + 24), _mm256_loadu_ps(xp + k + 24), a3);
        }
        float acc = hsum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
        for (; k < K; ++k) acc += static_cast<float>(r[k]) * xp[k];
        yp[n] = acc;
      }
    }
#endif
    for (; n < n1; ++n) {
      const W* r = wp + n * K;
      float acc = 0.f;
#pragma omp simd reduction(+ : acc)
      for (int64_t k = 0; k < K; ++k) acc += static_cast<float>(r[k]) * xp[k];
      yp[n] = acc;
    }
  });
  return y;
}

torch::Tensor gemv_f32(torch::Tensor x, torch::Tensor w) {
  TORCH_CHECK(x.dim() == 1 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(), "x must be contiguous fp32 (K,)");
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kFloat32 && w.is_contiguous() && w.size(1) == x.size(0), "w must be contiguous fp32 (N, K)");
  return gemv_float<float>(x, w);
}

torch::Tensor gemv_f16(torch::Tensor x, torch::Tensor w) {
  TORCH_CHECK(x.dim() == 1 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(), "x must be contiguous fp32 (K,)");
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kFloat16 && w.is_contiguous() && w.size(1) == x.size(0), "w must be contiguous fp16 (N, K)");
  return gemv_float<at::Half>(x, w);
}

torch::Tensor gemv_bf16(torch::Tensor x, torch::Tensor w) {
  TORCH_CHECK(x.dim() == 1 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(), "x must be contiguous fp32 (K,)");
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kBFloat16 && w.is_contiguous() && w.size(1) == x.size(0), "w must be contiguous bf16 (N, K)");
  return gemv_float<at::BFloat16>(x, w);
}

// The same kernels as dispatcher ops (lowbit::qgemv, lowbit::gemv_f32) for graphs torch.compile builds
// (lowbit/nn/compile.py): x (..., K) with one row; the result keeps x's leading dimensions.
torch::Tensor qgemv_op(const torch::Tensor& x, const torch::Tensor& codes, const torch::Tensor& scales,
                       const c10::optional<torch::Tensor>& zeros, const c10::optional<torch::Tensor>& levels,
                       int64_t bits, int64_t group_size, int64_t offset, bool int8_x) {
  auto sizes = x.sizes().vec();
  sizes.back() = codes.size(0);
  return qgemv(x.reshape({-1}).contiguous(), codes, scales, zeros, levels, bits, group_size, offset, int8_x).view(sizes);
}

torch::Tensor gemv_f32_op(const torch::Tensor& x, const torch::Tensor& w) {
  auto sizes = x.sizes().vec();
  sizes.back() = w.size(0);
  return gemv_f32(x.reshape({-1}).contiguous(), w.contiguous()).view(sizes);
}

bool bf16() {
#if defined(LOWBIT_AVX512) && defined(__AVX512BF16__)
  return true;
#else
  return false;
#endif
}

bool simd() {
#ifdef LOWBIT_AVX512
  return true;
#else
  return false;
#endif
}

}  // namespace

// csrc/int_gemm.cpp: the integer GEMM of activation-quantized layers and of small batches.
torch::Tensor qgemm_i8(torch::Tensor x, torch::Tensor codes, torch::Tensor scales, c10::optional<torch::Tensor> zeros,
                       int64_t bits, int64_t group_size, int64_t offset);
std::vector<torch::Tensor> act_codes(torch::Tensor x, int64_t act_bits, double clip_ratio);
torch::Tensor qgemm_act(torch::Tensor x, torch::Tensor codes, torch::Tensor scales, c10::optional<torch::Tensor> zeros,
                        int64_t bits, int64_t group_size, int64_t offset, int64_t act_bits, double clip_ratio);
void unpack_int8(torch::Tensor codes, c10::optional<torch::Tensor> zeros, int64_t bits, int64_t offset, int64_t r0,
                 int64_t r1, torch::Tensor out);
// The decode kernels for csrc/decode.cpp's native step.
torch::Tensor qgemv_kernel(torch::Tensor x, torch::Tensor codes, torch::Tensor scales,
                           c10::optional<torch::Tensor> zeros, c10::optional<torch::Tensor> levels, int64_t bits,
                           int64_t group_size, int64_t offset, bool int8_x) {
  return qgemv(x, codes, scales, zeros, levels, bits, group_size, offset, int8_x);
}
torch::Tensor gemv_f32_kernel(torch::Tensor x, torch::Tensor w) { return gemv_f32(x, w); }
torch::Tensor gemv_f16_kernel(torch::Tensor x, torch::Tensor w) { return gemv_f16(x, w); }
torch::Tensor gemv_bf16_kernel(torch::Tensor x, torch::Tensor w) { return gemv_bf16(x, w); }
std::vector<torch::Tensor> qgemv_multi_kernel(torch::Tensor x, std::vector<torch::Tensor> codes,
                                              std::vector<torch::Tensor> scales,
                                              std::vector<c10::optional<torch::Tensor>> zeros,
                                              c10::optional<torch::Tensor> levels, int64_t bits, int64_t group_size,
                                              int64_t offset, bool int8_x) {
  return qgemv_multi(x, codes, scales, zeros, levels, bits, group_size, offset, int8_x);
}
torch::Tensor qgemv_mixed_kernel(torch::Tensor x, std::vector<int64_t> widths, std::vector<torch::Tensor> codes,
                                 std::vector<torch::Tensor> books, torch::Tensor absmax, torch::Tensor perm,
                                 int64_t block) {
  return qgemv_mixed(x, widths, codes, books, absmax, perm, block);
}
// csrc/decode.cpp: the native decode step (NativeDecoder) and its Linears.
void bind_decode(pybind11::module& m);
void bind_attention(pybind11::module& m);
void bind_gram(pybind11::module& m);
void bind_scales(pybind11::module& m);
void bind_gemm_i8(pybind11::module& m);
void bind_hadamard(pybind11::module& m);
// csrc/gptq.cpp: GPTQ's column loop over one lazy block.
void gptq_block(torch::Tensor w, torch::Tensor u, torch::Tensor s, torch::Tensor z, int64_t qmax, torch::Tensor codes,
                torch::Tensor err);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("qgemv", &qgemv, "packed low-bit GEMV (one input row)");
  m.def("qgemv_multi", &qgemv_multi, "several packed weights of one format times one input row, in one call");
  m.def("qgemv_mixed", &qgemv_mixed, "mixed-width per-row-codebook GEMV (one input row, LowRA)");
  m.def("gemv_f32", &gemv_f32, "fp32 GEMV (one input row) for the float layers a packed model keeps");
  m.def("gemv_f16", &gemv_f16, "fp16-weight GEMV (one fp32 input row): a float head read at half the bytes");
  m.def("gemv_bf16", &gemv_bf16, "bf16-weight GEMV (one fp32 input row): a float head of bf16 values, half the bytes");
  m.def("vnni_applies", &vnni_applies, "whether the integer GEMMs (qgemm_act, AVX512-VNNI) take (bits, group_size, table)");
  m.def("int8_x_applies", &int8_x_applies, "whether the GEMV's int8-activation path (qgemv int8_x, qgemm_i8) takes "
        "(bits, group_size, table)");
  m.def("qgemm_i8", &qgemm_i8, "a few rows through the int8-activation kernel (small batches)");
  m.def("dequant_rows", &dequant_rows, "rows of a uniform packed weight dequantized into a bf16 or fp32 tile");
  m.def("dequant_mixed_rows", &dequant_mixed_rows, "rows of one width segment of a mixed-codebook weight (LowRA) "
        "dequantized into a bf16 or fp32 tile");
  m.def("bf16", &bf16, "whether dequant_rows's AVX512-BF16 path was compiled in");
  m.def("simd", &simd, "whether the AVX-512 paths were compiled in");
  m.def("act_codes", &act_codes, "per-token symmetric activation codes and scales (as qgemm_act rounds them)");
  m.def("qgemm_act", &qgemm_act, "integer GEMM of per-token quantized activations and a packed weight");
  m.def("unpack_int8", &unpack_int8, "rows of a packed weight with one zero point per row as int8 q - z");
  m.def("gptq_block", &gptq_block, "GPTQ's column loop over one lazy block, integer grid with fixed scales");
  bind_decode(m);
  bind_attention(m);
  bind_gram(m);
  bind_scales(m);
  bind_gemm_i8(m);
  bind_hadamard(m);
}

TORCH_LIBRARY_FRAGMENT(lowbit, m) {
  m.def("qgemv(Tensor x, Tensor codes, Tensor scales, Tensor? zeros, Tensor? levels, int bits, int group_size, "
        "int offset, bool int8_x) -> Tensor");
  m.def("gemv_f32(Tensor x, Tensor w) -> Tensor");
}

TORCH_LIBRARY_IMPL(lowbit, CPU, m) {
  m.impl("qgemv", &qgemv_op);
  m.impl("gemv_f32", &gemv_f32_op);
}
