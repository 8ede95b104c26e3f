"""Block-wise reconstruction: starts exactly at its quantizer's result, lowers each block's held-out output
error, stays an ordinary packed checkpoint (the same bytes streamed or in memory), and refuses what it cannot
train."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import ByteTokenizer, tiny_model

import lowbit
from lowbit import LowbitError, QLinear
from lowbit.calibration import block_inputs, block_output
from lowbit.nn.relaxed import RelaxedLinear
from lowbit.quantizers import BlockwiseConfig, GPTQConfig
from lowbit.state import state_of

TEXT = " ".join(f"the {w} of a city is a place where people live and work" for w in range(400))
START = {"step": "gptq", "bits": 2, "group_size": 32}


def calibration(n=6):
    """fp32 passes: block-wise training calibrates in fp32 (its GPTQ start too), so plain GPTQ compared with it
    must as well (its default, ``auto``, runs bf16 on CPUs with native bf16)."""
    return lowbit.Calibration(tokenizer=ByteTokenizer(), n=n, seq_len=48, text=TEXT, precision="fp32")


def packed(model) -> dict[str, tuple[torch.Tensor, ...]]:
    return {n: tuple(m.qweight.tensors().values()) for n, m in model.named_modules() if isinstance(m, QLinear)}


@pytest.fixture(scope="module")
def float_model():
    return tiny_model("llama", num_hidden_layers=2)


def test_the_relaxed_layer_starts_equal_to_the_packed_one_and_packs_back_to_it(float_model):
    model = lowbit.quantize(copy.deepcopy(float_model), "rtn-w3g32")
    layer = next(m for m in model.modules() if isinstance(m, QLinear))
    relaxed = RelaxedLinear(layer)
    torch.testing.assert_close(relaxed.weight(), layer.qweight.dequantize(), rtol=0, atol=1e-6)
    x = torch.randn(3, layer.in_features)
    torch.testing.assert_close(relaxed(x), layer(x), rtol=1e-5, atol=1e-5)
    again = relaxed.packed()
    for a, b in zip(again.qweight.tensors().values(), layer.qweight.tensors().values(), strict=True):
        assert torch.equal(a, b)
    with torch.no_grad():  # an offset past the half step moves the code by one, in the packed layer too
        relaxed.offset[0, 0] = 0.6 if layer.qweight.unpacked_codes()[0, 0] < 7 else -0.6
    q0 = int(layer.qweight.unpacked_codes()[0, 0])
    q1 = int(relaxed.packed().qweight.unpacked_codes()[0, 0])
    assert abs(q1 - q0) == 1
    # and in the relaxed weight, though its centred codes were kept from before (the offset's version changed)
    scale = layer.qweight.scales[0, 0].float()
    torch.testing.assert_close(relaxed.weight()[0, 0], layer.qweight.dequantize()[0, 0] + (q1 - q0) * scale)


def test_the_targets_are_the_float_blocks_outputs_with_or_without_a_calibrating_start(float_model):
    """GPTQ's own pass over the float block gives the targets; RTN makes none, so they are computed before it
    packs the block. Either way block 0's held-out start error is that of its start quantizer's result."""
    for start, preset in ((START, None), ({"step": "rtn", "bits": 2, "group_size": 32}, "rtn-w2g32")):
        model = lowbit.quantize(copy.deepcopy(float_model), lowbit.Recipe([BlockwiseConfig(
            quantizer=start, epochs=1, scale_lr=0.0, lr=0.001, precision="fp32")]), calib=calibration())
        report = state_of(model).history["blockwise"]["model.layers.0"]
        reference = lowbit.quantize(copy.deepcopy(float_model), preset or lowbit.Recipe([GPTQConfig(
            bits=2, group_size=32)]), calib=calibration())
        windows = calibration().get_windows(float_model)
        hidden, kwargs = block_inputs(float_model, windows)
        with torch.no_grad():
            val = hidden[:2]  # the held-out windows
            want = [block_output(float_model.model.layers[0], h, kwargs) for h in val]
            got = [block_output(reference.model.layers[0], h, kwargs) for h in val]
        start_error = sum(torch.nn.functional.mse_loss(g, w).item() for g, w in zip(got, want, strict=True)) / 2
        assert report["start"] == pytest.approx(start_error, rel=1e-3), start


def test_blockwise_lowers_every_blocks_held_out_error_and_starts_from_gptq(float_model):
    gptq = lowbit.quantize(copy.deepcopy(float_model), lowbit.Recipe([GPTQConfig(**{k: v for k, v in START.items()
                                                                                   if k != "step"})]),
                           calib=calibration())
    trained = lowbit.quantize(copy.deepcopy(float_model), lowbit.Recipe([BlockwiseConfig(quantizer=START, epochs=4,
                                                                                         val_windows=2)]),
                              calib=calibration())
    report = state_of(trained).history["blockwise"]
    assert set(report) == {"model.layers.0", "model.layers.1"}
    for figures in report.values():
        assert figures["best"] < figures["start"]  # the held-out windows: not the ones it trained on
        assert len(figures["held_out"]) == 5 and figures["best"] == min(figures["held_out"])
    # block 0 starts from GPTQ's own rounding of the same inputs: its held-out start is GPTQ's error there
    a, b = packed(gptq), packed(trained)
    assert a.keys() == b.keys()
    assert any(not torch.equal(x, y) for n in a for x, y in zip(a[n], b[n], strict=True))  # training moved codes


def test_no_learning_keeps_the_start_quantizers_result_exactly(float_model):
    gptq = lowbit.quantize(copy.deepcopy(float_model), lowbit.Recipe([GPTQConfig(bits=2, group_size=32)]),
                           calib=calibration())
    still = lowbit.quantize(copy.deepcopy(float_model), lowbit.Recipe([BlockwiseConfig(
        quantizer=START, epochs=1, lr=0.0, scale_lr=0.0)]), calib=calibration())
    a, b = packed(gptq), packed(still)
    assert all(torch.equal(x, y) for n in a for x, y in zip(a[n], b[n], strict=True))


def test_the_result_is_an_ordinary_checkpoint(float_model, tmp_path):
    model = lowbit.quantize(copy.deepcopy(float_model), lowbit.Recipe([BlockwiseConfig(quantizer=START, epochs=1)]),
                            calib=calibration())
    ids = torch.randint(0, 256, (1, 16))
    lowbit.save(model, tmp_path / "ck")
    loaded, _ = lowbit.load(tmp_path / "ck")
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize(("quantizer", "phrase"), [
    ({"step": "lowra", "budget": 2.0}, "uniform integer"),
    ({"step": "rtn", "format": "nf", "bits": 4}, "uniform integer"),
    ({"bits": 4}, "step config mapping"),
])
def test_what_blockwise_cannot_train_is_refused_in_one_line(quantizer, phrase):
    with pytest.raises(LowbitError, match=phrase) as e:
        BlockwiseConfig(quantizer=quantizer)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("field", ["epochs", "val_windows", "lr"])
def test_bad_training_settings_are_refused(field):
    with pytest.raises(LowbitError, match=field):
        BlockwiseConfig(**{field: -1})


def test_the_config_round_trips_through_a_recipe():
    recipe = lowbit.Recipe([BlockwiseConfig(quantizer={"step": "gptq", "bits": 3, "group_size": 64}, epochs=2)])
    again = lowbit.Recipe.from_yaml(recipe.to_yaml())
    assert again.steps == recipe.steps


def test_a_layer_with_unfolded_scale_multipliers_is_refused(float_model):
    from lowbit.adapters import train_group_scales

    model = lowbit.quantize(copy.deepcopy(float_model), "rtn-w3g32")
    layer = next(m for m in model.modules() if isinstance(m, QLinear))
    train_group_scales([layer])
    with pytest.raises(LowbitError, match="multipliers not folded") as e:
        RelaxedLinear(layer)
    assert "\n" not in str(e.value)
