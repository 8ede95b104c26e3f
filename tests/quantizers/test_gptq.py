"""GPTQ: lower layer output error than RTN on correlated inputs; end to end on a tiny model."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from tolerances import GPTQ_OVER_RTN

import lowbit
from lowbit import LowbitError, QLinear
from lowbit.calibration import Calibration, LayerStats
from lowbit.formats import get_format
from lowbit.quantizers.gptq import gptq_round
from lowbit.quantizers.rtn import rtn_quantize
from lowbit.state import state_of


def _correlated_inputs(n=4096, d=96, seed=0):
    """Rows of a fixed correlated distribution: strongly mixed channels with uneven magnitudes."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=gen) / d**0.5 + torch.eye(d)
    scale = torch.logspace(-1, 1, d)  # uneven channel magnitudes, like real activations
    return (torch.randn(n, d, generator=gen) @ mix) * scale


@pytest.mark.parametrize(("bits", "group_size", "act_order"), [(4, 32, False), (3, 32, False), (2, 32, False),
                                                               (4, 32, True), (3, 40, True)])
def test_gptq_output_error_is_below_rtn(bits, group_size, act_order):
    data = _correlated_inputs()
    x, held_out = data[:2048], data[2048:]  # calibrate on one half, measure on the other
    w = torch.randn(48, x.shape[1])
    stats = LayerStats(torch.zeros(x.shape[1], x.shape[1]))
    stats.add(x[:1024])
    stats.add(x[1024:])
    torch.testing.assert_close(stats.hessian, 2 * x.T @ x / x.shape[0], rtol=1e-4, atol=1e-4)
    fmt = get_format("int", bits)
    err = {}
    for name, qw in [("rtn", rtn_quantize(w, fmt, "group", group_size)),
                     ("gptq", gptq_round(w, stats.hessian, fmt, "group", group_size, act_order=act_order))]:
        err[name] = ((held_out @ (w - qw.dequantize()).T) ** 2).sum().item()
    assert err["gptq"] < GPTQ_OVER_RTN * err["rtn"], err


def test_act_order_keeps_the_stored_layout_in_original_column_order():
    x = _correlated_inputs(d=64)
    w = torch.randn(16, 64)
    h = 2 * x.T @ x / x.shape[0]
    qw = gptq_round(w, h, get_format("int", 8), "group", 32, act_order=True)
    # 8 bits: error feedback moves weights by a few grid steps at most, so a column read back in the wrong
    # order would be off by O(1) while the right order is within a few percent of the weight's spread.
    assert ((qw.dequantize() - w).norm(dim=0) / w.norm(dim=0)).max() < 0.05


def test_gptq_end_to_end_on_a_tiny_model(tmp_path):
    model = tiny_model("llama")
    ref = tiny_model("llama")
    windows = torch.randint(0, 256, (4, 32))
    with pytest.raises(LowbitError, match="needs calibration data"):
        lowbit.quantize(tiny_model("llama"), "gptq-w4g64")
    lowbit.quantize(model, "gptq-w4g64", calib=Calibration(windows=windows))
    assert sum(isinstance(m, QLinear) for m in model.modules()) == 14
    ids = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        rel = (model(ids).logits - ref(ids).logits).norm() / ref(ids).logits.norm()
    assert rel < 0.1
    lowbit.save(model, tmp_path / "g")
    loaded, _ = lowbit.load(tmp_path / "g")
    assert state_of(loaded).recipe.steps[0].step == "gptq"
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize(("granularity", "group_size", "symmetric", "bits"),
                         [("group", 32, False, 4), ("group", 40, True, 3), ("channel", 0, True, 4),
                          ("tensor", 0, False, 2)])
def test_the_compiled_column_loop_gives_the_codes_of_the_python_loop(monkeypatch, granularity, group_size, symmetric,
                                                                    bits):
    """Act-order fixes every scale before the loop: the C++ loop (csrc/gptq.cpp) then runs it, and its codes are the
    Python loop's, element for element."""
    import lowbit.quantizers.gptq as gptq_module

    if gptq_module.extension() is None:
        pytest.skip("no C++ compiler here")
    x = _correlated_inputs(d=72)
    h = 2 * x.T @ x / x.shape[0]
    w = torch.randn(24, 72)
    fmt = get_format("int", bits, symmetric)
    compiled = gptq_round(w, h, fmt, granularity, group_size or 72, act_order=True, search="mse")
    monkeypatch.setattr(gptq_module, "extension", lambda: None)
    python = gptq_round(w, h, fmt, granularity, group_size or 72, act_order=True, search="mse")
    assert torch.equal(compiled.unpacked_codes(), python.unpacked_codes())
    assert torch.equal(compiled.scales, python.scales)


def test_bf16_calibration_passes_give_nearly_the_same_hessians():
    """``precision="bf16"`` runs the calibration forward passes under autocast; the Hessians stay fp32 and move by
    about bf16's rounding of the activations (tested at 2%, measured ~0.5% on this model)."""
    from lowbit.calibration import block_inputs, for_each_block
    from lowbit.kernels import native_bf16

    if not native_bf16("cpu"):
        pytest.skip("this CPU has no native bf16: bf16 passes fall back to fp32")
    windows = torch.randint(0, 256, (3, 32))
    hessians = {}
    for precision in ("fp32", "bf16"):
        model = tiny_model("llama")
        seen = []

        def work(prefix, collect, seen=seen):
            seen.append(collect([prefix + "mlp.down_proj"])[prefix + "mlp.down_proj"].hessian.clone())

        for_each_block(model, block_inputs(model, windows), work, precision=precision)
        hessians[precision] = seen
    for h32, h16 in zip(hessians["fp32"], hessians["bf16"], strict=True):
        assert h16.dtype == torch.float32
        assert (h16 - h32).norm() <= 0.02 * h32.norm()
    with pytest.raises(LowbitError, match="precision"):
        Calibration(windows=windows, precision="fp16")
