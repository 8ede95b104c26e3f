"""A compiled decode step: transformers' static KV cache and ``torch.compile`` of the model's forward, with the
packed layers as opaque kernel calls (:mod:`lowbit.kernels.compiled`).

On SmolLM2-135M a decode step of a packed model spends more time in transformers' per-layer Python and small ops
(norms, rotary embeddings, cache updates: about 400 ops per token) than in its weights; compiling fuses those.
The eager path stays the default and the reference: compiling costs tens of seconds per batch size and length on
2 cores, and the fused fp32 sums differ from eager's by rounding (greedy tokens can part after a near tie).
"""

from __future__ import annotations

import torch
from torch import nn

from ..kernels import _choice
from ..kernels.compiled import native_ops, row_plan
from .gemv_linear import GEMVLinear
from .qlinear import QLinear


def compile_decode(model: nn.Module) -> nn.Module:
    """Generate through a compiled forward with the static KV cache (in place; returns ``model``).

    Each plain uniform packed layer gets its decode plan now (the kernel choice in force now is the one the graph
    keeps); the first ``generate`` of each batch size and length compiles, later ones with the same shapes reuse
    the graph (``dynamic=False``: the static cache makes shapes static)."""
    native = native_ops()
    choice = _choice()
    for module in model.modules():
        if isinstance(module, QLinear) and native and module._plain_uniform(module._modules.get("adapters")):
            plan = row_plan(module.weight_meta["fmt"], module.weight_meta["group_size"], choice)
            module.__dict__["decode_plan"] = None if plan is None else plan[1:]
        elif isinstance(module, GEMVLinear):
            module.__dict__["decode_native"] = native
    model.generation_config.cache_implementation = "static"
    model.forward = torch.compile(model.forward, dynamic=False)
    return model
