"""lowbit's CPU attention over whole causal sequences (csrc/attention.cpp, lowbit.nn.attention): torch's SDPA
within fp32 rounding on shapes that are not multiples of its 64 × 64 blocks, grouped KV heads, strided inputs; bf16
products for bf16 inputs and under bf16 autocast; every call it does not compute goes to transformers' SDPA
function; models switch to it where they ran sdpa (calibration passes too), and the saved config never records it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model
from tolerances import BF16_ATTENTION_REL

import lowbit
from lowbit.kernels import calls, force
from lowbit.kernels.cpu import attention_supports, causal_attention
from lowbit.nn.attention import NAME, calibration_attention, cpu_attention, use_cpu_attention

ext = lowbit.kernels.cpu.extension()
pytestmark = pytest.mark.skipif(ext is None or not ext.causal_attention_applies(64),
                                reason="the C++ extension did not build, or no AVX-512 or AVX2 here")
needs_bf16 = pytest.mark.skipif(ext is None or not ext.bf16_attention_applies(),
                                reason="this CPU build has no AVX512-BF16: bf16 attention inputs run in fp32")


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


@pytest.mark.skipif(ext is not None and ext.bf16_attention_applies(), reason="this build multiplies bf16 as bf16")
def test_without_avx512_bf16_bf16_inputs_attend_in_fp32_and_come_back_bf16():
    q, k, v = _qkv(1, 4, 2, 130, 32, dtype=torch.bfloat16)
    out = causal_attention(q, k, v, 0.2, bf16=True)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, ext.causal_attention(q.float(), k.float(), v.float(), 0.2).bfloat16())


def test_sequences_longer_than_the_build_takes_go_to_sdpa():
    """An AVX2 build sends sequences past ``causal_attention_longest`` (1,536 tokens) to torch's kernel, which measured
    as fast there; an AVX-512 build takes every length. The kernel itself computes any length."""
    longest = ext.causal_attention_longest()
    assert longest >= 512
    short, long = (_qkv(1, 2, 1, n, 16) for n in (min(longest, 700), min(longest + 1, 2000)))
    assert attention_supports(*short)
    assert attention_supports(*long) == (longest >= 2000)
    q, k, v = long
    reference = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).transpose(1, 2)
    assert ((ext.causal_attention(q, k, v, 0.25) - reference).abs().max() / reference.abs().max()) < 2e-6


@pytest.mark.parametrize("batch,heads,kv_heads,length,dim", [
    (1, 9, 3, 512, 64), (2, 4, 2, 101, 32), (1, 2, 1, 2, 16), (1, 4, 4, 65, 128), (1, 2, 2, 131, 80),
    (3, 6, 3, 257, 48)])
@needs_bf16
def test_bf16_products_give_the_attention_of_the_rounded_inputs(batch, heads, kv_heads, length, dim):
    """bf16 q, k, v: Q Kᵀ and P V as bf16 pairs into fp32 sums, the probabilities rounded to bf16 (as FlashAttention
    does on GPUs): the fp64 attention of the same bf16 values within that rounding; odd lengths (a key pairs with
    zeros at a block's end), head widths of 16 × odd, grouped heads."""
    q, k, v = _qkv(batch, heads, kv_heads, length, dim, dtype=torch.bfloat16)
    reference = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True,
                                               enable_gqa=True).transpose(1, 2)
    out = ext.causal_attention(q, k, v, dim ** -0.5)
    assert out.dtype == torch.float32 and out.shape == (batch, length, heads, dim)
    assert ((out - reference).abs().max() / reference.abs().max()) < BF16_ATTENTION_REL


@needs_bf16
def test_bf16_inputs_and_bf16_autocast_multiply_bf16_and_fp32_inputs_stay_fp32():
    q, k, v = _qkv(1, 4, 2, 200, 64)
    module = torch.nn.Module()
    module.is_causal = True
    low = causal_attention(q, k, v, 0.125, bf16=True)
    with force("auto"):
        plain, _ = cpu_attention(module, q, k, v, None, scaling=0.125)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast, _ = cpu_attention(module, q, k, v, None, scaling=0.125)
        rounded, _ = cpu_attention(module, q.bfloat16(), k.bfloat16(), v.bfloat16(), None, scaling=0.125)
    assert torch.equal(plain, causal_attention(q, k, v, 0.125)) and plain.dtype == torch.float32
    assert torch.equal(autocast, low) and autocast.dtype == torch.float32
    assert torch.equal(rounded, low.bfloat16()) and rounded.dtype == torch.bfloat16
    assert not torch.equal(plain, low)
    odd = torch.randn(1, 200, 4, 65).bfloat16()[..., :64].transpose(1, 2)  # rows 65 apart: odd strides, read as pairs
    assert torch.equal(causal_attention(odd, k, v, 0.125, bf16=True),
                       causal_attention(odd.contiguous(), k, v, 0.125, bf16=True))


def test_calibration_attention_runs_the_kernel_whatever_the_linears_are_forced_to_and_restores_sdpa():
    model = tiny_model("llama")
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        reference = model(ids).logits
        before = calls["cpu-attention"]
        with calibration_attention(model) as switched, force("exact"):
            assert switched and model.config._attn_implementation == NAME
            out = model(ids).logits
        assert calls["cpu-attention"] == before + model.config.num_hidden_layers
    assert model.config._attn_implementation == "sdpa"
    assert ((out - reference).abs().max() / reference.abs().max()) < 1e-5
    model.set_attn_implementation("eager")
    with calibration_attention(model) as switched:
        assert not switched and model.config._attn_implementation == "eager"


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
