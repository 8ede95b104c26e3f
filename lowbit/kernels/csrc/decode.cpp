// lowbit native decode step: one token (of one sequence, or of each sequence of a small batch, left-padded to one
// length) through a whole LLaMA-style decoder (RMSNorm, rotary attention with grouped KV heads over a preallocated fp32 cache,
// SiLU-gated MLP, residuals, final norm, head) in C++, with the packed layers through qgemv.cpp's GEMV kernels (one
// row) or int_gemm.cpp's small-batch GEMM (several rows). transformers' eager step spends more time in per-layer
// Python and ~400 small ops per token than in the weights of a 135M model; here each layer costs its GEMVs and a few
// loops.
// lowbit/native.py builds a Decoder from a loaded model and checks the model is one this step computes exactly
// (same ops as transformers' LlamaDecoderLayer in fp32; only the order of fp32 sums differs).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

// qgemv.cpp's kernels (outside its anonymous namespace).
torch::Tensor qgemv_kernel(torch::Tensor x, torch::Tensor codes, torch::Tensor scales,
                           c10::optional<torch::Tensor> zeros, c10::optional<torch::Tensor> levels, int64_t bits,
                           int64_t group_size, int64_t offset, bool int8_x);
torch::Tensor gemv_f32_kernel(torch::Tensor x, torch::Tensor w);
torch::Tensor gemv_f16_kernel(torch::Tensor x, torch::Tensor w);
torch::Tensor gemv_bf16_kernel(torch::Tensor x, torch::Tensor w);
torch::Tensor qgemm_i8(torch::Tensor x, torch::Tensor codes, torch::Tensor scales, c10::optional<torch::Tensor> zeros,
                       int64_t bits, int64_t group_size, int64_t offset);
std::vector<torch::Tensor> qgemv_multi_kernel(torch::Tensor x, std::vector<torch::Tensor> codes,
                                              std::vector<torch::Tensor> scales,
                                              std::vector<c10::optional<torch::Tensor>> zeros,
                                              c10::optional<torch::Tensor> levels, int64_t bits, int64_t group_size,
                                              int64_t offset, bool int8_x);
torch::Tensor qgemv_mixed_kernel(torch::Tensor x, std::vector<int64_t> widths, std::vector<torch::Tensor> codes,
                                 std::vector<torch::Tensor> books, torch::Tensor absmax, torch::Tensor perm,
                                 int64_t block);

namespace {

// One Linear of the step: uniform packed (qgemv's arguments, bound once), LowRA's mixed rows (qgemv_mixed's) or
// float (fp32, fp16 or bf16 weight), optional bias.
struct Linear {
  enum Kind { kFloat, kPacked, kMixed } kind = kFloat;
  torch::Tensor codes, scales, weight, absmax, perm;
  c10::optional<torch::Tensor> zeros, levels, bias;
  std::vector<int64_t> widths;
  std::vector<torch::Tensor> row_codes, books;
  int64_t bits = 0, group_size = 0, offset = 0;
  bool int8_x = false;

  // Whether several rows run here: integer codes with int8 activations (qgemm_i8), or an fp32 weight.
  bool batches() const {
    return (kind == kFloat && weight.scalar_type() == torch::kFloat32) || (kind == kPacked && int8_x);
  }

  // x (in,) -> (out,) through the GEMV kernels; x (B, in) -> (B, out) through qgemm_i8 (each row's activation
  // groups rounded as the int8 GEMV rounds one row) or, for an fp32 weight, one matmul.
  torch::Tensor operator()(const torch::Tensor& x) const {
    torch::Tensor y;
    if (x.dim() == 2) {
      TORCH_CHECK(batches(), "this Linear has no several-row kernel in the native step (LowRA's mixed rows, or a "
                  "format without int8 activations)");
      y = kind == kPacked ? qgemm_i8(x, codes, scales, zeros, bits, group_size, offset) : at::mm(x, weight.t());
    } else if (kind == kPacked) {
      y = qgemv_kernel(x, codes, scales, zeros, levels, bits, group_size, offset, int8_x);
    } else if (kind == kMixed) {
      y = qgemv_mixed_kernel(x, widths, row_codes, books, absmax, perm, group_size);
    } else {
      switch (weight.scalar_type()) {
        case torch::kFloat16: y = gemv_f16_kernel(x, weight); break;
        case torch::kBFloat16: y = gemv_bf16_kernel(x, weight); break;
        default: y = gemv_f32_kernel(x, weight);
      }
    }
    add_bias(y);
    return y;
  }

