"""Round-to-nearest: error ordering by bit width, exact agreement with a hand-written GPTQ-style fake
quantizer, and whole-model replacement of the decoder Linears."""

from __future__ import annotations

import pytest
import torch
from tolerances import RTN_BITS_ERROR_RATIO_2_OVER_4, RTN_BITS_ERROR_RATIO_4_OVER_8, RTN_W8_LOGITS_REL
from torch import nn

import lowbit
from lowbit import QLinear, RTNConfig
from lowbit.formats import get_format
from lowbit.nn import GEMVLinear
from lowbit.quantizers.rtn import RTN, rtn_quantize
from lowbit.recipe import Recipe
from lowbit.state import state_of


def _rel_err(w, q):
    return ((q.dequantize() - w).norm() / w.norm()).item()


def _fake_quant_int_asym(w: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Min/max fake quantization, GPTQ's convention, one group at a time (ragged last group included)."""
    qmax = 2**bits - 1
    out = torch.empty_like(w)
    for r in range(w.shape[0]):
        for start in range(0, w.shape[1], group_size):
            x = w[r, start:start + group_size]
            lo = min(float(x.min()), 0.0)  # the range always includes 0
            hi = max(float(x.max()), 0.0)
            s = torch.tensor((hi - lo), dtype=torch.float32) / qmax
            h = s.to(torch.float16)  # stored as fp16, rounded up so the extremes are never clipped
            if float(h) < float(s):
                h = torch.nextafter(h, torch.tensor(float("inf"), dtype=torch.float16))
            s = h.to(torch.float32)
            z = torch.clamp(torch.round(-lo / s), 0, qmax)  # integer zero point
            q = torch.clamp(torch.round(x / s) + z, 0, qmax)
            out[r, start:start + group_size] = s * (q - z)
    return out


def test_error_shrinks_with_bits():
    w = torch.randn(64, 256)
    err = {b: _rel_err(w, rtn_quantize(w, get_format("int", b), "group", 64)) for b in (2, 3, 4, 8)}
    assert err[8] * RTN_BITS_ERROR_RATIO_4_OVER_8 < err[4]
    assert err[4] * RTN_BITS_ERROR_RATIO_2_OVER_4 < err[2]
    assert err[8] < err[4] < err[3] < err[2] < 1.0


def test_smaller_groups_do_not_hurt():
    w = torch.randn(64, 256)
    fmt = get_format("int", 4)
    errs = [_rel_err(w, rtn_quantize(w, fmt, gran, 32 if gran == "group" else 128))
            for gran in ("group", "channel", "tensor")]
    assert errs[0] < errs[1] < errs[2]


@pytest.mark.parametrize("shape,group_size", [((16, 384), 128), ((12, 200), 128), ((8, 72), 32)])
def test_int4_asymmetric_matches_hand_written_fake_quant_exactly(shape, group_size):
    w = torch.randn(*shape) * 0.05 + 0.01  # slightly off-centre, like real weights
    w[0, :group_size] = w[0, :group_size].abs()  # an all-positive group: the range is widened to include 0
    q = rtn_quantize(w, get_format("int", 4), "group", group_size)
    assert torch.equal(q.dequantize(), _fake_quant_int_asym(w, 4, group_size))


def test_rtn_step_quantizes_one_weight_like_the_pure_function():
    w = torch.randn(24, 40)
    step = RTN(RTNConfig(format="nf", bits=3, group_size=16))
    q = step.quantize(w)
    ref = rtn_quantize(w, get_format("nf", 3), "group", 16)
    assert q.meta() == ref.meta() and q.fmt == "nf3"
    assert all(torch.equal(a, b) for a, b in zip(q.tensors().values(), ref.tensors().values(), strict=True))


def test_quantize_tiny_llama_replaces_decoder_linears_only(tiny_llama):
    model = lowbit.quantize(tiny_llama, "rtn-w4g64")
    assert model is tiny_llama
    qlinears = {n: m for n, m in model.named_modules() if isinstance(m, QLinear)}
    assert len(qlinears) == 14  # q, k, v, o, gate, up, down in each of 2 layers
    projections = {n.rsplit(".", 1)[-1] for n in qlinears}
    assert projections == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert all(n.startswith("model.layers.") for n in qlinears)
    assert all(m.fmt == "int4" and m.group_size == 64 and m.granularity == "group" for m in qlinears.values())
    assert not any(type(m) is nn.Linear for n, m in model.named_modules() if n.startswith("model.layers."))
    assert type(model.lm_head) is GEMVLinear and model.lm_head.weight.dtype == torch.float32  # float, decode GEMV
    assert type(model.model.embed_tokens) is nn.Embedding
    assert state_of(model).recipe == Recipe.from_name("rtn-w4g64")
    assert state_of(model).quantize_seconds >= 0


def test_quantized_layer_holds_rtn_of_the_float_weight(tiny_llama):
    w = tiny_llama.model.layers[1].mlp.down_proj.weight.detach().clone()
    lowbit.quantize(tiny_llama, Recipe([RTNConfig(bits=3, group_size=32)]))
    layer = tiny_llama.model.layers[1].mlp.down_proj
    assert isinstance(layer, QLinear)
    assert torch.equal(layer.weight, rtn_quantize(w, get_format("int", 3), "group", 32).dequantize())


def test_rtn_w8_logits_stay_close_to_float(tiny_llama):
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = tiny_llama(ids).logits
        out = lowbit.quantize(tiny_llama, "rtn-w8g64")(ids).logits
    rel8 = ((out - ref).norm() / ref.norm()).item()
    assert rel8 < RTN_W8_LOGITS_REL
    assert rel8 > 1e-4  # the weights really were replaced by 8-bit ones (measured 0.006)


def test_targets_and_ignore_select_layers(tiny_llama):
    cfg = RTNConfig(bits=4, group_size=64, targets=("re:.*mlp\\..*",), ignore=("*.down_proj",))
    lowbit.quantize(tiny_llama, Recipe([cfg]))
    names = sorted(n for n, m in tiny_llama.named_modules() if isinstance(m, QLinear))
    assert names == [f"model.layers.{i}.mlp.{p}" for i in (0, 1) for p in ("gate_proj", "up_proj")]
