// lowbit CPU decode kernel: y = x @ W^T for one input row, W bit-packed (layout lsb-rows-v1, see
// lowbit/formats/packing.py). Each group of codes is unpacked into a small float buffer and dotted with the
// matching slice of x; the packed weight is read once and no dequantized copy of W is ever written.
//   int formats:      y_n = sum_g s_ng * (sum_k q_k x_k - z_ng * sum_k x_k)     (z = offset for symmetric)
//   codebook formats: y_n = sum_g s_ng * sum_k levels[q_k] x_k
#include <torch/extension.h>
#include <ATen/Parallel.h>

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

torch::Tensor qgemv(torch::Tensor x, torch::Tensor codes, torch::Tensor scales, c10::optional<torch::Tensor> zeros,
                    c10::optional<torch::Tensor> levels, int64_t bits, int64_t group_size, int64_t offset) {
  TORCH_CHECK(x.dim() == 1 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(), "x must be contiguous fp32 (K,)");
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == torch::kUInt8 && codes.is_contiguous(), "codes must be uint8 (N, row_bytes)");
  TORCH_CHECK(scales.dim() == 2 && scales.scalar_type() == torch::kFloat16 && scales.is_contiguous(), "scales must be fp16 (rows, groups)");
  TORCH_CHECK(group_size > 0 && group_size % 8 == 0, "group_size must be a positive multiple of 8");
  const int64_t N = codes.size(0), row_bytes = codes.size(1), K = x.size(0), groups = scales.size(1);
  TORCH_CHECK(groups == (K + group_size - 1) / group_size, "scales do not match K and group_size");
  TORCH_CHECK(row_bytes == (K * bits + 7) / 8, "codes do not match K and bits");
  const uint8_t* zp = nullptr;
  if (zeros.has_value()) {
    TORCH_CHECK(zeros->scalar_type() == torch::kUInt8 && zeros->is_contiguous() && zeros->sizes() == scales.sizes(), "zeros must be uint8 like scales");
    zp = zeros->data_ptr<uint8_t>();
  }
  const float* lut = nullptr;
  if (levels.has_value()) {
    TORCH_CHECK(levels->scalar_type() == torch::kFloat32 && levels->is_contiguous() && levels->numel() >= (1 << bits), "levels must be fp32 with 2^bits entries");
    lut = levels->data_ptr<float>();
  }
  const float* xp = x.data_ptr<float>();
  std::vector<float> xsum(groups, 0.f);
  for (int64_t g = 0; g < groups; ++g)
    for (int64_t k = g * group_size; k < std::min(K, (g + 1) * group_size); ++k) xsum[g] += xp[k];
  auto y = torch::empty({N}, x.options());
  float* yp = y.data_ptr<float>();
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const at::Half* sp = scales.data_ptr<at::Half>();
  const bool shared = scales.size(0) == 1 && N != 1;
  at::parallel_for(0, N, 8, [&](int64_t n0, int64_t n1) {
    switch (bits) {
#define LOWBIT_CASE(B) case B: gemv_rows<B>(xp, xsum.data(), cp, row_bytes, sp, zp, shared, lut, float(offset), K, group_size, groups, n0, n1, yp); break;
      LOWBIT_CASE(1) LOWBIT_CASE(2) LOWBIT_CASE(3) LOWBIT_CASE(4) LOWBIT_CASE(5) LOWBIT_CASE(6) LOWBIT_CASE(7) LOWBIT_CASE(8)
#undef LOWBIT_CASE
      default: TORCH_CHECK(false, "bits must be 1..8");
    }
  });
  return y;
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

torch::Tensor qgemv_mixed(torch::Tensor x, std::vector<int64_t> widths, std::vector<torch::Tensor> codes,
                          std::vector<torch::Tensor> books, torch::Tensor absmax, torch::Tensor perm, int64_t block) {
  TORCH_CHECK(x.dim() == 1 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(), "x must be contiguous fp32 (K,)");
  TORCH_CHECK(widths.size() == codes.size() && codes.size() == books.size(), "one codes and codebook tensor per width");
  TORCH_CHECK(absmax.scalar_type() == torch::kFloat16 && absmax.is_contiguous() && absmax.dim() == 2, "absmax must be fp16 (out, blocks)");
  TORCH_CHECK(perm.scalar_type() == torch::kInt32 && perm.is_contiguous(), "perm must be int32");
  TORCH_CHECK(block > 0 && block % 8 == 0, "block_size must be a positive multiple of 8");
  const int64_t K = x.size(0), N = absmax.size(0), blocks = absmax.size(1);
  TORCH_CHECK(blocks == (K + block - 1) / block && perm.numel() == N, "absmax/perm do not match the weight");
  auto y = torch::empty({N}, x.options());
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
    at::parallel_for(0, rows, 8, [&](int64_t n0, int64_t n1) {
      switch (bits) {
#define LOWBIT_CASE(B) case B: gemv_mixed_rows<B>(xp, cp, row_bytes, bp, absmax.data_ptr<at::Half>(), perm.data_ptr<int32_t>(), K, block, blocks, r0, n0, n1, yp); break;
        LOWBIT_CASE(1) LOWBIT_CASE(2) LOWBIT_CASE(3) LOWBIT_CASE(4)
#undef LOWBIT_CASE
        default: TORCH_CHECK(false, "mixed rows must be 1..4 bits");
      }
    });
    r0 += rows;
  }
  TORCH_CHECK(r0 == N, "segments do not cover every row");
  return y;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("qgemv", &qgemv, "packed low-bit GEMV (one input row)");
  m.def("qgemv_mixed", &qgemv_mixed, "mixed-width per-row-codebook GEMV (one input row, LowRA)");
}
