// Many rows of fp32 activations times a packed integer-code weight on AVX2 CPUs without AVX-512 (prefill, batches):
// qgemm_i8's kernel from kTileGemmRows rows up, and qgemm_act's (W4A8, W4A4) for any rows (csrc/int_gemm.cpp).
//
// Each activation row is rounded to int8 per weight group exactly as the int8 decode GEMV rounds one row (csrc/
// qgemv.cpp's quantize_x_into: s_x = max|x_g| / 127, round half to even, clamp to +-127), so every row keeps that
// kernel's error bound and a batch equals its rows run one at a time up to fp32 summation order:
//   y[m, n] = sum_g s_w[n, g] s_x[m, g] (sum_{k in g} q[n, k] a[m, k]) - sum_g s_w[n, g] z[n, g] s_x[m, g] sum_{k in g} a[m, k]
// (z: the zero point, or the format's offset).
//
// Layout: a tile of NR = 16 weight columns is unpacked once into units of 4 consecutive codes, one byte each,
// B[u][c] = q[c, 4u .. 4u + 3] (u8, a 32-bit lane per column), so one ymm holds 8 columns x 4 codes and
// vpmaddubsw(B, broadcast of 4 int8 activations) gives 16 int16 pair sums. Pair sums grow by at most
// 2 * (2^BITS - 1) * 128 per unit, so int16 holds kFlushUnits<BITS> units (8 for 4-bit codes, 42 for 2-bit, 127
// for 1-bit) before vpmaddwd widens them into int32; each group's int32 sums then meet their fp32 scales once.
// A micro tile of MR = 4 rows x 16 columns keeps its 8 int16 sums in registers; the activation rows stream from
// L2 while the tile (K x 16 bytes) stays in L1/L2. The tiles are split across torch's intra-op threads.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#if !(defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)) && defined(__AVX2__) && \
    defined(__FMA__) && defined(__F16C__)
#define LOWBIT_GEMM_I8 1
#include <immintrin.h>

namespace {

constexpr int kColumns = 16;  // NR: weight columns per tile (two ymm of 8 lanes)
constexpr int kRows = 4;      // MR: activation rows per micro tile

template <int BITS>  // activations in [-128, 127]: the rounded rows (+-127) and 8-bit activation codes alike
constexpr int kFlushUnits = 32767 / (2 * ((1 << BITS) - 1) * 128);

// Codes 4u .. 4u + 3 of a packed row (PER = 8 / BITS codes per byte, code p of a byte in bits p * BITS) as one
// byte each; bytes past the row read as zero codes (they meet zero activations).
template <int BITS>
inline uint32_t unit_of(const uint8_t* row, int64_t row_bytes, int64_t u) {
  if constexpr (BITS == 4) {
    const int64_t j = 2 * u;
    const uint32_t b0 = j < row_bytes ? row[j] : 0, b1 = j + 1 < row_bytes ? row[j + 1] : 0;
    return (b0 & 15) | ((b0 >> 4) << 8) | ((b1 & 15) << 16) | ((b1 >> 4) << 24);
  } else if constexpr (BITS == 2) {
    const uint32_t b = u < row_bytes ? row[u] : 0;
    return (b & 3) | (((b >> 2) & 3) << 8) | (((b >> 4) & 3) << 16) | ((b >> 6) << 24);
  } else {
    const uint32_t b = (u / 2 < row_bytes ? row[u / 2] : 0) >> (4 * (u & 1));
    return (b & 1) | (((b >> 1) & 1) << 8) | (((b >> 2) & 1) << 16) | (((b >> 3) & 1) << 24);
  }
}

// The activations rounded per group: a (M, Kp) int8 rows (zero padded to whole units), s_x and s_x * sum(a) per
// (row, group).
struct RoundedRows {
  int64_t Kp, groups;
  std::vector<int8_t> a;
  std::vector<float> scale, sum;

  RoundedRows(int64_t M, int64_t K, int64_t gs)
      : Kp((K + 3) / 4 * 4), groups((K + gs - 1) / gs), a(M * Kp, 0), scale(M * groups), sum(M * groups) {}
};

inline float hmax8(__m256 v) {
  __m128 t = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  t = _mm_max_ps(t, _mm_movehl_ps(t, t));
  return _mm_cvtss_f32(_mm_max_ss(t, _mm_movehdup_ps(t)));
}

inline int32_t hsum8_epi32(__m256i v) {
  __m128i t = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4e));
  return _mm_cvtsi128_si32(_mm_add_epi32(t, _mm_shuffle_epi32(t, 0xb1)));
}

}  // namespace

