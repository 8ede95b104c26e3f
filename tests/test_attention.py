"""lowbit's CPU attention over whole causal sequences (csrc/attention.cpp, lowbit.nn.attention): torch's SDPA
within fp32 rounding on shapes that are not multiples of its 64 × 64 blocks, grouped KV heads, strided and bf16
inputs; every call it does not compute goes to transformers' SDPA function; models switch to it where they ran
sdpa, and the saved config never records it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model

import lowbit
from lowbit.kernels import calls, force
from lowbit.nn.attention import NAME, cpu_attention, use_cpu_attention

ext = lowbit.kernels.cpu.extension()
pytestmark = pytest.mark.skipif(ext is None or not ext.causal_attention_applies(64),
                                reason="the C++ extension did not build, or no AVX-512 here")


def _qkv(batch, heads, kv_heads, length, dim, seed=0, dtype=torch.float32):
    """q (B, H, L, D), k, v (B, Hkv, L, D) as transformers makes them: transposed views of (B, L, heads, D)."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, length, n, dim, generator=gen).mul_(2).to(dtype).transpose(1, 2)
               for n in (heads, kv_heads, kv_heads))
    return q, k, v


@pytest.mark.parametrize("batch,heads,kv_heads,length,dim", [
    (1, 9, 3, 512, 64), (2, 4, 2, 100, 32), (1, 2, 1, 2, 16), (1, 4, 4, 65, 128), (1, 2, 2, 130, 80),
    (3, 6, 3, 257, 48), (1, 1, 1, 64, 256)])
def test_the_kernel_equals_torchs_causal_sdpa(batch, heads, kv_heads, length, dim):
    q, k, v = _qkv(batch, heads, kv_heads, length, dim)
    reference = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).transpose(1, 2)
    out = ext.causal_attention(q, k, v, dim ** -0.5)
    assert out.shape == (batch, length, heads, dim) and out.is_contiguous()
    assert ((out - reference).abs().max() / reference.abs().max()) < 2e-6


def test_bf16_inputs_are_computed_in_fp32_and_returned_in_bf16():
    q, k, v = _qkv(1, 4, 2, 200, 64, dtype=torch.bfloat16)
    module = torch.nn.Module()
    module.is_causal = True
    with force("auto"):
        out, _ = cpu_attention(module, q, k, v, None, scaling=0.125)
    reference = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True, enable_gqa=True,
                                               scale=0.125).transpose(1, 2)
    assert out.dtype == torch.bfloat16 and torch.allclose(out.float(), reference, atol=2e-2, rtol=1e-2)


def test_calls_it_does_not_compute_go_to_transformers_sdpa():
    """A padding mask, a query shorter than its keys (a cached decode step), values narrower than the keys, a
    sliding window shorter than the sequence, autograd or another kernel choice: transformers' SDPA function, and
    no ``cpu-attention`` call."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups = True, 2
    q, k, v = _qkv(1, 4, 2, 40, 32)
    mask = torch.ones(1, 1, 40, 40, dtype=torch.bool).tril()
    grad_q = q.detach().clone().requires_grad_()
    cases = [((q, k, v, mask), {}, "auto"),
             ((q[:, :, -1:], k, v, None), {}, "auto"),
             ((q, k, v[..., :16], None), {}, "auto"),
             ((q, k, v, None), {"sliding_window": 8}, "auto"),
             ((grad_q, k, v, None), {}, "auto"),
             ((q, k, v.detach().clone().requires_grad_(), None), {}, "auto"),  # adapters on v_proj alone
             ((q, k, v, None), {}, "exact")]
    for args, kwargs, choice in cases:
        before = calls["cpu-attention"]
        with force(choice):
            out, _ = cpu_attention(module, *args, scaling=0.2, **kwargs)
            reference, _ = sdpa_attention_forward(module, *args, scaling=0.2, **kwargs)
        assert calls["cpu-attention"] == before and torch.equal(out, reference)
    before = calls["cpu-attention"]
    with force("auto"):
        out, _ = cpu_attention(module, q, k, v, None, scaling=0.2, sliding_window=40)  # hides nothing here
    assert calls["cpu-attention"] == before + 1
    assert torch.allclose(out, sdpa_attention_forward(module, q, k, v, None, scaling=0.2)[0], atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_a_model_switched_to_it_computes_what_sdpa_computes(arch, tmp_path):
    """A float tiny model: the same logits within fp32 rounding, prompts and cached decode alike; a packed model
    saved and loaded runs it, and its config.json does not name it."""
    model = tiny_model(arch)
    ids = torch.randint(0, 256, (2, 37), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        reference = model(ids).logits
        assert use_cpu_attention(model) and model.config._attn_implementation == NAME
        before = calls["cpu-attention"]
        with force("auto"):
            out = model(ids).logits
            generated = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert calls["cpu-attention"] > before
    assert ((out - reference).abs().max() / reference.abs().max()) < 1e-5
    model.set_attn_implementation("sdpa")
    with torch.inference_mode():
        assert torch.equal(generated, model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0))
    lowbit.quantize(model, "rtn-w4g32")
    assert model.config._attn_implementation == NAME  # apply_recipe switched it
    path = lowbit.save(model, tmp_path / "ck")
    assert NAME not in (path / "config.json").read_text()
    loaded, _ = lowbit.load(path)
    assert loaded.config._attn_implementation == NAME


def test_models_on_other_attention_implementations_are_left_alone():
    model = tiny_model("llama")
    model.set_attn_implementation("eager")
    assert not use_cpu_attention(model) and model.config._attn_implementation == "eager"
