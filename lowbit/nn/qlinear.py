"""QLinear: a drop-in ``nn.Linear`` whose weight is a frozen, bit-packed :class:`QuantizedWeight`."""

from __future__ import annotations

import torch
from torch import nn

from .. import kernels
from .packed import PackedModule


class QLinear(PackedModule):
    """``y = x Wᵀ + b`` with ``W`` stored packed.

    ``W`` is any packed weight (a uniform :class:`~lowbit.qtensor.QuantizedWeight`, or a registered kind such as
    LowRA's :class:`~lowbit.qmixed.MixedCodebookWeight`), held as buffers (:class:`PackedModule`) with no
    gradient. Gradients flow to the input. Input ``x (..., in_features)`` in any float dtype; output
    ``(..., out_features)`` in the input's dtype.

    Adapters (:mod:`lowbit.adapters`) live in ``self.adapters`` (created when the first is attached) and act in
    the fixed order of methods.md §8.4.

    ``role`` is ``"linear"`` for the layers a quantizer replaced and ``"head"`` for an output head quantized by
    the ``embeddings`` step (kept apart in bits-per-weight accounting; it may share its buffers with the
    input embedding).
    """

    def __init__(self, qweight, bias: torch.Tensor | None = None, role: str = "linear"):
        super().__init__()
        self.in_features, self.out_features = qweight.in_features, qweight.out_features
        self.role = role
        self._register_packed(qweight)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @property
    def granularity(self) -> str | None:
        """Uniform weights only (None for other kinds)."""
        return self.weight_meta.get("granularity")

    @property
    def group_size(self) -> int | None:
        """Uniform weights only (None for other kinds)."""
        return self.weight_meta.get("group_size")

    @property
    def weight(self) -> torch.Tensor:
        """A dequantized fp32 copy of the weight, for code that inspects ``.weight`` (never cached)."""
        return self.qweight.dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        adapters = self._modules.get("adapters")
        if not adapters:
            y = kernels.qmatmul(x, self.qweight)
        else:  # methods.md §8.4: input-side transform, base + additive updates, output-side transform
            x = next((a(x) for a in adapters.values() if a.place == "input"), x)
            y = kernels.qmatmul(x, self.qweight)
            for a in adapters.values():
                if a.place == "add":
                    y = y + a(x).to(y.dtype)
            y = next((a(y) for a in adapters.values() if a.place == "output"), y)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def merged_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The effective float weight ``(out, in)``: ``T_out (Q(W) + sum dW) T_in`` of the attached adapters
        (just the dequantized weight without adapters). Exact up to fp32 rounding; never cached."""
        with torch.no_grad():
            w = self.qweight.dequantize()
            adapters = list((self._modules.get("adapters") or {}).values())
            for place in ("add", "input", "output"):
                for a in adapters:
                    if a.place == place:
                        w = a.merge(w)
        return w.to(dtype)

    def extra_repr(self) -> str:
        role = "" if self.role == "linear" else f", role={self.role}"
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.layout()}, " \
               f"bias={self.bias is not None}{role}"
