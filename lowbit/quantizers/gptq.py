"""GPTQ (Frantar et al., 2022; methods.md §3.2): column-by-column rounding with Hessian error feedback."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..calibration import Calibration, LayerStats, block_inputs, for_each_block
from ..errors import LowbitError
from ..formats import Format
from ..formats.int import IntFormat
from ..kernels.cpu import extension
from ..kernels.scales import fit_searched
from ..qtensor import QuantizedWeight, fit_scales
from ..registry import register
from .base import Quantizer, QuantizerConfig, install, select_targets


@dataclass(frozen=True)
class GPTQConfig(QuantizerConfig):
    """GPTQ: asymmetric int4, groups of 128, 1% dampening, lazy batches of 128 columns, act-order, searched clipping."""

    step = "gptq"
    damp: float = 0.01  # added to diag(H), as a fraction of mean(diag(H))
    block_size: int = 128  # columns per lazy-batch update
    scale_search: str = "mse"  # group clipping chosen by diag(H)-weighted error (measured: 24.58 vs 29.75 at w4g128)
    act_order: bool = True  # quantize columns in decreasing diag(H) order (group scales fitted up front)
    static_groups: bool = False  # fit every group's scale on the original weight before the loop


def inverse_hessian_factor(hessian: torch.Tensor, damp: float, overwrite: bool = False) -> torch.Tensor:
    """Upper Cholesky factor ``U`` of ``(H + λI)⁻¹`` (``λ = damp · mean(diag H)``), so ``(H + λI)⁻¹ = UᵀU``.

    ``overwrite=True`` computes it in ``hessian``'s own storage (the same values, no second ``in × in`` matrix:
    256 MiB for a 8192-wide input)."""
    H = hessian if overwrite else hessian.clone()
    H.diagonal().add_(damp * torch.mean(torch.diag(H)))
    torch.linalg.cholesky(H, out=H)
    torch.cholesky_inverse(H, out=H)
    return torch.linalg.cholesky(H, upper=True, out=H)


def error_feedback(W: torch.Tensor, U: torch.Tensor, quantize_column: Callable, block_size: int = 128) -> None:
    """GPTQ's column loop: quantize ``W (out, in)`` column by column (in place, in its current column order),
    pushing each column's rounding error onto the columns not yet quantized, with lazy batches of
    ``block_size`` columns.

    ``quantize_column(i, col, ahead)`` gets the position ``i``, the current (error-updated) column ``(out,)``
    and ``ahead(width)``, the current columns ``i .. i+width``; it returns the dequantized column.
    """
    in_f = W.shape[1]
    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        Wb = W[:, i1:i2].clone()
        Err = torch.zeros_like(Wb)
        for j in range(i2 - i1):
            def ahead(width, j=j, Wb=Wb, i2=i2):
                return torch.cat([Wb[:, j:], W[:, i2:]], dim=1)[:, :width]

            deq = quantize_column(i1 + j, Wb[:, j], ahead)
            err = (Wb[:, j] - deq) / U[i1 + j, i1 + j]
            Wb[:, j + 1:] -= err.unsqueeze(1) * U[i1 + j, i1 + j + 1:i2].unsqueeze(0)
            Err[:, j] = err
        W[:, i2:] -= Err @ U[i1:i2, i2:]


def error_feedback_fixed(W: torch.Tensor, U: torch.Tensor, col_scale: torch.Tensor, col_zero: torch.Tensor,
                         qmax: int, block_size: int = 128) -> torch.Tensor:
    """:func:`error_feedback` for an integer grid whose scales are fixed before the loop (act-order, static
    groups), in C++ (``kernels/csrc/gptq.cpp``: rows in parallel, each block's column loop without Python).
    ``col_scale``/``col_zero (out, in)``: each column's scale and zero point (the offset for symmetric grids) in
    ``W``'s column order. Returns the codes ``(out, in)`` uint8 in that order; ``W`` is updated as there."""
    ext = extension()
    out_f, in_f = W.shape
    codes = torch.empty(out_f, in_f, dtype=torch.uint8)
    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        Wb, Err = W[:, i1:i2].contiguous(), torch.empty(out_f, i2 - i1)
        block_codes = torch.empty(out_f, i2 - i1, dtype=torch.uint8)
        ext.gptq_block(Wb, U[i1:i2, i1:i2].contiguous(), col_scale[:, i1:i2].contiguous(),
                       col_zero[:, i1:i2].contiguous(), qmax, block_codes, Err)
        codes[:, i1:i2] = block_codes
        W[:, i2:] -= Err @ U[i1:i2, i2:]
    return codes


def prepare_hessian(w: torch.Tensor, hessian: torch.Tensor, own: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 copies of ``w`` and ``H`` with dead inputs (``diag H == 0``) zeroed in ``w`` and set to 1 in ``H``
    (``own=True``: ``H`` is changed in place, for a caller that no longer needs it: one ``in × in`` matrix fewer)."""
    W = w.detach().clone().float()
    H = hessian.detach().float() if own else hessian.detach().clone().float()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    return W, H


def gptq_round(w: torch.Tensor, hessian: torch.Tensor, fmt: Format, granularity: str = "group",
               group_size: int = 128, damp: float = 0.01, block_size: int = 128, act_order: bool = False,
               search: str = "minmax", static_groups: bool = False, own_hessian: bool = False,
               scale_steps: int = 0) -> QuantizedWeight:
    """Pure function. ``w (out, in)`` float, ``hessian (in, in)`` = 2·XᵀX/N fp32 -> QuantizedWeight.

    Group scales are fitted on the error-updated columns when the first column of a group is reached; with
    ``act_order`` (or ``static_groups``) all group scales are fitted on the original weight first, so the stored
    layout stays in the original column order. ``search="mse"`` picks each group's clipping range by the error
    weighted with the Hessian diagonal of its columns (:func:`lowbit.formats.fit_searched`). ``own_hessian``: the
    caller hands ``hessian`` over (it is overwritten). ``scale_steps > 0``: K-quant super-block scales
    (:func:`lowbit.qtensor.superblock_scales`), fitted up front since a super-block spans several groups.
    """
    W, H = prepare_hessian(w, hessian, own=own_hessian)
    out_f, in_f = W.shape
    g = group_size if granularity == "group" else in_f
    n_groups = math.ceil(in_f / g)
    rows = 1 if granularity == "tensor" else out_f
    scales = torch.zeros(rows, n_groups)
    zeros = torch.zeros(rows, n_groups) if fmt.has_zero else None
    col_weight = torch.diag(H)
    static = static_groups or act_order or granularity == "tensor" or scale_steps > 0  # fitted up front on w
    if static:
        s, z = fit_scales(W, fmt, granularity, g, search, col_weight, scale_steps, fit=fit_searched)
        scales.copy_(s)
        if zeros is not None:
            zeros.copy_(z)
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(in_f)
    W = W[:, perm]
    H = H[perm]  # one step at a time: at most two in × in matrices alive
    H = H[:, perm]
    codes = torch.zeros(out_f, in_f, dtype=torch.uint8)
    fitted = torch.full((n_groups,), static)

    def quantize_column(i, column, ahead):
        col = int(perm[i])
        grp = col // g
        if not fitted[grp]:  # first column of a group (columns in order): fit on the updated weights
            width = min(g, in_f - i)
            s, z = fit_searched(fmt, ahead(width).unsqueeze(1), search, col_weight[i:i + width].unsqueeze(0))
            s, z = s[:, 0], None if z is None else z[:, 0]  # (one group of each row)
            scales[:, grp] = s
            if zeros is not None:
                zeros[:, grp] = z
            fitted[grp] = True
        s = scales[:, grp].unsqueeze(-1)
        z = None if zeros is None else zeros[:, grp].unsqueeze(-1)
        q = fmt.encode(column.unsqueeze(1), s, z)
        codes[:, col] = q[:, 0]
        return fmt.decode(q, s, z)[:, 0]

    U = inverse_hessian_factor(H, damp, overwrite=True)  # H is a permuted copy of its own
    del H
    if static and isinstance(fmt, IntFormat) and W.device.type == "cpu" and extension() is not None:
        cols = perm // g  # each column's group (the one group of a tensor/channel grid)
        zero = zeros if zeros is not None else torch.full_like(scales, float(fmt.offset))
        codes[:, perm] = error_feedback_fixed(W, U, scales[:, cols].expand(out_f, -1), zero[:, cols].expand(out_f, -1),
                                              fmt.qmax, block_size)
    else:
        error_feedback(W, U, quantize_column, block_size)
    return QuantizedWeight.from_codes(codes, scales, zeros, fmt, granularity, g)


@register("step", "gptq")
class GPTQ(Quantizer):
    Config = GPTQConfig
    needs = ("hessian",)
    needs_calibration = True
    follows_precision = True

    def quantize(self, weight, stats: LayerStats | None = None, own: bool = False):
        """``own``: the statistics are used by no other layer and may be overwritten."""
        if stats is None:
            raise LowbitError("GPTQ needs calibration statistics (a Hessian per layer): run it through a recipe with "
                              "calib=lowbit.Calibration(tokenizer=tok)")
        c = self.config
        return gptq_round(weight, stats.hessian, self.fmt, c.granularity, c.group_size, c.damp, c.block_size,
                          c.act_order, c.scale_search, c.static_groups, own_hessian=own, scale_steps=c.scale_steps)

    def apply(self, model, calib=None):
        calib = calib if isinstance(calib, Calibration) else Calibration(windows=calib)
        select_targets(model, self.config.targets, self.config.ignore)  # the whole selection checked up front
        windows = calib.get_windows(model)
        for_each_block(model, block_inputs(model, windows),
                       lambda prefix, collect: self.apply_block(model, prefix, collect), desc=f"gptq {self.fmt.name}",
                       device=calib.device, precision=calib.precision)
        return model

    def apply_block(self, model, prefix, collect) -> None:
        targets = select_targets(model, self.config.targets, self.config.ignore,
                                 within=lambda name: name.startswith(prefix))
        if not targets:  # a block with no targets needs only the pass that feeds the next block
            return
        stats = collect([t.name for t in targets])
        targets.reverse()
        while targets:  # each float layer and its statistics let go as soon as it is packed: memory stays low
            target = targets.pop()
            st = stats.pop(target.name)
            last = not any(other is st for other in stats.values())  # q/k/v share one
            install(model, target, self.quantize(target.weight(), st, own=last))
            del target, st

    def apply_rest(self, model, calib=None) -> None:
        return None  # GPTQ calibrates Linears inside decoder blocks only (as apply does)

    def outside_blocks(self, model) -> bool:
        return False