  // y (out,) or (B, out) += bias.
  void add_bias(torch::Tensor& y) const {
    if (!bias.has_value()) return;
    float* yp = y.data_ptr<float>();
    const float* bp = bias->data_ptr<float>();
    const int64_t n = y.size(-1);
    for (int64_t i = 0, total = y.numel(); i < total; ++i) yp[i] += bp[i % n];
  }

  // Whether `other` runs the same uniform kernel (format, group size, activation rounding) as this one.
  bool same_kernel(const Linear& other) const {
    return kind == kPacked && other.kind == kPacked && bits == other.bits && group_size == other.group_size &&
           offset == other.offset && int8_x == other.int8_x && levels.has_value() == other.levels.has_value() &&
           (!levels.has_value() || levels->is_same(*other.levels));
  }
};

// Linears reading the same input (a layer's q/k/v, or gate/up): for one row, one qgemv_multi call where they share a
// kernel (x rounded once, one parallel region over all their rows), else one call each; several rows: one call each.
struct Group {
  std::vector<Linear> parts;
  bool fused = false;

  explicit Group(std::vector<Linear> linears) : parts(std::move(linears)) {
    fused = true;
    for (const Linear& l : parts) fused = fused && parts[0].same_kernel(l);
  }

  bool batches() const {
    return std::all_of(parts.begin(), parts.end(), [](const Linear& l) { return l.batches(); });
  }

  std::vector<torch::Tensor> operator()(const torch::Tensor& x) const {
    std::vector<torch::Tensor> ys;
    if (!fused || x.dim() == 2) {
      for (const Linear& l : parts) ys.push_back(l(x));
      return ys;
    }
    std::vector<torch::Tensor> codes, scales;
    std::vector<c10::optional<torch::Tensor>> zeros;
    for (const Linear& l : parts) codes.push_back(l.codes), scales.push_back(l.scales), zeros.push_back(l.zeros);
    const Linear& a = parts[0];
    ys = qgemv_multi_kernel(x, codes, scales, zeros, a.levels, a.bits, a.group_size, a.offset, a.int8_x);
    for (size_t i = 0; i < parts.size(); ++i) parts[i].add_bias(ys[i]);
    return ys;
  }
};

Linear packed_linear(torch::Tensor codes, torch::Tensor scales, c10::optional<torch::Tensor> zeros,
                     c10::optional<torch::Tensor> levels, int64_t bits, int64_t group_size, int64_t offset,
                     bool int8_x, c10::optional<torch::Tensor> bias) {
  Linear l;
  l.kind = Linear::kPacked;
  l.codes = codes, l.scales = scales, l.zeros = zeros, l.levels = levels, l.bias = bias;
  l.bits = bits, l.group_size = group_size, l.offset = offset, l.int8_x = int8_x;
  return l;
}

Linear mixed_linear(std::vector<int64_t> widths, std::vector<torch::Tensor> codes, std::vector<torch::Tensor> books,
                    torch::Tensor absmax, torch::Tensor perm, int64_t block, c10::optional<torch::Tensor> bias) {
  Linear l;
  l.kind = Linear::kMixed;
  l.widths = widths, l.row_codes = codes, l.books = books, l.absmax = absmax, l.perm = perm, l.bias = bias;
  l.group_size = block;
  return l;
}

Linear float_linear(torch::Tensor weight, c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous() &&
                  (weight.scalar_type() == torch::kFloat32 || weight.scalar_type() == torch::kFloat16 ||
                   weight.scalar_type() == torch::kBFloat16),
              "a float Linear of the native step needs a contiguous fp32, fp16 or bf16 (out, in) weight");
  Linear l;
  l.weight = weight, l.bias = bias;
  return l;
}

