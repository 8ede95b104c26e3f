"""Merge and export: float merge equals the adapter forward, PEFT reproduces lowbit's logits, requantize
reports its error, and the ``merge`` / ``export`` commands write complete folders."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_model
from test_cli import invoke, one_error_line, one_json_object
from torch import nn

import lowbit
from lowbit import QLinear, export
from lowbit import adapters as ad

IDS = torch.tensor([[1, 17, 42, 99, 3, 250, 7, 64, 128, 5, 0, 33], [9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 255, 254]])


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def _trained(recipe="rtn-w4g64+emb8", lorma=False, tied=True):
    model = lowbit.quantize(tiny_model("llama", tie_word_embeddings=tied), recipe)
    ad.attach(model, ad.LoRAConfig(rank=4, alpha=8))
    if lorma:
        ad.attach(model, ad.LoRMAConfig(rank=3, variant="shift", targets=("*.mlp.*",)), name="mul")
    with torch.no_grad():
        for p in ad.parameters(model):
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("lorma", [False, True])
def test_merged_float_model_equals_the_adapter_forward(lorma):
    model = _trained(lorma=lorma)
    merged = export.merged_float_model(model)
    assert not any(isinstance(m, QLinear) for m in merged.modules())
    assert type(merged.get_input_embeddings()) is nn.Embedding
    assert merged.get_output_embeddings().weight is merged.get_input_embeddings().weight  # tied again
    assert _rel(_logits(merged), _logits(model)) <= 1e-5
    assert isinstance(model.model.layers[0].mlp.up_proj, QLinear)  # the source model is not changed


@pytest.mark.parametrize("storage", ["float32", "int8", "int4"])
def test_peft_reproduces_lowbit_logits(tmp_path, storage):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = _trained()
    ad.store_adapters(model, storage)  # PEFT gets integer-coded factors dequantized
    ref = _logits(model)
    out = export.export_peft(model, tmp_path / "peft")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"])
    base_logits = _logits(base)
    assert _rel(base_logits, ref) > 1e-3  # the adapters matter, so the comparison below tests them
    peft_model = PeftModel.from_pretrained(base, out)
    assert _rel(_logits(peft_model), ref) <= 1e-4


def test_peft_export_refuses_lorma_and_native_export_takes_it(tmp_path):
    model = _trained(lorma=True)
    with pytest.raises(lowbit.LowbitError, match="several adapters"):
        export.export_peft(model, tmp_path / "peft")
    ad.remove(model, "default")
    with pytest.raises(lowbit.LowbitError, match="only LoRA has a PEFT layout"):
        export.export_peft(model, tmp_path / "peft")
    assert not (tmp_path / "peft").exists()
    out = export.export_native(model, tmp_path / "native")
    meta = json.loads((out / "adapters.json").read_text())
    assert meta["mul"]["config"]["variant"] == "shift"
    from safetensors.torch import load_file

    tensors = load_file(out / "adapters.safetensors")
    layer = model.model.layers[1].mlp.up_proj
    assert torch.equal(tensors["model.layers.1.mlp.up_proj.mul.A"], layer.adapters["mul"].A)
    from transformers import AutoModelForCausalLM

    assert _rel(_logits(AutoModelForCausalLM.from_pretrained(out / "merged")), _logits(model)) <= 1e-5


def test_requantize_keeps_each_layers_grid_and_reports_the_error():
    model = _trained("rtn-w4g64")
    requantized, errors = export.requantize(model)
    assert len(errors) == 14 and all(0 < e < 0.2 for e in errors.values())
    assert not ad.adapted_layers(requantized)
    q = requantized.model.layers[0].self_attn.q_proj
    assert q.fmt == "int4" and q.group_size == 64
    assert _rel(_logits(requantized), _logits(model)) < 0.5


@pytest.fixture(scope="module")
def tuned_ckpt(tmp_path_factory, hf_folder):
    model, tok = lowbit.load_model(hf_folder)
    lowbit.quantize(model, "rtn-w4g64")
    ad.attach(model, ad.LoRAConfig(rank=4))
    with torch.no_grad():
        for p in ad.parameters(model):
            p.add_(torch.randn_like(p) * 0.05)
    return lowbit.save(model, tmp_path_factory.mktemp("ft") / "tuned", tokenizer=tok)


def test_merge_and_export_commands(tuned_ckpt, ckpt, tmp_path):
    payload = one_json_object(invoke("merge", tuned_ckpt, "--out", tmp_path / "merged", "--windows", "1", "--json"))
    assert payload["kind"] == "float" and payload["adapted_layers"] == 14
    assert payload["ppl_merged"] == pytest.approx(payload["ppl_adapters"], rel=1e-4)
    payload = one_json_object(invoke("merge", tuned_ckpt, "--out", tmp_path / "requant", "--requantize", "--json"))
    assert payload["kind"] == "lowbit" and 0 < payload["requantize_rel_error_max"] < 0.2
    lowbit.load(tmp_path / "requant")
    payload = one_json_object(invoke("export", tuned_ckpt, "--out", tmp_path / "peft", "--json"))
    assert "adapter_model.safetensors" in payload["files"] and "base/config.json" in payload["files"]
    assert "no adapters to merge" in one_error_line(invoke("merge", ckpt, "--out", tmp_path / "x"))
    assert "already exists" in one_error_line(invoke("export", tuned_ckpt, "--out", tmp_path / "peft"))
    refused = one_error_line(invoke("export", tuned_ckpt, "--out", tmp_path / "y", "--format", "onnx"))
    assert "--to must be one of peft, native, compressed-tensors, gguf" in refused
