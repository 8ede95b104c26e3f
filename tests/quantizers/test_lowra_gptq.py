"""lowra-gptq: LowRA codebooks rounded with GPTQ's error feedback."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from test_gptq import _correlated_inputs
from tolerances import GPTQ_OVER_RTN

import lowbit
from lowbit import QLinear
from lowbit.calibration import Calibration, LayerStats
from lowbit.quantizers.lowra import LowRAConfig, encode_layer, fit_layer
from lowbit.quantizers.lowra_gptq import LowRAGPTQConfig, lowra_gptq_round
from lowbit.quantizers.precision import assign_widths
from lowbit.summary import bits_summary


@pytest.mark.parametrize("act_order", [False, True])
def test_error_feedback_cuts_held_out_output_error_with_the_same_codebooks(act_order):
    data = _correlated_inputs(d=128)
    x, held_out = data[:2048], data[2048:]
    w = torch.randn(64, 128)
    stats = LayerStats(torch.zeros(128, 128))
    stats.add(x)
    config = LowRAConfig(budget=2.0, block_size=32)
    fit = fit_layer(w, config)
    choice = assign_widths(fit.errors, torch.full((64,), 128), config.widths, 2.0)
    plain = encode_layer(w, fit, choice, config.widths, 32)
    fed_back = lowra_gptq_round(w, stats.hessian, fit, choice, config.widths, 32, act_order=act_order)
    assert fed_back.rows == plain.rows and torch.equal(fed_back.perm, plain.perm)  # same widths, same layout
    err = {name: ((held_out @ (w - q.dequantize()).T) ** 2).sum().item()
           for name, q in (("plain", plain), ("gptq", fed_back))}
    assert err["gptq"] < GPTQ_OVER_RTN * err["plain"], err


@pytest.mark.parametrize("sensitivity", ["none", "fisher"])
def test_tiny_llama_end_to_end_within_budget(sensitivity):
    model = tiny_model("llama")
    recipe = lowbit.Recipe([LowRAGPTQConfig(budget=1.5, sensitivity=sensitivity)])
    lowbit.quantize(model, recipe, calib=Calibration(windows=torch.randint(0, 256, (4, 512))))
    assert sum(isinstance(m, QLinear) for m in model.modules()) == 14
    assert 1.49 <= bits_summary(model)["code_bits"] <= 1.5
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(0, 256, (1, 16))).logits).all()
