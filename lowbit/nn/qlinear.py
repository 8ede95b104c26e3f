"""QLinear: a drop-in ``nn.Linear`` whose weight is a frozen, bit-packed :class:`QuantizedWeight`."""

from __future__ import annotations

import operator

import torch
from torch import nn

from .. import kernels
from ..qtensor import QuantizedWeight


class QLinear(nn.Module):
    """``y = x Wᵀ + b`` with ``W`` stored packed.

    ``W`` is any packed weight (a uniform :class:`QuantizedWeight`, or a registered kind such as LowRA's
    :class:`~lowbit.qmixed.MixedCodebookWeight`). Its tensors are buffers named as the weight names them
    (``codes``, ``scales``, ``zeros`` for uniform weights) so ``state_dict`` and device moves see them; they are
    never cast to another dtype (fp16 scales stay fp16) and have no gradient. Gradients flow to the input.
    Input ``x (..., in_features)`` in any float dtype; output ``(..., out_features)`` in the input's dtype.
    """

    def __init__(self, qweight, bias: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features = qweight.in_features, qweight.out_features
        self.weight_meta = qweight.meta()
        self._weight_cls = type(qweight)
        self.packed_names = tuple(qweight.tensors())
        for name, t in qweight.tensors().items():
            self.register_buffer(name, t)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @property
    def fmt(self) -> str:
        return self.weight_meta["fmt"]

    @property
    def granularity(self) -> str | None:
        """Uniform weights only (None for other kinds)."""
        return self.weight_meta.get("granularity")

    @property
    def group_size(self) -> int | None:
        """Uniform weights only (None for other kinds)."""
        return self.weight_meta.get("group_size")

    @property
    def qweight(self) -> QuantizedWeight:
        """The packed weight, viewing this module's buffers (no copy). The view is rebuilt only when a buffer
        was replaced (device moves, ``load_state_dict(assign=True)``): decode calls this once per layer per token,
        and building and validating the weight object costs more than a small layer's matmul."""
        current = [self._buffers[n] for n in self.packed_names]
        cached = self.__dict__.get("_qweight_cache")
        if cached is None or not all(map(operator.is_, cached[0], current)):
            tensors = dict(zip(self.packed_names, current, strict=True))
            qweight = self._weight_cls.from_tensors(self.weight_meta, tensors)
            cached = self.__dict__["_qweight_cache"] = (current, qweight)
        return cached[1]

    @property
    def weight(self) -> torch.Tensor:
        """A dequantized fp32 copy of the weight, for code that inspects ``.weight`` (never cached)."""
        return self.qweight.dequantize()

    def _apply(self, fn, recurse=True):
        # Device moves apply to the packed buffers, dtype casts do not: their dtypes are part of the format.
        kept = {n: getattr(self, n) for n in self.packed_names}
        super()._apply(fn, recurse)
        device = getattr(self, self.packed_names[0]).device
        for n, t in kept.items():
            setattr(self, n, t.to(device=device))
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = kernels.qmatmul(x, self.qweight)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def extra_repr(self) -> str:
        m = self.weight_meta
        if "granularity" in m:
            desc = f"{m['fmt']} " + (f"g{m['group_size']}" if m["granularity"] == "group" else m["granularity"])
        else:
            desc = f"{m['fmt']} {m.get('kind', '')}".strip()
        return f"in_features={self.in_features}, out_features={self.out_features}, {desc}, " \
               f"bias={self.bias is not None}"