struct Layer {
  Group qkv;
  Linear o;
  Group gate_up;
  Linear down;
  torch::Tensor input_norm, post_norm;  // (hidden,) fp32 gains
};

// out = x / sqrt(mean(x^2) + eps) * gain, as transformers' LlamaRMSNorm in fp32.
void rms_norm(const float* x, const float* gain, float eps, int64_t n, float* out) {
  double ss = 0.0;
  for (int64_t i = 0; i < n; ++i) ss += static_cast<double>(x[i]) * x[i];
  const float r = 1.0f / std::sqrt(static_cast<float>(ss / n) + eps);
  for (int64_t i = 0; i < n; ++i) out[i] = gain[i] * (x[i] * r);
}

class Decoder {
 public:
  Decoder(torch::Tensor embed, torch::Tensor final_norm, Linear head, torch::Tensor inv_freq, double rope_scaling,
          int64_t heads, int64_t kv_heads, int64_t head_dim, double attn_scale, double eps)
      : embed_(embed), final_norm_(final_norm), head_(std::move(head)), inv_freq_(inv_freq),
        rope_scaling_(static_cast<float>(rope_scaling)), heads_(heads), kv_heads_(kv_heads), head_dim_(head_dim),
        attn_scale_(static_cast<float>(attn_scale)), eps_(static_cast<float>(eps)) {
    TORCH_CHECK(embed.dim() == 2 && embed.is_contiguous(), "embedding table must be contiguous (vocab, hidden): "
                "(0, hidden) when the caller looks rows up itself (greedy_row)");
    TORCH_CHECK(inv_freq.scalar_type() == torch::kFloat32 && inv_freq.numel() * 2 == head_dim,
                "inv_freq must be fp32 (head_dim / 2,)");
    TORCH_CHECK(heads % kv_heads == 0, "attention heads must be a multiple of the KV heads");
    hidden_ = embed.size(1);
  }

  void add_layer(Linear q, Linear k, Linear v, Linear o, Linear gate, Linear up, Linear down, torch::Tensor input_norm,
                 torch::Tensor post_norm) {
    layers_.push_back(Layer{Group({std::move(q), std::move(k), std::move(v)}), std::move(o),
                            Group({std::move(gate), std::move(up)}), std::move(down), input_norm.contiguous(),
                            post_norm.contiguous()});
  }

  // A fresh cache of `capacity` positions for `batch` sequences in every layer (keys after the rotation), (layers,
  // batch, kv_heads, capacity, head_dim) fp32 each. `starts` (batch,): where each sequence's first token sits in the
  // cache (a left-padded batch: the padding before it is never attended to, and positions count from it, as
  // transformers counts them from its attention mask); empty = every sequence starts at 0.
  void reset(int64_t capacity, int64_t batch, std::vector<int64_t> starts) {
    TORCH_CHECK(batch >= 1 && capacity >= 1, "the cache needs at least one sequence and one position");
    if (starts.empty()) starts.assign(batch, 0);
    TORCH_CHECK(static_cast<int64_t>(starts.size()) == batch, "starts must hold one position per sequence");
    for (int64_t s : starts) TORCH_CHECK(s >= 0 && s < capacity, "a sequence's start is outside the cache");
    for (const Layer& L : layers_)
      TORCH_CHECK(batch == 1 || (L.o.batches() && L.down.batches() && L.qkv.batches() && L.gate_up.batches()),
                  "a layer has no several-row kernel in the native step: decode one sequence at a time");
    const auto n = static_cast<int64_t>(layers_.size());
    keys_ = torch::zeros({n, batch, kv_heads_, capacity, head_dim_}, torch::kFloat32);
    values_ = torch::zeros_like(keys_);
    capacity_ = capacity, batch_ = batch, starts_ = std::move(starts);
  }

