"""Per-layer sensitivities for a global bit assignment: the input power ``diag(H)`` each Linear's packed columns
see and the mean squared loss gradient at each Linear's output, both from whole-model passes over the
calibration windows (lowra-gptq's error estimate in units of loss)."""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from .calibration import StopForward
from .errors import LowbitError
from .models import decoder_blocks
from .protocol import LOGITS_CHUNK


@torch.no_grad()
def input_power(model: nn.Module, windows: torch.Tensor, layer_names: list[str]) -> dict[str, torch.Tensor]:
    """``diag(H) = 2/N Σ x²`` ``(in - r,)`` of the input each listed Linear's packed columns see (after its input
    transform, as :func:`run_blockwise`'s Hessians), from one float forward over ``windows``
    (stopped after the last decoder block: the head's logits are not needed)."""
    _, blocks = decoder_blocks(model)
    power = {n: None for n in layer_names}
    tokens = 0

    def hook(name):
        def fn(module, args, out):
            x = args[0]
            if hasattr(module, "calibration_input"):  # rotated / QUAD-split input: what the packed columns see
                x = module.calibration_input(x)
            x = x.reshape(-1, x.shape[-1]).float()
            p = 2 * (x * x).sum(0)
            power[name] = p if power[name] is None else power[name] + p
        return fn

    def stop(module, args, out):
        raise StopForward

    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in layer_names]
    handles.append(blocks[-1].register_forward_hook(stop))
    try:
        for row in tqdm(windows, desc="input power", unit="window", leave=False):
            try:
                model(row.unsqueeze(0), use_cache=False)
            except StopForward:
                pass
            tokens += row.numel()
    finally:
        for h in handles:
            h.remove()
    return {n: p / tokens for n, p in power.items()}


def output_sensitivity(model: nn.Module, windows: torch.Tensor, layer_names: list[str], chunk: int = LOGITS_CHUNK,
                       max_tokens: int = 8192) -> dict[str, torch.Tensor]:
    """Mean squared gradient of the language-model loss with respect to each listed Linear's output,
    ``E[(∂L/∂y_r)²]`` ``(out,)`` per output channel ``r`` (the diagonal Fisher of the layer's output).

    With ``diag(H)`` of the input this gives a second-order estimate of the loss change from a weight error:
    ``ΔL ≈ ½ Σ_r E[(∂L/∂y_r)²] · Σ_j diag(H)_j Δw_rj²``, comparable across layers and rows, which is what a global
    precision assignment needs. The calibration windows are cut into ``chunk``-token pieces (backward memory grows
    with length; shorter windows are used whole) and at most ``max_tokens`` are used. Weights get no gradients:
    only the activations do.
    """
    grads = {n: None for n in layer_names}
    chunk = min(chunk, windows.shape[1])  # shorter calibration windows are used whole
    pieces = windows[:, : windows.shape[1] // chunk * chunk].reshape(-1, chunk)[: max(1, max_tokens // chunk)]

    def hook(name):
        def fn(module, args, out):
            def accumulate(g):
                s = (g.float() ** 2).reshape(-1, g.shape[-1]).sum(0)
                grads[name] = s if grads[name] is None else grads[name] + s
            if out.requires_grad:
                out.register_hook(accumulate)
        return fn

    embed = model.get_input_embeddings()
    flags = [(p, p.requires_grad) for p in model.parameters()]
    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in layer_names]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        with torch.enable_grad():
            for ids in tqdm(pieces, desc="output sensitivity", unit="chunk", leave=False):
                ids = ids.unsqueeze(0)
                x = embed(ids).detach().requires_grad_(True)
                loss = model(inputs_embeds=x, labels=ids, use_cache=False).loss
                loss.backward()
    finally:
        for h in handles:
            h.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
    tokens = pieces.numel()
    missing = [n for n, g in grads.items() if g is None]
    if missing:
        raise LowbitError(f"no gradient reached {missing[0]}; sensitivity needs a differentiable path to the loss")
    return {n: g / tokens for n, g in grads.items()}
