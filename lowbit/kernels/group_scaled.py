"""Packed matmul with a trainable multiplier on every quantization group's scale (RILQ's ``scales="group"``).

The weight is ``W = g ⊙ Q(W)``: ``g (out, groups)`` multiplies each group's dequantized values, which is the
same as training the packed fp16 scales themselves (``(q - z) · s · g = (q - z) · (s g)``), so a checkpoint
stores ``g`` folded in and costs no extra bits. The backward gives ``x`` its gradient and ``g`` the group sums of
``dW ⊙ Q(W)`` with ``dW = dyᵀ x``: one more GEMM (in the gradient's dtype: bf16 under autocast) per layer.
Nothing float is saved between forward and backward: the backward dequantizes again, as ``qmatmul``'s does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..qtensor import PackedWeight


def expand_groups(g: torch.Tensor, group_size: int, in_features: int) -> torch.Tensor:
    """``(out, groups)`` -> ``(out, in)``: each group's multiplier repeated over its columns."""
    return g.repeat_interleave(group_size, dim=1)[:, :in_features]


def _group_sums(t: torch.Tensor, group_size: int, groups: int) -> torch.Tensor:
    """``(out, in)`` -> ``(out, groups)``: sums over each group's columns (the last group zero-padded)."""
    out, in_f = t.shape
    return F.pad(t, (0, groups * group_size - in_f)).view(out, groups, group_size).sum(-1)


def group_scaled_weight(qweight: PackedWeight, g: torch.Tensor) -> torch.Tensor:
    """The effective fp32 weight ``(out, in)`` = ``g ⊙ Q(W)`` (the reference the op is tested against)."""
    return qweight.dequantize() * expand_groups(g.float(), qweight.scale_layout[1], qweight.in_features)


class _GroupScaledQMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, g, qweight, dtype):
        ctx.qweight, ctx.x_dtype = qweight, x.dtype
        ctx.save_for_backward(x, g)
        with torch.no_grad():
            w = group_scaled_weight(qweight, g).to(dtype)
            y = F.linear(x.to(dtype), w)
        return y if dtype != torch.float32 else y.to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        x, g = ctx.saved_tensors
        qw = ctx.qweight
        w0 = qw.dequantize()
        dx = dg = None
        if ctx.needs_input_grad[0]:
            w = (w0 * expand_groups(g.float(), qw.scale_layout[1], qw.in_features)).to(dy.dtype)
            dx = (dy @ w).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            dw = dy.reshape(-1, dy.shape[-1]).T @ x.reshape(-1, x.shape[-1]).to(dy.dtype)  # (out, in)
            dg = _group_sums(dw.float() * w0, qw.scale_layout[1], g.shape[1]).to(g.dtype)
        return dx, dg, None, None


def qmatmul_group_scaled(x: torch.Tensor, qweight: PackedWeight, g: torch.Tensor,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``x (..., in)`` -> ``(..., out)`` = ``x (g ⊙ Q(W))ᵀ``, multiplied in ``dtype`` (bf16 under autocast);
    differentiable in ``x`` and ``g (out, groups)``. ``qweight`` must have row-wise scales
    (:attr:`~lowbit.qtensor.PackedWeight.scale_layout`: uniform group- or channel-wise, LowRA's block absmax),
    ``g`` one multiplier per row and scale group, original row order."""
    layout = qweight.scale_layout
    expect = None if layout is None else (qweight.out_features, qweight.scale_groups)
    if tuple(g.shape) != expect:
        raise ValueError(f"group scales {tuple(g.shape)} must match the packed row-wise scales {expect}")
    return _GroupScaledQMatmul.apply(x, g, qweight, dtype)