// One row x (K,) rounded to int8 per group of gs values, 8 values a step: a[k] (k < K), scale[g] = s_x =
// max|x_g| / 127 and sum[g] = s_x * sum of the group's rounded values. x * (127 / top) rounded half to even under
// the default MXCSR, clamped to +-127: the int8 decode GEMV's rounding (csrc/qgemv.cpp's AVX2 quantize_x_into calls
// this too, so the decode rows and these tiles round alike).
void round_groups_int8(const float* x, int64_t K, int64_t gs, int64_t groups, int8_t* a, float* scale, float* sum) {
  const __m256 sign = _mm256_set1_ps(-0.f), hi = _mm256_set1_ps(127.f), lo = _mm256_set1_ps(-127.f);
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t k0 = g * gs, len = std::min(K, k0 + gs) - k0, vec = len & ~int64_t(7);
    __m256 vtop = _mm256_setzero_ps();
    for (int64_t i = 0; i < vec; i += 8) vtop = _mm256_max_ps(vtop, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + k0 + i)));
    float top = hmax8(vtop);
    for (int64_t i = vec; i < len; ++i) top = std::max(top, std::fabs(x[k0 + i]));
    scale[g] = top / 127.f;
    const float inv = top > 0.f ? 127.f / top : 0.f;
    const __m256 vinv = _mm256_set1_ps(inv);
    __m256i vtotal = _mm256_setzero_si256();
    for (int64_t i = 0; i < vec; i += 8) {
      const __m256 r = _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(x + k0 + i), vinv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      const __m256i v = _mm256_cvtps_epi32(_mm256_min_ps(hi, _mm256_max_ps(lo, r)));
      vtotal = _mm256_add_epi32(vtotal, v);
      const __m128i w16 = _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
      _mm_storel_epi64(reinterpret_cast<__m128i*>(a + k0 + i), _mm_packs_epi16(w16, w16));
    }
    int32_t total = hsum8_epi32(vtotal);
    for (int64_t i = vec; i < len; ++i) {
      const int v = std::max(-127, std::min(127, static_cast<int>(std::nearbyint(x[k0 + i] * inv))));
      a[k0 + i] = static_cast<int8_t>(v);
      total += v;
    }
    sum[g] = static_cast<float>(total) * scale[g];
  }
}

namespace {

RoundedRows round_rows(const float* x, int64_t x_stride, int64_t M, int64_t K, int64_t gs) {
  RoundedRows r(M, K, gs);
  at::parallel_for(0, M, 8, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m)
      round_groups_int8(x + m * x_stride, K, gs, r.groups, r.a.data() + m * r.Kp, r.scale.data() + m * r.groups,
                        r.sum.data() + m * r.groups);
  });
  return r;
}

// Activation codes already quantized per token (csrc/int_gemm.cpp's act_codes: q (M, K) int8, s (M, 1)) as
// RoundedRows: every group of a row has the row's scale.
RoundedRows coded_rows(const torch::Tensor& q, const torch::Tensor& s, int64_t gs) {
  const int64_t M = q.size(0), K = q.size(1);
  RoundedRows r(M, K, gs);
  const int8_t* qp = q.data_ptr<int8_t>();
  const float* sp = s.data_ptr<float>();
  at::parallel_for(0, M, 8, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      std::memcpy(r.a.data() + m * r.Kp, qp + m * K, K);
      for (int64_t g = 0; g < r.groups; ++g) {
        int32_t total = 0;
        for (int64_t k = g * gs; k < std::min(K, (g + 1) * gs); ++k) total += qp[m * K + k];
        r.scale[m * r.groups + g] = sp[m];
        r.sum[m * r.groups + g] = static_cast<float>(total) * sp[m];
      }
    }
  });
  return r;
}

// One tile's weight: B (U, kColumns) code units, s_w and s_w * z per (group, column); columns past N are zero.
struct Tile {
  std::vector<uint32_t> units;
  std::vector<float> scale, zero_share;  // (groups, kColumns)
};

