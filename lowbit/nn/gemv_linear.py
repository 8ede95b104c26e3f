"""GEMVLinear: an ``nn.Linear`` whose decode step runs lowbit's fp32 GEMV (:func:`lowbit.kernels.linear`).

A packed model keeps its LM head in float (the plain presets do not quantize it). At 2 bits that head is most of
what a decode step reads (113 of 145 MB for SmolLM2-135M), and torch's fp32 matrix-vector product reads it at
about a third of this CPU's bandwidth. :func:`use_gemv_head` switches the head's class in place, so its
parameters, their tying to the input embeddings and the state-dict keys stay exactly as they were; prefill,
batches and training still run ``F.linear``.
"""

from __future__ import annotations

import torch
from torch import nn

from ..kernels import linear
from ..kernels.compiled import float_linear


class GEMVLinear(nn.Linear):
    """``nn.Linear`` with the same parameters; ``x (..., in)`` -> ``(..., out)`` through :func:`linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():  # opaque ops for torch.compile (lowbit.nn.compile)
            if self.__dict__.get("decode_native") and x.numel() == x.shape[-1] and x.dtype == torch.float32:
                y = torch.ops.lowbit.gemv_f32(x, self.weight)
            else:
                y = float_linear(x, self.weight)
            return y if self.bias is None else y + self.bias
        return linear(x, self.weight, self.bias)


FLOAT_LINEARS = (nn.Linear, GEMVLinear)  # the exact classes of an unquantized float Linear that lowbit handles


def is_float_linear(module: nn.Module | None) -> bool:
    """Whether ``module`` is a plain float Linear (``nn.Linear`` or a switched head); exact classes, so a
    QLinear, a TransformedLinear or another library's Linear subclass is not one."""
    return type(module) in FLOAT_LINEARS


def use_gemv_head(model: nn.Module) -> bool:
    """Route ``model``'s float output head (an exact ``nn.Linear``) through :class:`GEMVLinear`, in place.
    Returns whether it did (a packed or already switched head is left alone)."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if get_head is not None else None
    if type(head) is not nn.Linear:
        return False
    head.__class__ = GEMVLinear
    return True
