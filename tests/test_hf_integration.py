"""``import lowbit`` lets ``AutoModelForCausalLM.from_pretrained`` load lowbit checkpoints, bit-identically."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

import lowbit
from lowbit import QLinear, Recipe, RTNConfig
from lowbit.errors import CheckpointError
from lowbit.nn import GEMVLinear
from lowbit.state import state_of

hf_integration = pytest.importorskip("lowbit.hf_integration")
pytestmark = pytest.mark.skipif(not hf_integration.REGISTERED,
                                reason="this transformers has no quantizer registry; lowbit.load is the path")


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny llama with tied embeddings, rtn-w4g64, saved; plus its in-memory quantized model."""
    model = tiny_model("llama", tie_word_embeddings=True)
    lowbit.quantize(model, "rtn-w4g64")
    path = lowbit.save(model, tmp_path_factory.mktemp("hf") / "ckpt")
    return path, model


IDS = torch.tensor([[1, 17, 42, 99, 3, 250, 7, 64, 128, 5, 0, 33]])


def test_registered_with_transformers():
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

    assert AUTO_QUANTIZER_MAPPING["lowbit"] is hf_integration.LowbitHfQuantizer
    assert AUTO_QUANTIZATION_CONFIG_MAPPING["lowbit"] is hf_integration.LowbitConfig


def test_from_pretrained_matches_lowbit_load_bit_for_bit(checkpoint):
    from transformers import AutoModelForCausalLM

    path, quantized = checkpoint
    hf = AutoModelForCausalLM.from_pretrained(path)
    loaded, _ = lowbit.load(path)

    names = {n for n, m in hf.named_modules() if isinstance(m, QLinear)}
    assert names == set(state_of(loaded).manifest["layers"])
    assert all(name.startswith("model.layers.") for name in names) and len(names) == 14
    q = hf.model.layers[0].self_attn.q_proj
    assert (q.codes.dtype, q.scales.dtype, q.zeros.dtype) == (torch.uint8, torch.float16, torch.uint8)
    for name, buf in hf.named_buffers():  # packed tensors arrive exactly as stored, no requantization
        if name.rpartition(".")[2] in ("codes", "scales", "zeros"):
            assert torch.equal(buf, loaded.get_buffer(name)), name
    assert hf.is_quantized and hf.config.quantization_config.quant_method == "lowbit"
    assert state_of(hf).recipe.to_dict() == state_of(quantized).recipe.to_dict()

    # tied embeddings stay tied and the (float) head is the embedding
    assert type(hf.lm_head) is GEMVLinear  # a plain Linear's parameters; decode steps on lowbit's fp32 GEMV
    assert hf.lm_head.weight is hf.model.embed_tokens.weight
    assert torch.equal(hf.lm_head.weight, quantized.lm_head.weight)

    out = _logits(hf, IDS)
    assert torch.equal(out, _logits(loaded, IDS))
    assert torch.equal(out, _logits(quantized, IDS))


def test_biases_quantized_head_and_dtype(tmp_path):
    """Linear biases, nf4, the head quantized too: still bit-identical; ``dtype=`` casts float tensors only."""
    from transformers import AutoModelForCausalLM

    model = tiny_model("llama", tie_word_embeddings=True, attention_bias=True, mlp_bias=True)
    lowbit.quantize(model, Recipe([RTNConfig(format="nf", bits=4, group_size=32, targets=("@decoder", "lm_head"))]))
    path = lowbit.save(model, tmp_path / "ckpt")
    hf = AutoModelForCausalLM.from_pretrained(path)
    assert isinstance(hf.lm_head, QLinear) and not hf.config.tie_word_embeddings
    bias = hf.model.layers[0].self_attn.q_proj.bias
    assert bias is not None and not bias.requires_grad
    assert torch.equal(_logits(hf, IDS), _logits(lowbit.load(path)[0], IDS))
    assert torch.equal(_logits(hf, IDS), _logits(model, IDS))

    half = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    q = half.model.layers[0].self_attn.q_proj
    assert (q.codes.dtype, q.scales.dtype, q.bias.dtype) == (torch.uint8, torch.float16, torch.bfloat16)
    assert half.model.embed_tokens.weight.dtype == torch.bfloat16


def test_save_pretrained_refused_and_lowbit_save_round_trips(checkpoint, tmp_path):
    from transformers import AutoModelForCausalLM

    path, quantized = checkpoint
    hf = AutoModelForCausalLM.from_pretrained(path)
    with pytest.raises(ValueError, match="not serializable"):
        hf.save_pretrained(tmp_path / "hf")
    again = lowbit.save(hf, tmp_path / "again")
    assert torch.equal(_logits(lowbit.load(again)[0], IDS), _logits(quantized, IDS))


def test_missing_manifest_is_a_clear_error(checkpoint, tmp_path):
    import shutil

    from transformers import AutoModelForCausalLM

    path, _ = checkpoint
    broken = tmp_path / "broken"
    shutil.copytree(path, broken)
    (broken / "lowbit.json").unlink()
    with pytest.raises(CheckpointError, match="lowbit.json is missing"):
        AutoModelForCausalLM.from_pretrained(broken)


@pytest.mark.parametrize("adapter", ["lora", "lorma", "lora-int8", "lora-int4"])
def test_adapters_load_through_transformers_too(tmp_path, adapter):
    """A checkpoint with trained adapters (a fine-tune's, RILQ's, LoftQ's) computes the same function through
    from_pretrained as through lowbit.load: the adapters are built and filled, not dropped as unexpected keys."""
    from transformers import AutoModelForCausalLM

    from lowbit import adapters as ad

    model = lowbit.quantize(tiny_model("llama"), "rtn-w4g64")
    config = ad.LoRAConfig(rank=4) if adapter.startswith("lora") else ad.LoRMAConfig(rank=4)
    ad.attach(model, config)
    with torch.no_grad():
        for p in (p for n, p in model.named_parameters() if ".adapters." in n):
            p.normal_(0, 0.05)  # trained, non-zero factors: dropping them would change the logits
    if adapter.startswith("lora-"):
        ad.store_adapters(model, adapter[5:])  # integer codes and fp32 scales, filled by transformers' loader as stored
    path = lowbit.save(model, tmp_path / "ck")
    ids = torch.randint(0, 256, (2, 16))
    loaded = AutoModelForCausalLM.from_pretrained(path)
    ours, _ = lowbit.load(path)
    assert {n for n, _ in loaded.named_parameters() if ".adapters." in n} == \
        {n for n, _ in ours.named_parameters() if ".adapters." in n} != set()
    stored = {n: t.dtype for n, t in ours.state_dict().items() if ".adapters." in n}
    assert {n: t.dtype for n, t in loaded.state_dict().items() if ".adapters." in n} == stored
    assert (torch.int8 in stored.values()) == (adapter == "lora-int8")
    assert (torch.uint8 in stored.values()) == (adapter == "lora-int4")  # two codes per byte
    assert torch.equal(_logits(loaded, ids), _logits(ours, ids))
    assert not torch.equal(_logits(loaded, ids), _logits(lowbit.quantize(tiny_model("llama"), "rtn-w4g64"), ids))