// Units u .. u + 7 of a packed row as 32 bytes (4-bit codes: 16 bytes read, 2-bit: 8, 1-bit: 4, from the row's
// byte u * 4 / PER on).
template <int BITS>
inline __m256i eight_units(const uint8_t* row, int64_t u) {
  if constexpr (BITS == 4) {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 2 * u)), low = _mm_set1_epi8(15);
    const __m128i lo = _mm_and_si128(v, low), hi = _mm_and_si128(_mm_srli_epi16(v, 4), low);
    return _mm256_set_m128i(_mm_unpackhi_epi8(lo, hi), _mm_unpacklo_epi8(lo, hi));
  } else if constexpr (BITS == 2) {
    const __m128i v = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + u)), three = _mm_set1_epi8(3);
    const __m128i p0 = _mm_and_si128(v, three), p1 = _mm_and_si128(_mm_srli_epi16(v, 2), three);
    const __m128i p2 = _mm_and_si128(_mm_srli_epi16(v, 4), three), p3 = _mm_and_si128(_mm_srli_epi16(v, 6), three);
    const __m128i t0 = _mm_unpacklo_epi8(p0, p1), t1 = _mm_unpacklo_epi8(p2, p3);
    return _mm256_set_m128i(_mm_unpackhi_epi16(t0, t1), _mm_unpacklo_epi16(t0, t1));
  } else {
    alignas(32) uint32_t units[8];
    for (int i = 0; i < 8; ++i) units[i] = unit_of<1>(row, (u + 8) / 2, u + i);
    return _mm256_load_si256(reinterpret_cast<const __m256i*>(units));
  }
}

// r[i] = lane i of each of r[0..7] in turn: an 8 x 8 transpose of 32-bit lanes (row = column of the weight).
inline void transpose8(__m256i (&r)[8]) {
  __m256i t[8], s[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    s[i] = _mm256_unpacklo_epi64(t[i], t[i + 2]);
    s[i + 1] = _mm256_unpackhi_epi64(t[i], t[i + 2]);
    s[i + 2] = _mm256_unpacklo_epi64(t[i + 1], t[i + 3]);
    s[i + 3] = _mm256_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_permute2x128_si256(s[i], s[i + 4], 0x20);
    r[i + 4] = _mm256_permute2x128_si256(s[i], s[i + 4], 0x31);
  }
}

template <int BITS>
void fill_tile(Tile& t, const uint8_t* codes, int64_t row_bytes, const at::Half* scales, const uint8_t* zeros,
               bool shared, float offset, int64_t groups, int64_t U, int64_t n0, int64_t n1) {
  constexpr int PER = 8 / BITS;
  t.units.resize(U * kColumns);
  t.scale.assign(groups * kColumns, 0.f);
  t.zero_share.assign(groups * kColumns, 0.f);
  const int64_t width = n1 - n0;
  // Whole blocks of 8 units that lie inside every row: 8 columns x 8 units at a time, transposed in registers.
  const int64_t whole = std::min(row_bytes * PER / 4, U) / 8 * 8;
  for (int64_t c0 = 0; c0 < kColumns; c0 += 8) {
    for (int64_t u = 0; u < whole; u += 8) {
      __m256i r[8];
      for (int i = 0; i < 8; ++i)
        r[i] = c0 + i < width ? eight_units<BITS>(codes + (n0 + c0 + i) * row_bytes, u) : _mm256_setzero_si256();
      transpose8(r);
      for (int i = 0; i < 8; ++i) _mm256_storeu_si256(reinterpret_cast<__m256i*>(t.units.data() + (u + i) * kColumns + c0), r[i]);
    }
  }
  for (int64_t c = 0; c < kColumns; ++c) {
    const uint8_t* row = c < width ? codes + (n0 + c) * row_bytes : nullptr;
    for (int64_t u = whole; u < U; ++u) t.units[u * kColumns + c] = row ? unit_of<BITS>(row, row_bytes, u) : 0;
  }
  for (int64_t c = 0; c < width; ++c) {
    const int64_t srow = shared ? 0 : (n0 + c) * groups;
    for (int64_t g = 0; g < groups; ++g) {
      const float s = float(scales[srow + g]);
      t.scale[g * kColumns + c] = s;
      t.zero_share[g * kColumns + c] = s * (zeros ? float(zeros[srow + g]) : offset);
    }
  }
}

