// The "mse" scale search of integer grids (lowbit/formats/base.py fit_searched, methods.md §2.1) in one pass per
// group: for each shrink factor p of the grid, the group's range is clipped to p·[min, max], the grid fitted to it
// (IntFormat.fit: the range widened to hold 0, the scale rounded up to fp16, an integer zero point), and the error
// Σ weight·(w − ŵ)² of the unclipped values taken; the first least error wins. Every step is the fp32 operation the
// Python runs, in the same order, except the sum over the group's values (16 lanes, then across them), so a choice
// can differ only where two shrink factors' errors tie within fp32 rounding. Groups run in parallel.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

// as_storage_scale: s clamped to fp16's positive finite range, rounded to fp16 and up to the next fp16 if below s.
inline float storage_scale(float s) {
  s = std::min(std::max(s, 6.103515625e-05f), 65504.0f);
  c10::Half h(s);
  if (static_cast<float>(h) < s) h.x = static_cast<uint16_t>(h.x + 1);  // positive: the next fp16 up
  return static_cast<float>(h);
}

struct Grid {
  float scale, zero;  // zero: the code of 0 (symmetric grids: the offset)
};

// IntFormat.fit of values whose least and greatest are lo and hi.
inline Grid fit(float lo, float hi, int qmax, bool symmetric, int offset) {
  if (symmetric) return {storage_scale(std::max(std::fabs(lo), std::fabs(hi)) / static_cast<float>(offset - 1)),
                         static_cast<float>(offset)};
  lo = std::min(lo, 0.f);
  hi = std::max(hi, 0.f);
  const float span = hi - lo;
  const float s = storage_scale(span > 0 ? span / static_cast<float>(qmax) : 1.f);
  return {s, std::min(std::max(std::nearbyint(-lo / s), 0.f), static_cast<float>(qmax))};
}

#ifdef __AVX512F__
inline __mmask16 first(int64_t n) { return n >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << n) - 1); }

// Σ weight·(w − ŵ)² over n values (weight null: 1). Codes q = round(w / s) + z clamped to [0, qmax], ŵ = (q − z)·s.
// Symmetric grids (z = offset, qmax = 2·offset − 1): the same as IntFormat's clamp of round(w / s) to [−offset,
// offset − 1] with the offset added after.
float error(const float* w, const float* weight, int64_t n, Grid g, int qmax) {
  const __m512 s = _mm512_set1_ps(g.scale), z = _mm512_set1_ps(g.zero), top = _mm512_set1_ps(static_cast<float>(qmax));
  __m512 total = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = first(n - i);
    const __m512 x = _mm512_maskz_loadu_ps(m, w + i);
    __m512 q = _mm512_roundscale_ps(_mm512_div_ps(x, s), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    q = _mm512_min_ps(_mm512_max_ps(_mm512_add_ps(q, z), _mm512_setzero_ps()), top);
    const __m512 d = _mm512_sub_ps(_mm512_mul_ps(_mm512_sub_ps(q, z), s), x);
    __m512 e = _mm512_mul_ps(d, d);
    if (weight != nullptr) e = _mm512_mul_ps(e, _mm512_maskz_loadu_ps(m, weight + i));
    total = _mm512_add_ps(total, _mm512_maskz_mov_ps(m, e));
  }
  return _mm512_reduce_add_ps(total);
}
#endif

bool mse_scales_applies() {
#ifdef __AVX512F__
  return true;
#else
  return false;
#endif
}

// w (R, G, g) fp32 contiguous: R rows of G groups of g values; weight (G, g) fp32 contiguous or an empty tensor (all
// ones); grid: the shrink factors (those >= 1 skipped: the unclipped fit is the start). Returns the scales (R, G) and
// the zero points (R, G; symmetric grids: an empty tensor).
std::vector<torch::Tensor> int_mse_scales(torch::Tensor w, torch::Tensor weight, int64_t bits, bool symmetric,
                                          std::vector<double> grid) {
  TORCH_CHECK(w.dim() == 3 && w.scalar_type() == torch::kFloat32 && w.is_contiguous(), "w must be contiguous fp32 "
              "(rows, groups, group_size)");
  const int64_t R = w.size(0), G = w.size(1), n = w.size(2);
  const bool weighted = weight.numel() > 0;
  TORCH_CHECK(!weighted || (weight.scalar_type() == torch::kFloat32 && weight.is_contiguous() && weight.dim() == 2 &&
                            weight.size(0) == G && weight.size(1) == n), "weight must be contiguous fp32 (groups, "
              "group_size) or empty");
  TORCH_CHECK(bits >= 1 && bits <= 8 && (!symmetric || bits >= 2), "bits must be 1..8 (2..8 symmetric)");
  TORCH_CHECK(mse_scales_applies(), "int_mse_scales needs a build with AVX-512");
  auto scales = torch::empty({R, G}, torch::kFloat32);
  auto zeros = symmetric ? torch::empty({0}, torch::kFloat32) : torch::empty({R, G}, torch::kFloat32);
#ifdef __AVX512F__
  const int qmax = (1 << bits) - 1, offset = 1 << (bits - 1);
  std::vector<float> shrink;
  for (double p : grid)
    if (p < 1.0) shrink.push_back(static_cast<float>(p));
  const float* wp = w.data_ptr<float>();
  const float* cw = weighted ? weight.data_ptr<float>() : nullptr;
  float* sp = scales.data_ptr<float>();
  float* zp = symmetric ? nullptr : zeros.data_ptr<float>();
  at::parallel_for(0, R * G, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const float* x = wp + t * n;
      const float* wt = weighted ? cw + (t % G) * n : nullptr;
      float lo = x[0], hi = x[0];
      for (int64_t i = 1; i < n; ++i) {
        lo = std::min(lo, x[i]);
        hi = std::max(hi, x[i]);
      }
      Grid best = fit(lo, hi, qmax, symmetric, offset);
      float least = error(x, wt, n, best, qmax);
      for (float p : shrink) {
        const float lo_p = lo * p, hi_p = hi * p;  // the clipped values' least and greatest
        const Grid g = fit(std::min(std::max(lo, lo_p), hi_p), std::min(std::max(hi, lo_p), hi_p), qmax, symmetric,
                           offset);
        const float e = error(x, wt, n, g, qmax);
        if (e < least) least = e, best = g;
      }
      sp[t] = best.scale;
      if (zp != nullptr) zp[t] = best.zero;
    }
  });
#endif
  return {scales, zeros};
}

}  // namespace

void bind_scales(pybind11::module& m) {
  m.def("int_mse_scales", &int_mse_scales, "integer grids' mse scale search over groups (fit_searched)",
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("mse_scales_applies", &mse_scales_applies, "whether int_mse_scales was compiled in (AVX-512)");
}
