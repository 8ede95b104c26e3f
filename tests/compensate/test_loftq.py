"""LoftQ: the adapter equals the best rank-r fit of the quantization residual, for any alpha."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

import lowbit
from lowbit import LowbitError, QLinear
from lowbit.adapters import LoRA, LoRAConfig
from lowbit.compensate import LoftQConfig, loftq_layer
from lowbit.quantizers.rtn import RTN, RTNConfig
from lowbit.state import state_of

IDS = torch.tensor([[1, 17, 42, 99, 3, 250, 7, 64, 128, 5, 0, 33]])


@pytest.mark.parametrize("alpha", [4.0, 32.0])
def test_one_iteration_is_the_truncated_svd_of_the_residual_for_any_alpha(alpha):
    w = torch.randn(48, 64)
    quantizer = RTN(RTNConfig(bits=2, group_size=16))
    lora = LoRA(LoRAConfig(rank=4, alpha=alpha), 64, 48)
    q, before, after = loftq_layer(w, quantizer, lora, iterations=1)
    residual = w - q.dequantize()
    S = torch.linalg.svdvals(residual)
    assert before == pytest.approx(float(residual.norm() / w.norm()), rel=1e-5)
    # Eckart–Young: the best rank-4 fit leaves exactly the tail singular values
    assert after == pytest.approx(float(S[4:].square().sum().sqrt() / w.norm()), rel=1e-4)
    U, S_, Vh = torch.linalg.svd(residual, full_matrices=False)
    assert torch.allclose(lora.scale * lora.B @ lora.A, U[:, :4] @ torch.diag(S_[:4]) @ Vh[:4], atol=1e-5)
    assert torch.allclose(lora.B.norm(), lora.A.norm(), rtol=1e-4)  # singular values split evenly
    x = torch.randn(3, 64)
    layer = QLinear(q)
    layer.adapters = torch.nn.ModuleDict({"default": lora})
    fitted = x @ (q.dequantize() + lora.scale * lora.B @ lora.A).t()
    assert torch.allclose(layer(x), fitted, atol=1e-4)


def test_more_iterations_refit_the_quantization_and_keep_the_error_low():
    w = torch.randn(48, 64)
    quantizer = RTN(RTNConfig(bits=2, group_size=16))
    errors = [loftq_layer(w, quantizer, LoRA(LoRAConfig(rank=8), 64, 48), iterations=t)[2] for t in (1, 3)]
    assert errors[1] <= errors[0] * 1.05


def test_loftq_step_on_a_tiny_model_beats_plain_rtn_and_round_trips(tmp_path):
    fp = tiny_model("llama")
    ref = fp(IDS).logits.detach()
    rtn = lowbit.quantize(tiny_model("llama"), "rtn-w2g64")
    recipe = lowbit.Recipe([LoftQConfig(rank=8)])
    assert recipe.steps[0].base_config() == RTNConfig(bits=2, group_size=64)
    model = lowbit.quantize(tiny_model("llama"), recipe)
    errors = state_of(model).history["loftq"]
    assert len(errors) == 14 and all(after < before for before, after in errors.values())
    with torch.no_grad():
        err_rtn = (rtn(IDS).logits - ref).norm()
        err_loftq = (model(IDS).logits - ref).norm()
    assert err_loftq < err_rtn
    loaded, _ = lowbit.load(lowbit.save(model, tmp_path / "ckpt"))
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, model(IDS).logits)


def test_bad_configs_are_refused():
    with pytest.raises(LowbitError, match="needs calibration"):
        LoftQConfig(quantizer={"step": "gptq", "bits": 2, "group_size": 64})
    with pytest.raises(LowbitError, match="iterations"):
        LoftQConfig(iterations=0)
    with pytest.raises(LowbitError, match="not below the width"):
        lowbit.quantize(tiny_model("llama"), lowbit.Recipe([LoftQConfig(rank=64)]))
