// GPTQ's column loop over one lazy block (lowbit/quantizers/gptq.py, methods.md §3.2) for integer grids whose
// scales were fixed before the loop (act-order or static groups): given the block's factor U (upper Cholesky of
// the inverse Hessian), every output row is independent, so rows run in parallel and a row's block stays in L1.
// For column j of the block, in each row:
//   q_j = clamp(round(w_j / s_j) + z_j, 0, qmax),  e_j = (w_j - (q_j - z_j) s_j) / U_jj,  w_k -= e_j U_jk (k > j)
// (z_j = the offset 2^(b-1) for symmetric grids), the same fp32 operations as the Python loop it replaces.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>

// w, s, z, err: (rows, B) fp32 contiguous (w updated in place, err = e); u: (B, B) fp32; codes: (rows, B) uint8.
void gptq_block(torch::Tensor w, torch::Tensor u, torch::Tensor s, torch::Tensor z, int64_t qmax, torch::Tensor codes,
                torch::Tensor err) {
  for (const auto* t : {&w, &s, &z, &err})
    TORCH_CHECK(t->dim() == 2 && t->scalar_type() == torch::kFloat32 && t->is_contiguous() && t->sizes() == w.sizes(),
                "w, s, z and err must be contiguous fp32 of one shape (rows, B)");
  const int64_t R = w.size(0), B = w.size(1);
  TORCH_CHECK(u.scalar_type() == torch::kFloat32 && u.is_contiguous() && u.size(0) == B && u.size(1) == B, "u must be fp32 (B, B)");
  TORCH_CHECK(codes.scalar_type() == torch::kUInt8 && codes.is_contiguous() && codes.sizes() == w.sizes(), "codes must be uint8 (rows, B)");
  TORCH_CHECK(qmax >= 1 && qmax <= 255, "qmax must be 1..255");
  float* wp = w.data_ptr<float>();
  const float *up = u.data_ptr<float>(), *sp = s.data_ptr<float>(), *zp = z.data_ptr<float>();
  uint8_t* cp = codes.data_ptr<uint8_t>();
  float* ep = err.data_ptr<float>();
  const float top = float(qmax);
  at::parallel_for(0, R, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      float* wr = wp + r * B;
      for (int64_t j = 0; j < B; ++j) {
        const float sj = sp[r * B + j], zj = zp[r * B + j];
        const float q = std::min(top, std::max(0.f, std::nearbyint(wr[j] / sj) + zj));
        cp[r * B + j] = static_cast<uint8_t>(q);
        const float e = (wr[j] - (q - zj) * sj) / up[j * B + j];
        ep[r * B + j] = e;
        const float* uj = up + j * B;
        for (int64_t k = j + 1; k < B; ++k) wr[k] -= e * uj[k];
      }
    }
  });
}
