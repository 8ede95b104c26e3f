// The online Hadamard rotation of activation rows (lowbit/kernels/hadamard.py, hadamard_transform): x (rows, n)
// fp32, n = m · q with q a power of two, out = x @ (H_m ⊗ H_q), H_q Sylvester's orthonormal matrix and `hm` (m, m)
// the orthonormal base matrix (m = 1: none). Each row is rotated in a buffer that stays in cache: an in-place fast
// Walsh–Hadamard transform of each of its m blocks of q values (log2 q butterfly passes), then output block
// i = Σ_k hm[k, i] · block k (H_mᵀ mixing the blocks), scaled by 1 / sqrt(q). Eight rows at a time, transposed so
// that each vector lane holds one row (8 · n floats a buffer: 48 KiB at n = 1,536, in L2): every butterfly stage and
// the mixing run 8 rows per instruction. torch's path (a GEMM per Sylvester factor and a broadcast batched GEMM for
// H_m) reads and writes the activations once per factor. Groups of 8 rows run in parallel.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

#if defined(__AVX2__)
// The 8 x 8 block of fp32 values in r[0..8) (row i: 8 values) transposed in registers.
inline void transpose8(__m256 r[8]) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r[0] = _mm256_permute2f128_ps(u0, u4, 0x20); r[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
  r[2] = _mm256_permute2f128_ps(u2, u6, 0x20); r[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
  r[4] = _mm256_permute2f128_ps(u0, u4, 0x31); r[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
  r[6] = _mm256_permute2f128_ps(u2, u6, 0x31); r[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}
#endif

constexpr int64_t LANES = 8;  // rows rotated together, one per vector lane (the loops over them vectorize)

// In-place unnormalized Walsh–Hadamard transform of the q values v[j · LANES + l], j in [0, q), of each lane l.
void fwht_block(float* v, int64_t q) {
  for (int64_t h = 1; h < q; h *= 2)
    for (int64_t i = 0; i < q; i += 2 * h)
      for (int64_t j = i; j < i + h; ++j) {
        float* a = v + j * LANES;
        float* b = v + (j + h) * LANES;
        for (int64_t l = 0; l < LANES; ++l) {
          const float s = a[l], d = b[l];
          a[l] = s + d;
          b[l] = s - d;
        }
      }
}

torch::Tensor hadamard_rows(torch::Tensor x, torch::Tensor hm) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat && x.is_contiguous(), "x must be contiguous fp32 (rows, n)");
  TORCH_CHECK(hm.dim() == 2 && hm.scalar_type() == torch::kFloat && hm.is_contiguous() && hm.size(0) == hm.size(1),
              "hm must be contiguous fp32 (m, m)");
  const int64_t rows = x.size(0), n = x.size(1), m = hm.size(0);
  TORCH_CHECK(m >= 1 && n > 0 && n % m == 0 && ((n / m) & (n / m - 1)) == 0, "n must be m times a power of two");
  const int64_t q = n / m, groups = (rows + LANES - 1) / LANES;
  torch::Tensor out = torch::empty_like(x);
  const float* xp = x.data_ptr<float>();
  const float* hp = hm.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float norm = 1.f / std::sqrt(static_cast<float>(q));
  at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
    std::vector<float> v(n * LANES), w(m > 1 ? n * LANES : 0);  // (n, LANES): value j of lane l at j · LANES + l
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t r0 = g * LANES, live = std::min(LANES, rows - r0);
      int64_t done = 0;  // values of each row moved by the 8 x 8 register transposes
#if defined(__AVX2__)
      if (live == LANES)
        for (; done + 8 <= n; done += 8) {
          __m256 r[8];
          for (int64_t l = 0; l < LANES; ++l) r[l] = _mm256_loadu_ps(xp + (r0 + l) * n + done);
          transpose8(r);
          for (int64_t t = 0; t < 8; ++t) _mm256_storeu_ps(v.data() + (done + t) * LANES, r[t]);
        }
#endif
      for (int64_t l = 0; l < LANES; ++l) {  // the rest of the rows in, transposed (lanes past the last row: zeros)
        const float* src = xp + (r0 + l) * n;
        for (int64_t j = done; j < n; ++j) v[j * LANES + l] = l < live ? src[j] : 0.f;
      }
      for (int64_t k = 0; k < m; ++k) fwht_block(v.data() + k * q * LANES, q);
      const float* res = v.data();
      if (m > 1) {  // block i of w = Σ_k hm[k, i] · block k of v
        constexpr int64_t CHUNK = 4 * LANES;  // q · LANES is a multiple of LANES; sums kept in registers
        for (int64_t i = 0; i < m; ++i)
          for (int64_t j0 = 0; j0 < q * LANES; j0 += CHUNK) {
            const int64_t len = std::min(CHUNK, q * LANES - j0);
            float acc[CHUNK] = {0.f};
            for (int64_t k = 0; k < m; ++k) {
              const float c = hp[k * m + i];
              const float* src = v.data() + k * q * LANES + j0;
              if (len == CHUNK)
                for (int64_t j = 0; j < CHUNK; ++j) acc[j] += c * src[j];
              else
                for (int64_t j = 0; j < len; ++j) acc[j] += c * src[j];
            }
            std::copy(acc, acc + len, w.data() + i * q * LANES + j0);
          }
        res = w.data();
      }
      done = 0;
#if defined(__AVX2__)
      if (live == LANES)
        for (const __m256 scale = _mm256_set1_ps(norm); done + 8 <= n; done += 8) {
          __m256 r[8];
          for (int64_t t = 0; t < 8; ++t) r[t] = _mm256_loadu_ps(res + (done + t) * LANES);
          transpose8(r);
          for (int64_t l = 0; l < LANES; ++l) _mm256_storeu_ps(op + (r0 + l) * n + done, _mm256_mul_ps(r[l], scale));
        }
#endif
      for (int64_t l = 0; l < live; ++l) {  // the rest of the rows out
        float* dst = op + (r0 + l) * n;
        for (int64_t j = done; j < n; ++j) dst[j] = res[j * LANES + l] * norm;
      }
    }
  });
  return out;
}

}  // namespace

void bind_hadamard(pybind11::module& m) {
  m.def("hadamard_rows", &hadamard_rows, "rows of x @ (H_m ⊗ H_q): a fast Walsh–Hadamard transform per q-block, "
        "then H_m across the blocks", pybind11::call_guard<pybind11::gil_scoped_release>());
}
