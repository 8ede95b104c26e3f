// GPTQ's Hessian update from bf16 activations (lowbit/hessian.py): U[a, b] += Σ_n x[n, a] x[n, b] for b >= a, with
// x rounded to bf16 (nearest even) — what a Linear under bf16 autocast multiplies — and every product and sum in
// fp32: AVX512-BF16's dot product of pairs (vdpbf16ps) adds x[2p, a] x[2p, b] + x[2p+1, a] x[2p+1, b] to an fp32
// lane, exactly (a product of two bf16 values fits fp32). So the result is the fp32 Gram matrix of the rounded
// inputs up to summation order — still positive semi-definite, unlike a Gram matrix rounded to bf16 — at up to
// twice the multiply rate of fp32.
//
// The inputs are packed once into panels of 32 columns, a row per pair of tokens (each 32-bit lane holds one
// column's two tokens); the update runs 32 columns (two registers) × 8 rows at a time, rows up to the panel's end.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <vector>

namespace {

constexpr int64_t PANEL = 32;  // columns per packed panel
constexpr int64_t ROWS = 8;    // rows of U per register tile

bool gram_bf16_applies() {
#ifdef __AVX512BF16__
  return true;
#else
  return false;
#endif
}

#ifdef __AVX512BF16__
inline __mmask16 first(int64_t n) { return n <= 0 ? 0 : n >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << n) - 1); }

// 16 values of one token row as bf16 bits in the low half of 32-bit lanes (columns past `n` zero).
inline __m512i bits16(const float* row, int64_t n) {
  const __m512 v = _mm512_maskz_loadu_ps(first(n), row);
  return _mm512_cvtepu16_epi32(reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));
}
inline __m512i bits16(const at::BFloat16* row, int64_t n) {
  return _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(first(n), row));
}

// packed[c][p][i] = bits(x[2p, 32c + i]) | bits(x[2p + 1, 32c + i]) << 16; missing tokens and columns are zeros.
template <typename T>
void pack(const T* x, int64_t N, int64_t d, int64_t stride, uint32_t* packed) {
  const int64_t P = (N + 1) / 2, panels = (d + PANEL - 1) / PANEL;
  at::parallel_for(0, P, 64, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const T* even = x + 2 * p * stride;
      const T* odd = 2 * p + 1 < N ? even + stride : nullptr;
      for (int64_t c = 0; c < panels; ++c)
        for (int64_t h = 0; h < PANEL; h += 16) {
          const int64_t col = c * PANEL + h, n = d - col;
          __m512i pair = bits16(even + col, n);
          if (odd != nullptr) pair = _mm512_or_si512(pair, _mm512_slli_epi32(bits16(odd + col, n), 16));
          _mm512_storeu_si512(packed + (c * P + p) * PANEL + h, pair);
        }
    }
  });
}

// U[r0 + t, 32 c + i] += Σ_p rows[p][t] · cols[p][i] for t < 8, i < 32 (bounds-checked on the store).
void tile(const uint32_t* cols, const uint32_t* rows, int64_t P, float* U, int64_t d, int64_t r0, int64_t c0) {
  __m512 acc[ROWS][2];
  for (auto& a : acc) a[0] = a[1] = _mm512_setzero_ps();
  for (int64_t p = 0; p < P; ++p) {
    const __m512bh a0 = reinterpret_cast<__m512bh>(_mm512_loadu_si512(cols + p * PANEL));
    const __m512bh a1 = reinterpret_cast<__m512bh>(_mm512_loadu_si512(cols + p * PANEL + 16));
    const uint32_t* r = rows + p * PANEL;
    for (int t = 0; t < ROWS; ++t) {
      const __m512bh b = reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(r[t])));
      acc[t][0] = _mm512_dpbf16_ps(acc[t][0], a0, b);
      acc[t][1] = _mm512_dpbf16_ps(acc[t][1], a1, b);
    }
  }
  for (int t = 0; t < ROWS && r0 + t < d; ++t)
    for (int h = 0; h < 2; ++h) {
      const __mmask16 m = first(d - c0 - 16 * h);
      float* u = U + (r0 + t) * d + c0 + 16 * h;
      _mm512_mask_storeu_ps(u, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, u), acc[t][h]));
    }
}
#endif

// x (N, d) fp32 or bf16 with a contiguous last dimension; upper (d, d) fp32 contiguous, updated in place: the blocks
// of 8 rows × 32 columns on and above the diagonal get Σ_n x[n]ᵀ x[n] of the bf16-rounded rows (entries below the
// diagonal inside those blocks get their share too; the caller reads the upper triangle only).
void gram_upper_bf16(torch::Tensor x, torch::Tensor upper) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "x must be (tokens, width) with contiguous rows");
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 || x.scalar_type() == torch::kBFloat16, "x must be fp32 or bf16");
  const int64_t N = x.size(0), d = x.size(1);
  TORCH_CHECK(upper.scalar_type() == torch::kFloat32 && upper.is_contiguous() && upper.size(0) == d &&
                  upper.size(1) == d, "upper must be contiguous fp32 (width, width)");
  TORCH_CHECK(gram_bf16_applies(), "gram_upper_bf16 needs a build with AVX512-BF16");
#ifdef __AVX512BF16__
  if (N == 0 || d == 0) return;
  const int64_t P = (N + 1) / 2, panels = (d + PANEL - 1) / PANEL;
  std::vector<uint32_t> packed(panels * P * PANEL);
  if (x.scalar_type() == torch::kFloat32)
    pack(x.data_ptr<float>(), N, d, x.stride(0), packed.data());
  else
    pack(x.data_ptr<at::BFloat16>(), N, d, x.stride(0), packed.data());
  float* U = upper.data_ptr<float>();
  // A task is one panel of columns with every row tile up to its end; panels in the order 0, last, 1, last - 1, ...
  // so that each thread's contiguous share holds cheap and costly ones alike.
  at::parallel_for(0, panels, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t c = t % 2 == 0 ? t / 2 : panels - 1 - t / 2;
      const uint32_t* cols = packed.data() + c * P * PANEL;
      for (int64_t r0 = 0; r0 < std::min(d, (c + 1) * PANEL); r0 += ROWS)
        tile(cols, packed.data() + (r0 / PANEL) * P * PANEL + r0 % PANEL, P, U, d, r0, c * PANEL);
    }
  });
#endif
}

}  // namespace

void bind_gram(pybind11::module& m) {
  m.def("gram_upper_bf16", &gram_upper_bf16, "upper blocks of xᵀx from bf16-rounded x, fp32 sums (GPTQ's Hessian)",
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("gram_bf16_applies", &gram_bf16_applies, "whether gram_upper_bf16 was compiled in (AVX512-BF16)");
}