  // Copies a prompt's cache for one layer: keys/values (batch, kv_heads, length, head_dim) — or (kv_heads, length,
  // head_dim) for a batch of one — into positions [0, length).
  void set_cache(int64_t layer, torch::Tensor keys, torch::Tensor values) {
    if (keys.dim() == 3) keys = keys.unsqueeze(0), values = values.unsqueeze(0);
    TORCH_CHECK(keys.dim() == 4 && keys.size(0) == batch_ && values.sizes() == keys.sizes(),
                "the prompt's keys and values must be (batch, kv_heads, length, head_dim) with reset()'s batch");
    const int64_t length = keys.size(2);
    TORCH_CHECK(length <= capacity_, "the prompt is longer than the cache");
    using torch::indexing::Slice;
    keys_[layer].index({Slice(), Slice(), Slice(0, length)}).copy_(keys);
    values_[layer].index({Slice(), Slice(), Slice(0, length)}).copy_(values);
  }

  int64_t capacity() const { return capacity_; }

  // How many of the layers' q/k/v and gate/up groups run as one call each (the rest: one call per Linear).
  int64_t fused_groups() const {
    int64_t n = 0;
    for (const Layer& L : layers_) n += L.qkv.fused + L.gate_up.fused;
    return n;
  }

  // The next token after `token` at `pos`: the first index of the largest logit (torch.argmax's choice). No tensor
  // reaches Python, so a generation loop allocates no Python objects (nothing for its garbage collector to walk).
  int64_t greedy(int64_t token, int64_t pos) { return argmax(step(token, pos)); }

  // The same from the token's embedding row (hidden,) fp32, for a table the step does not read (a packed one).
  int64_t greedy_row(torch::Tensor row, int64_t pos) { return argmax(forward(row.to(torch::kFloat32).clone(), pos)); }

  static int64_t argmax(const torch::Tensor& logits) {
    TORCH_CHECK(logits.dim() == 1, "greedy decodes one sequence: a batch goes through hidden() and the head");
    const float* lp = logits.data_ptr<float>();
    int64_t best = 0;
    for (int64_t i = 1, n = logits.size(0); i < n; ++i)
      if (lp[i] > lp[best] || (std::isnan(lp[i]) && !std::isnan(lp[best]))) best = i;
    return best;
  }

  // The logits (vocab,) fp32 of `token` at position `pos`; positions [0, pos) must be in the cache.
  torch::Tensor step(int64_t token, int64_t pos) {
    TORCH_CHECK(token >= 0 && token < embed_.size(0), "token id ", token, " is outside the vocabulary");
    return forward(embed_[token].to(torch::kFloat32).clone(), pos);  // a copy, never a view of the table
  }

  // The logits (vocab,) of the residual stream `h` (hidden,) fp32 entering the first layer at `pos` (updated in
  // place).
  torch::Tensor forward(torch::Tensor h, int64_t pos) { return head_(hidden(h, pos)); }

