"""A packed uniform-integer Linear made trainable: latent codes, rounding offsets passed straight through, and
group-scale multipliers (what block-wise reconstruction and quantization-aware training train; issue 23).

``Ŵ (out, in) = (clamp(round(q̃ + v), 0, qmax) − z) · s·m``: ``q̃`` the packed codes (optionally moved within their
cells towards the float weight), ``v`` trainable offsets in grid steps, ``s`` the packed group scales and ``m``
their trainable multipliers. :meth:`RelaxedLinear.packed` packs the trained layer again in the start's format.
Memory: the codes, offsets, their gradient and Adam's two moments are 5 fp32 copies of the weight while the
offsets train (one, plus the centred codes, when only the scales do).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LowbitError
from ..formats.int import IntFormat
from ..kernels.group_scaled import expand_groups
from ..qtensor import QuantizedWeight
from .input_transform import rotate_input, split_input
from .qlinear import QLinear, carried_parts, packed_linear

CELL = 0.49  # the latent code stays this far from its code's cell edge (so it still rounds to the code)


class RelaxedLinear(nn.Module):
    """A packed uniform-integer Linear made trainable (see the module docstring): ``y = x Ŵᵀ + b`` with
    ``Ŵ (out, in) = (clamp(round(codes + offset), 0, qmax) − z) · scales · multiplier``, the rounding passed
    straight through in the backward. ``codes (out, in)`` are the packed codes, moved within their cells towards
    ``float_weight (out, in)`` when it is given (the weight before packing); ``offset`` (grid steps) and
    ``multiplier (rows, groups)`` are fp32 Parameters starting at 0 and 1, so the module starts equal to the
    packed layer."""

    def __init__(self, layer: QLinear, float_weight: torch.Tensor | None = None):
        super().__init__()
        qw = layer.qweight
        if not isinstance(qw, QuantizedWeight) or not isinstance(qw.format, IntFormat):
            raise LowbitError(f"training packed codes and scales needs uniform integer weights, got {layer.layout()}"
                              "; use an int format (gptq or rtn with format int)")
        if layer.group_scale is not None or layer.channel_scale is not None:
            raise LowbitError("this layer's scales carry trained multipliers not folded into its packed scales; "
                              "save and load the model (which folds them) before training its codes")
        if layer._modules.get("adapters"):
            raise LowbitError("packed codes and scales are trained before any adapter is attached; put blockwise "
                              "(or rilq with codes) before the steps that attach adapters (loftq, rilq with a rank)")
        self.fmt, self.granularity, self.group_size = qw.format, qw.granularity, qw.group_size
        self.in_features, self.out_features = qw.in_features, qw.out_features
        codes = qw.unpacked_codes().float()
        self.register_buffer("scales", qw.scales.float())
        zero = torch.full_like(self.scales, float(self.fmt.offset)) if qw.zeros is None else qw.zeros.float()
        self.register_buffer("zeros", zero)
        if float_weight is not None:  # where the float weight lies in its code's cell: near a boundary, a small
            # offset flips the code (the codes themselves are integers, half a step from any boundary)
            g = self.group_size
            position = float_weight.float() / expand_groups(self.scales, g, self.in_features) + \
                expand_groups(self.zeros, g, self.in_features)
            codes = codes + (position - codes).clamp(-CELL, CELL)
        self.register_buffer("codes", codes)
        self.offset = nn.Parameter(torch.zeros_like(self.codes))
        self.multiplier = nn.Parameter(torch.ones_like(self.scales))
        self.bias, self.spec, self.outlier = layer.bias, layer.spec, layer.outlier  # carried as they are
        self.carried = carried_parts(layer)

    def rounded_codes(self) -> torch.Tensor:
        """``(out, in)`` fp32 integer codes ``clamp(round(q + offset), 0, qmax)``, straight-through."""
        q = self.codes + self.offset
        return (q + (torch.round(q) - q).detach()).clamp(0, self.fmt.qmax)

    def centered_codes(self) -> torch.Tensor:
        """``(out, in)`` fp32 ``rounded codes − zero point``. While the offsets are not trained (the scale-only
        default) it is computed once and kept until they change (their storage or version counter)."""
        if self.offset.requires_grad:
            return self.rounded_codes() - expand_groups(self.zeros, self.group_size, self.in_features)
        key = (self.offset.data_ptr(), self.offset._version, self.codes.data_ptr())
        cached = self.__dict__.get("_centered")
        if cached is None or cached[0] != key:
            with torch.no_grad():
                centered = self.rounded_codes() - expand_groups(self.zeros, self.group_size, self.in_features)
            cached = self.__dict__["_centered"] = (key, centered)
        return cached[1]

    def weight(self) -> torch.Tensor:
        """``(out, in)`` fp32: the weight the packed layer would hold now."""
        return self.centered_codes() * expand_groups(self.scales * self.multiplier, self.group_size, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """As :meth:`QLinear.forward <lowbit.nn.qlinear.QLinear.forward>`: the input transform (online Hadamard,
        QUAD's float outlier columns, activation quantization) if any, then the relaxed weight."""
        x_out = None
        if self.spec is not None:
            x_out, x = split_input(rotate_input(x, self.spec), self.spec)
        y = F.linear(x, self.weight().to(x.dtype))
        if x_out is not None:
            y = y + F.linear(x_out, self.outlier.to(x_out.dtype)).to(y.dtype)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    @torch.no_grad()
    def packed(self) -> QLinear:
        """The trained layer packed again (codes, fp16 scales ``s·m``, the same zero points and layout)."""
        codes = self.rounded_codes().to(torch.uint8)
        zeros = None if self.fmt.symmetric else self.zeros
        qw = QuantizedWeight.from_codes(codes, self.scales * self.multiplier, zeros, self.fmt, self.granularity,
                                        self.group_size)
        return packed_linear(qw, **self.carried)