// Rows [0, MR) of `a` (row stride lda) times the tile into y (row stride ldy, kColumns columns).
template <int BITS, int MR>
void micro_tile(const int8_t* a, int64_t lda, const float* sx, const float* sum, int64_t groups, const Tile& t,
                int64_t units_per_group, int64_t U, float* y, int64_t ldy) {
  constexpr int NRV = kColumns / 8, BLOCK = 8, FLUSH_BLOCKS = kFlushUnits<BITS> / BLOCK;
  const __m256i ones = _mm256_set1_epi16(1);
  const uint32_t* B = t.units.data();
  __m256 out[MR][NRV];
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < NRV; ++j) out[m][j] = _mm256_setzero_ps();
  auto step = [&](int64_t u, __m256i(&pairs)[MR][NRV]) __attribute__((always_inline)) {
    __m256i w[NRV];
    for (int j = 0; j < NRV; ++j) {  // kept in registers: GCC otherwise reloads them for the later rows
      w[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(B + u * kColumns + 8 * j));
      __asm__("" : "+x"(w[j]));  // (0.94x the time at 512 rows: BENCHMARKS.md, session 56)
    }
    for (int m = 0; m < MR; ++m) {
      int32_t four;
      std::memcpy(&four, a + m * lda + 4 * u, 4);
      const __m256i x4 = _mm256_set1_epi32(four);
      for (int j = 0; j < NRV; ++j) pairs[m][j] = _mm256_add_epi16(pairs[m][j], _mm256_maddubs_epi16(w[j], x4));
    }
  };
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t u0 = g * units_per_group, u1 = std::min(U, u0 + units_per_group);
    __m256i sums[MR][NRV];
    for (int m = 0; m < MR; ++m)
      for (int j = 0; j < NRV; ++j) sums[m][j] = _mm256_setzero_si256();
    int64_t u = u0;
    while (u < u1) {  // int16 pair sums over at most kFlushUnits units, then widened into int32
      __m256i pairs[MR][NRV] = {};
      const int64_t end = std::min<int64_t>(u1, u + FLUSH_BLOCKS * BLOCK);
      for (; u + BLOCK <= end; u += BLOCK) {
#pragma GCC unroll 8
        for (int s = 0; s < BLOCK; ++s) step(u + s, pairs);
      }
      for (; u < end; ++u) step(u, pairs);
      for (int m = 0; m < MR; ++m)
        for (int j = 0; j < NRV; ++j) sums[m][j] = _mm256_add_epi32(sums[m][j], _mm256_madd_epi16(pairs[m][j], ones));
    }
    for (int j = 0; j < NRV; ++j) {
      const __m256 s = _mm256_loadu_ps(t.scale.data() + g * kColumns + 8 * j);
      const __m256 z = _mm256_loadu_ps(t.zero_share.data() + g * kColumns + 8 * j);
      for (int m = 0; m < MR; ++m) {
        const __m256 combined = _mm256_mul_ps(s, _mm256_set1_ps(sx[m * groups + g]));
        out[m][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums[m][j]), combined, out[m][j]);
        out[m][j] = _mm256_fnmadd_ps(z, _mm256_set1_ps(sum[m * groups + g]), out[m][j]);
      }
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < NRV; ++j) _mm256_storeu_ps(y + m * ldy + 8 * j, out[m][j]);
}

// The rows r (M of them) times the packed weight into y (M, N).
template <int BITS>
void gemm_tiles(const RoundedRows& r, int64_t M, const uint8_t* codes, int64_t N, int64_t row_bytes,
                const at::Half* scales, const uint8_t* zeros, bool shared, float offset, int64_t gs, float* y) {
  const int64_t U = r.Kp / 4, upg = gs / 4, tiles = (N + kColumns - 1) / kColumns;
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    Tile tile;
    alignas(32) float part[kRows * kColumns];  // a micro tile's output where the tile is short of columns
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * kColumns, width = std::min<int64_t>(kColumns, N - n0);
      fill_tile<BITS>(tile, codes, row_bytes, scales, zeros, shared, offset, r.groups, U, n0, n0 + width);
      for (int64_t m = 0; m < M; m += kRows) {
        const int64_t rows = std::min<int64_t>(kRows, M - m);
        const bool whole = width == kColumns;
        float* dst = whole ? y + m * N + n0 : part;
        const int64_t ldy = whole ? N : kColumns;
        const int8_t* a = r.a.data() + m * r.Kp;
        const float *sx = r.scale.data() + m * r.groups, *sm = r.sum.data() + m * r.groups;
        switch (rows) {
#define LOWBIT_ROWS(R) case R: micro_tile<BITS, R>(a, r.Kp, sx, sm, r.groups, tile, upg, U, dst, ldy); break;
          LOWBIT_ROWS(4) LOWBIT_ROWS(3) LOWBIT_ROWS(2) LOWBIT_ROWS(1)
#undef LOWBIT_ROWS
        }
        if (!whole)
          for (int64_t i = 0; i < rows; ++i) std::memcpy(y + (m + i) * N + n0, part + i * kColumns, width * sizeof(float));
      }
    }
  });
}

}  // namespace
#endif  // LOWBIT_GEMM_I8

