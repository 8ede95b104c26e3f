"""The ground truth: dequantize to fp32, then ``F.linear``. Correct everywhere, supports autograd."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..qtensor import PackedWeight


def qmatmul_reference(x: torch.Tensor, qweight: PackedWeight) -> torch.Tensor:
    """``x (..., in)`` -> ``(..., out)`` = ``x @ dequantize(W)ᵀ`` computed in fp32, returned in ``x.dtype``."""
    w = qweight.dequantize(torch.float32)
    return F.linear(x.float(), w).to(x.dtype)