  // The final norm's output (hidden,) for `h` (hidden,) as in forward — or (B, hidden) for `h` (B, hidden), one row
  // per sequence of the cache, every sequence at cache position `pos` (its own position: pos minus its start, see
  // reset): the caller applies the model's head (a batch's fp32 head runs oneDNN's GEMM in lowbit.kernels.linear,
  // 2-3x faster than at::mm's MKL sgemm here).
  torch::Tensor hidden(torch::Tensor h, int64_t pos) {
    TORCH_CHECK(pos >= 0 && pos < capacity_, "position ", pos, " is outside the cache of ", capacity_);
    for (int64_t s : starts_) TORCH_CHECK(s <= pos, "position ", pos, " is before a sequence's start ", s);
    const int64_t B = h.dim() == 2 ? h.size(0) : 1;
    TORCH_CHECK((h.dim() == 1 || h.dim() == 2) && h.size(-1) == hidden_ && h.is_contiguous() &&
                    h.scalar_type() == torch::kFloat32,
                "the embedding rows must be contiguous fp32 (hidden,) or (batch, hidden)");
    TORCH_CHECK(B == batch_, "the step got ", B, " rows for a cache of ", batch_, " sequences (see reset)");
    auto x = torch::empty_like(h);
    float* hp = h.data_ptr<float>();
    float* xp = x.data_ptr<float>();
    const int64_t half = head_dim_ / 2;
    std::vector<float> cos(B * half), sin(B * half);  // (B, half): each sequence's rotation at its own position
    const float* freq = inv_freq_.data_ptr<float>();
    for (int64_t b = 0; b < B; ++b)
      for (int64_t i = 0; i < half; ++i) {
        const float angle = static_cast<float>(pos - starts_[b]) * freq[i];
        cos[b * half + i] = std::cos(angle) * rope_scaling_, sin[b * half + i] = std::sin(angle) * rope_scaling_;
      }
    auto attn = h.dim() == 1 ? torch::empty({heads_ * head_dim_}, torch::kFloat32)
                             : torch::empty({B, heads_ * head_dim_}, torch::kFloat32);
    const int64_t total = B * hidden_;
    for (size_t l = 0; l < layers_.size(); ++l) {
      const Layer& L = layers_[l];
      norm_rows(hp, L.input_norm, B, xp);
      auto qkv = L.qkv(x);
      auto &q = qkv[0], &k = qkv[1], &v = qkv[2];
      for (int64_t b = 0; b < B; ++b) {
        rotate(q.data_ptr<float>() + b * heads_ * head_dim_, heads_, cos.data() + b * half, sin.data() + b * half);
        rotate(k.data_ptr<float>() + b * kv_heads_ * head_dim_, kv_heads_, cos.data() + b * half,
               sin.data() + b * half);
      }
      const int64_t layer_size = B * kv_heads_ * capacity_ * head_dim_;
      float* kc = keys_.data_ptr<float>() + l * layer_size;
      float* vc = values_.data_ptr<float>() + l * layer_size;
      for (int64_t g = 0; g < B * kv_heads_; ++g) {  // (sequence, KV head) pairs in the cache's order
        std::copy_n(k.data_ptr<float>() + g * head_dim_, head_dim_, kc + (g * capacity_ + pos) * head_dim_);
        std::copy_n(v.data_ptr<float>() + g * head_dim_, head_dim_, vc + (g * capacity_ + pos) * head_dim_);
      }
      attend(q.data_ptr<float>(), kc, vc, B, pos + 1, attn.data_ptr<float>());
      auto o = L.o(attn);
      const float* op = o.data_ptr<float>();
      for (int64_t i = 0; i < total; ++i) hp[i] += op[i];
      norm_rows(hp, L.post_norm, B, xp);
      auto gate_up = L.gate_up(x);
      auto &gate = gate_up[0], &up = gate_up[1];
      float* gp = gate.data_ptr<float>();
      const float* up_p = up.data_ptr<float>();
      for (int64_t i = 0, n = gate.numel(); i < n; ++i) gp[i] = gp[i] / (1.0f + std::exp(-gp[i])) * up_p[i];
      auto down = L.down(gate);
      const float* dp = down.data_ptr<float>();
      for (int64_t i = 0; i < total; ++i) hp[i] += dp[i];
    }
    norm_rows(hp, final_norm_, B, xp);
    return x;
  }

 private:
  // Rotary embedding of `n` heads in place (transformers' rotate_half convention: pairs (i, i + head_dim / 2)).
  void rotate(float* t, int64_t n, const float* c, const float* s) const {
    const int64_t half = head_dim_ / 2;
    for (int64_t h = 0; h < n; ++h) {
      float* a = t + h * head_dim_;
      float* b = a + half;
      for (int64_t i = 0; i < half; ++i) {
        const float x1 = a[i], x2 = b[i];
        a[i] = x1 * c[i] - x2 * s[i];
        b[i] = x2 * c[i] + x1 * s[i];
      }
    }
  }