// Whether qgemm_i8_tiles was compiled in (an AVX2 build without AVX-512).
bool gemm_i8_tiles_built() {
#ifdef LOWBIT_GEMM_I8
  return true;
#else
  return false;
#endif
}

std::vector<torch::Tensor> act_codes(torch::Tensor x, int64_t act_bits, double clip_ratio);  // csrc/int_gemm.cpp

namespace {

// The checks both entry points share (csrc/int_gemm.cpp checked the tensors against x); y (M, N) fp32.
torch::Tensor output_for(const torch::Tensor& x, const torch::Tensor& codes, int64_t bits, int64_t group_size) {
  TORCH_CHECK(gemm_i8_tiles_built(), "the int8 tile GEMM needs an AVX2 build without AVX-512");
  TORCH_CHECK(group_size % 4 == 0 && (bits == 1 || bits == 2 || bits == 4), "the int8 tile GEMM takes 1, 2 or 4-bit codes in groups of whole 4-code units");
  return torch::empty({x.size(0), codes.size(0)}, x.options());
}

#ifdef LOWBIT_GEMM_I8
void run_tiles(const RoundedRows& r, int64_t M, const torch::Tensor& codes, const torch::Tensor& scales,
               const c10::optional<torch::Tensor>& zeros, int64_t bits, int64_t group_size, int64_t offset,
               torch::Tensor& y) {
  const int64_t N = codes.size(0);
  const uint8_t* zp = zeros.has_value() ? zeros->data_ptr<uint8_t>() : nullptr;
  const bool shared = scales.size(0) == 1 && N != 1;
  switch (bits) {
#define LOWBIT_CASE(B) case B: gemm_tiles<B>(r, M, codes.data_ptr<uint8_t>(), N, codes.size(1), scales.data_ptr<at::Half>(), \
                                             zp, shared, float(offset), group_size, y.data_ptr<float>()); break;
    LOWBIT_CASE(1) LOWBIT_CASE(2) LOWBIT_CASE(4)
#undef LOWBIT_CASE
  }
}
#endif

}  // namespace

// x (M, K) fp32 rows with unit column stride times a packed weight of 1, 2 or 4-bit integer codes whose groups hold
// whole 4-code units (csrc/int_gemm.cpp's qgemm_i8 checked the arguments) -> (M, N) fp32: each row rounded to int8
// per weight group as the int8 decode GEMV rounds one row.
torch::Tensor qgemm_i8_tiles(const torch::Tensor& x, const torch::Tensor& codes, const torch::Tensor& scales,
                             const c10::optional<torch::Tensor>& zeros, int64_t bits, int64_t group_size,
                             int64_t offset) {
  auto y = output_for(x, codes, bits, group_size);
#ifdef LOWBIT_GEMM_I8
  const int64_t M = x.size(0), K = x.size(1);
  if (K == 0 || M == 0) return y.zero_();
  run_tiles(round_rows(x.data_ptr<float>(), x.stride(0), M, K, group_size), M, codes, scales, zeros, bits, group_size,
            offset, y);
#endif
  return y;
}

// The same GEMM with the activations quantized per token instead (csrc/int_gemm.cpp's qgemm_act on an AVX2 build:
// W4A8 and W4A4 layers, any number of rows): the codes of act_codes, the same codes the simulated path rounds to.
torch::Tensor qgemm_act_tiles(const torch::Tensor& x, const torch::Tensor& codes, const torch::Tensor& scales,
                              const c10::optional<torch::Tensor>& zeros, int64_t bits, int64_t group_size,
                              int64_t offset, int64_t act_bits, double clip_ratio) {
  auto y = output_for(x, codes, bits, group_size);
#ifdef LOWBIT_GEMM_I8
  if (x.size(1) == 0 || x.size(0) == 0) return y.zero_();
  const auto qs = act_codes(x, act_bits, clip_ratio);
  run_tiles(coded_rows(qs[0], qs[1], group_size), x.size(0), codes, scales, zeros, bits, group_size, offset, y);
#endif
  return y;
}

void bind_gemm_i8(pybind11::module& m) {
  m.def("qgemm_i8_tiles", &qgemm_i8_tiles, "many rows through qgemm_i8's AVX2 tile kernel (prefill, batches)");
  m.def("gemm_i8_tiles_built", &gemm_i8_tiles_built, "whether qgemm_i8_tiles was compiled in (AVX2 without AVX-512)");
}
