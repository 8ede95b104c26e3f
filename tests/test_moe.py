"""Mixture-of-experts models: every expert packed (one Linear per expert), the router float, tokens routed to each
expert counted by calibration (experts reached by few or none handled and reported), both loaders, export."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from conftest import ByteTokenizer

import lowbit
from lowbit.adapters import LoRAConfig, attach, parameters
from lowbit.api import info
from lowbit.architectures import expert_lists, fuse_experts, unfuse_experts
from lowbit.errors import LowbitError
from lowbit.export import export_peft, merged_float_model
from lowbit.nn.experts import ExpertList
from lowbit.nn.qlinear import QLinear
from lowbit.quantizers import GPTQConfig, RTNConfig

TEXT = " ".join(f"the {w} of a city is a place where people live and work" for w in range(400))
CONFIGS = {
    "qwen3_moe": (tf.Qwen3MoeConfig, tf.Qwen3MoeForCausalLM,
                  dict(head_dim=16, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32)),
    "mixtral": (tf.MixtralConfig, tf.MixtralForCausalLM, dict(num_local_experts=4, num_experts_per_tok=2)),
}


def moe_model(family: str = "qwen3_moe") -> torch.nn.Module:
    config_cls, model_cls, extra = CONFIGS[family]
    torch.manual_seed(0)
    return model_cls(config_cls(vocab_size=256, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                **extra)).eval()


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
HELD_OUT = ByteTokenizer()(TEXT[5000:5100], return_tensors="pt").input_ids  # text like the calibration's


@pytest.mark.parametrize("family", CONFIGS)
def test_unfused_experts_compute_the_fused_function(family):
    model = moe_model(family)
    ref = logits(model, IDS)
    n = unfuse_experts(model)
    assert n == sum(len(e) for e in expert_lists(model).values()) and n > 0
    assert not any(p.dim() == 3 for p in model.parameters())
    torch.testing.assert_close(logits(model, IDS), ref, rtol=1e-5, atol=1e-5)
    fuse_experts(model)  # and back: transformers' own module with the same tensors
    assert not expert_lists(model)
    torch.testing.assert_close(logits(model, IDS), ref, rtol=1e-5, atol=1e-5)


def test_gptq_packs_every_expert_counts_routed_tokens_and_both_loaders_agree(tmp_path):
    model = moe_model()
    ref = logits(model, HELD_OUT)
    rtn = moe_model()
    lowbit.quantize(rtn, lowbit.Recipe([RTNConfig(bits=4, group_size=32)]))
    experts = sum(p.numel() for p in model.parameters() if p.dim() == 3)
    router = [n for n, p in model.named_parameters() if n.endswith("mlp.gate.weight")]
    calib = lowbit.Calibration(tokenizer=ByteTokenizer(), n=4, seq_len=32, text=TEXT)
    lowbit.quantize(model, lowbit.Recipe([GPTQConfig(bits=4, group_size=32)]), calib=calib)
    expert_layers = {n: m for n, m in model.named_modules() if ".experts." in n and isinstance(m, QLinear)}
    assert len(expert_layers) == 2 * 2 * 8  # blocks x experts x (gate_up, down): every one packed
    assert all(dict(model.named_parameters())[n].dtype == torch.float32 for n in router)  # router stays float
    # measured 0.059 vs RTN's 0.111 on held-out text like the calibration's: the routed Hessians help
    assert (logits(model, HELD_OUT) - ref).norm() < 0.8 * (logits(rtn, HELD_OUT) - ref).norm()
    path = lowbit.save(model, tmp_path / "moe")
    summary = info(path, layers=True)
    assert set(expert_layers) <= set(summary["layers"])  # `lowbit info --layers` lists each expert
    assert summary["experts"] == 16 and summary["float_expert_weights"] == 0
    assert summary["quantized_weights"] >= experts  # bits/weight counts the experts
    tokens = summary["expert_tokens"]
    assert set(tokens) == set(expert_layers) and sum(tokens[n] for n in tokens if n.endswith("gate_up_proj")) == \
        2 * 2 * 4 * 32  # each of the 128 tokens reaches top-2 experts, in each of 2 blocks
    ours, _ = lowbit.load(path)
    theirs = tf.AutoModelForCausalLM.from_pretrained(path)
    assert torch.equal(logits(ours, IDS), logits(model, IDS))
    assert torch.equal(logits(theirs, IDS), logits(model, IDS))


def test_an_expert_no_token_reaches_is_still_packed_and_reported(caplog):
    model = moe_model()
    for w in (b.mlp.gate.weight.data for b in model.model.layers):
        # expert 0's logit is 0 and, of ±u and ±v, two are positive for every token: top-2 never picks expert 0
        w[0], w[2], w[4] = 0.0, -w[1], -w[3]
    calib = lowbit.Calibration(tokenizer=ByteTokenizer(), n=2, seq_len=16, text=TEXT)
    lowbit.quantize(model, lowbit.Recipe([GPTQConfig(bits=4, group_size=32)]), calib=calib)
    unused = model.model.layers[0].mlp.experts[0].gate_up_proj
    assert isinstance(unused, QLinear)
    w = unused.merged_weight(torch.float32)
    assert w.abs().sum() > 0  # plain rounding of its weights, not the zeros GPTQ gives dead inputs
    assert lowbit.state.state_of(model).history["expert_tokens"]["model.layers.0.mlp.experts.0.gate_up_proj"] == 0
    assert "received fewer calibration tokens" in caplog.text and "experts.0.gate_up_proj: 0" in caplog.text


def test_adapters_and_a_float_export_understand_the_expert_layout(tmp_path):
    model = moe_model("mixtral")
    lowbit.quantize(model, lowbit.Recipe([RTNConfig(bits=8, group_size=32)]))
    attach(model, LoRAConfig(rank=4))
    for p in parameters(model):  # trained-looking factors, so merging them changes the weights
        p.data.normal_(0, 0.02)
    adapted = [n for n, m in model.named_modules() if isinstance(m, QLinear) and len(m._modules.get("adapters") or ())]
    assert any(".experts.3.down_proj" in n for n in adapted)
    out = logits(model, IDS)
    merged = merged_float_model(model)
    assert not expert_lists(merged) and any(p.dim() == 3 for p in merged.parameters())  # fused again
    torch.testing.assert_close(logits(merged, IDS), out, rtol=1e-4, atol=1e-4)
    merged.save_pretrained(tmp_path / "float")
    reloaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "float")
    torch.testing.assert_close(logits(reloaded, IDS), out, rtol=1e-4, atol=1e-4)
    assert not any(isinstance(m, ExpertList) for m in reloaded.modules())
    with pytest.raises(LowbitError, match=r"experts\.0\.gate_up_proj is an MoE expert: PEFT.*--format native"):
        export_peft(model, tmp_path / "peft")