  // `B` rows of (hidden,) residuals normalized by `gain` into out.
  void norm_rows(const float* h, const torch::Tensor& gain, int64_t B, float* out) const {
    for (int64_t b = 0; b < B; ++b) rms_norm(h + b * hidden_, gain.data_ptr<float>(), eps_, hidden_, out + b * hidden_);
  }

  // Softmax attention of every query head of each of `B` sequences over positions [start, length) of its KV head's
  // cache (start: the sequence's, see reset); q and out (B, heads, head_dim). Split over threads from 256 positions
  // in all.
  void attend(const float* q, const float* kc, const float* vc, int64_t B, int64_t length, float* out) const {
    const int64_t group = heads_ / kv_heads_, D = head_dim_;
    at::parallel_for(0, B * heads_, B * length >= 256 ? 1 : B * heads_, [&](int64_t h0, int64_t h1) {
      std::vector<float> score(length);
      for (int64_t h = h0; h < h1; ++h) {  // h: (sequence, head) = (h / heads_, h % heads_)
        const float* qh = q + h * D;
        const int64_t kv = (h / heads_) * kv_heads_ + (h % heads_) / group;
        const float* K = kc + kv * capacity_ * D;
        const float* V = vc + kv * capacity_ * D;
        const int64_t first = starts_[h / heads_];
        float top = -std::numeric_limits<float>::infinity();
        for (int64_t t = first; t < length; ++t) {
          const float* kt = K + t * D;
          float dot = 0.f;
#pragma omp simd reduction(+ : dot)
          for (int64_t d = 0; d < D; ++d) dot += qh[d] * kt[d];
          score[t] = dot * attn_scale_;
          top = std::max(top, score[t]);
        }
        float total = 0.f;
        for (int64_t t = first; t < length; ++t) total += (score[t] = std::exp(score[t] - top));
        float* oh = out + h * D;
        std::fill_n(oh, D, 0.f);
        for (int64_t t = first; t < length; ++t) {
          const float p = score[t] / total;
          const float* vt = V + t * D;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) oh[d] += p * vt[d];
        }
      }
    });
  }

  torch::Tensor embed_, final_norm_;
  Linear head_;
  torch::Tensor inv_freq_;
  float rope_scaling_;
  int64_t heads_, kv_heads_, head_dim_;
  float attn_scale_, eps_;
  int64_t hidden_ = 0, capacity_ = 0, batch_ = 1;
  std::vector<int64_t> starts_;  // (batch_,) see reset
  std::vector<Layer> layers_;
  torch::Tensor keys_, values_;
};

}  // namespace

void bind_decode(pybind11::module& m) {
  namespace py = pybind11;
  py::class_<Linear>(m, "NativeLinear");
  m.def("packed_linear", &packed_linear, "a packed Linear of the native step (qgemv's arguments)");
  m.def("mixed_linear", &mixed_linear, "a LowRA mixed-codebook Linear of the native step (qgemv_mixed's arguments)");
  m.def("float_linear", &float_linear, "a float Linear of the native step (fp32, fp16 or bf16 weight)");
  py::class_<Decoder>(m, "NativeDecoder")
      .def(py::init<torch::Tensor, torch::Tensor, Linear, torch::Tensor, double, int64_t, int64_t, int64_t, double,
                    double>())
      .def("add_layer", &Decoder::add_layer)
      .def("reset", &Decoder::reset, py::arg("capacity"), py::arg("batch") = 1,
           py::arg("starts") = std::vector<int64_t>{})
      .def("set_cache", &Decoder::set_cache)
      .def("capacity", &Decoder::capacity)
      .def("fused_groups", &Decoder::fused_groups)
      .def("step", &Decoder::step, py::call_guard<py::gil_scoped_release>())
      .def("forward", &Decoder::forward, py::call_guard<py::gil_scoped_release>())
      .def("hidden", &Decoder::hidden, py::call_guard<py::gil_scoped_release>())
      .def("greedy", &Decoder::greedy, py::call_guard<py::gil_scoped_release>())
      .def("greedy_row", &Decoder::greedy_row, py::call_guard<py::gil_scoped_release>());
}
