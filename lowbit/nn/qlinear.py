"""QLinear: a drop-in ``nn.Linear`` whose weight is a frozen, bit-packed :class:`QuantizedWeight`."""

from __future__ import annotations

import torch
from torch import nn

from .. import kernels
from ..qtensor import QuantizedWeight


class QLinear(nn.Module):
    """``y = x Wᵀ + b`` with ``W`` stored packed.

    The packed tensors are buffers (``codes``, ``scales``, ``zeros``) so ``state_dict`` and device moves see them;
    they are never cast to another dtype (``scales`` stay fp16) and have no gradient. Gradients flow to the input.
    Input ``x (..., in_features)`` in any float dtype; output ``(..., out_features)`` in the input's dtype.
    """

    def __init__(self, qweight: QuantizedWeight, bias: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features = qweight.in_features, qweight.out_features
        self.fmt, self.granularity, self.group_size = qweight.fmt, qweight.granularity, qweight.group_size
        self.register_buffer("codes", qweight.codes)
        self.register_buffer("scales", qweight.scales)
        self.register_buffer("zeros", qweight.zeros)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @property
    def qweight(self) -> QuantizedWeight:
        """The packed weight, viewing this module's buffers (no copy)."""
        return QuantizedWeight(self.codes, self.scales, self.zeros, self.fmt, self.granularity, self.group_size,
                               (self.out_features, self.in_features))

    @property
    def weight(self) -> torch.Tensor:
        """A dequantized fp32 copy of the weight, for code that inspects ``.weight`` (never cached)."""
        return self.qweight.dequantize()

    def _apply(self, fn, recurse=True):
        # Device moves apply to the packed buffers, dtype casts do not: scales are fp16 by format definition.
        scales = self.scales
        super()._apply(fn, recurse)
        self.scales = scales.to(device=self.codes.device)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = kernels.qmatmul(x, self.qweight)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def extra_repr(self) -> str:
        g = f"g{self.group_size}" if self.granularity == "group" else self.granularity
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.fmt} {g}, " \
               f"bias={self.bias is not None}"
