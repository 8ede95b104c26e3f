"""lowbit's CPU attention for whole causal sequences, as a transformers attention function (``lowbit_cpu``).

A prompt or an evaluation window attends over its own tokens with the causal mask and no
padding; there ``csrc/attention.cpp`` (64 × 64 blocks, online softmax; fp32, or bf16 products into fp32 sums for
bf16 inputs and under bf16 autocast where the CPU has AVX512-BF16) replaces torch's CPU flash kernel: with AVX-512, on
SmolLM2's 9 heads of 64 over 512 tokens 3.1 ms against 5.0 ms at 2 threads, over 2,048 tokens 38 (bf16: 22) against
40-49 ms; with AVX2 (8 lanes) 1.6-2.0x torch's speed at 512 tokens and 1.1-1.3x at 1,536, and sequences past 1,536
stay on torch's kernel, which is as fast there (BENCHMARKS.md). Everything
else — a decode step against a cache, a padding mask, a shorter sliding window, dropout, autograd, torch.compile,
another device or head size, ``LOWBIT_KERNEL`` other than ``auto`` outside :func:`calibration_attention` — goes to
transformers' own SDPA function unchanged.

:func:`use_cpu_attention` switches a model that runs ``sdpa`` to it (:func:`lowbit.io.load` and
:func:`lowbit.recipe.apply_recipe` do, for packed models; :func:`calibration_attention` for the calibration passes
of a float model); the saved ``config.json`` never records it.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch import nn

from ..kernels import _choice, calls, multiplies_bf16
from ..kernels.cpu import attention_supports, causal_attention

NAME = "lowbit_cpu"
_passes: list[bool] = []  # inside calibration_attention: the kernel runs whatever kernel the Linears are forced to
UNSUPPORTED = ("softcap", "position_bias", "cache", "sinks", "s_aux")  # keyword arguments that send a call to SDPA


def _sdpa():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward


def _applies(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask,
             dropout: float, is_causal: bool | None, kwargs: dict) -> bool:
    """Whether the call is a whole causal sequence the C++ kernel computes (see the module docstring): transformers'
    side of the contract here, the tensors' in :func:`lowbit.kernels.cpu.attention_supports`."""
    if attention_mask is not None or dropout or torch.compiler.is_compiling():
        return False
    if _choice() != "auto" and not (_passes and _passes[-1]):
        return False
    if (is_causal if is_causal is not None else getattr(module, "is_causal", True)) is not True:
        return False
    length = query.shape[2]
    if any(kwargs.get(k) is not None for k in UNSUPPORTED) or (kwargs.get("sliding_window") or length) < length:
        return False  # (a sliding window at least as long as the sequence hides nothing)
    return attention_supports(query, key, value)


def cpu_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                  is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract: ``query (B, H, L, D)``, ``key``/``value (B, Hkv, S, D)`` ->
    ``((B, L, H, D), None)``; the C++ kernel where :func:`_applies`, else transformers' SDPA function."""
    if not _applies(module, query, key, value, attention_mask, dropout, is_causal, kwargs):
        return _sdpa()(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                       is_causal=is_causal, **kwargs)
    calls["cpu-attention"] += 1
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return causal_attention(query, key, value, scale, bf16=multiplies_bf16(query)), None


@functools.cache
def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(NAME, cpu_attention)
    AttentionMaskInterface.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])  # masks exactly as for sdpa


def use_cpu_attention(model: nn.Module) -> bool:
    """Switch ``model`` (and its sub-configs) from ``sdpa`` to :data:`NAME`; True if it now runs it. Models with
    another attention implementation (eager, flash, flex), or whose class refuses a registered one, are left as
    they are."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) not in ("sdpa", NAME):
        return False
    _register()
    try:
        model.set_attn_implementation(NAME)
    except ValueError:  # a model class that takes no registered attention function keeps its SDPA
        model.set_attn_implementation("sdpa")
        return False
    return True


@contextlib.contextmanager
def calibration_attention(model: nn.Module):
    """Inside the block, ``model`` (a float model that runs ``sdpa``) attends through :data:`NAME` — the calibration
    passes (:func:`lowbit.calibration.for_each_block`), which force the exact kernels on their Linears but need the
    attention only to reach the next inputs. Under bf16 autocast it multiplies bf16 (1.85× torch's kernel over
    2,048 tokens of SmolLM2's heads). The model's attention implementation is restored on exit; yields whether the
    kernel is in use."""
    before = getattr(getattr(model, "config", None), "_attn_implementation", None)
    switched = use_cpu_attention(model)
    _passes.append(switched)
    try:
        yield switched
    finally:
        _passes.pop()
        if switched and before != NAME:
            model.set_attn_implementation(before)
