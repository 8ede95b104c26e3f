"""GPTQ (Frantar et al., 2022; methods.md §3.2): column-by-column rounding with Hessian error feedback."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..calibration import Calibration, LayerStats, run_blockwise
from ..formats import Format
from ..models import find_linears
from ..qtensor import QuantizedWeight, fit_scales
from ..registry import register
from .base import Quantizer, QuantizerConfig


@dataclass(frozen=True)
class GPTQConfig(QuantizerConfig):
    """GPTQ: asymmetric int4, groups of 128, 1% dampening, lazy batches of 128 columns."""

    step = "gptq"
    damp: float = 0.01  # added to diag(H), as a fraction of mean(diag(H))
    block_size: int = 128  # columns per lazy-batch update
    act_order: bool = False  # quantize columns in decreasing diag(H) order (group scales fitted up front)


def gptq_round(w: torch.Tensor, hessian: torch.Tensor, fmt: Format, granularity: str = "group",
               group_size: int = 128, damp: float = 0.01, block_size: int = 128, act_order: bool = False
               ) -> QuantizedWeight:
    """Pure function. ``w (out, in)`` float, ``hessian (in, in)`` = 2·XᵀX/N fp32 -> QuantizedWeight.

    Group scales are fitted on the error-updated columns when the first column of a group is reached; with
    ``act_order`` all group scales are fitted on the original weight first ("static groups"), so the stored
    layout stays in the original column order.
    """
    W = w.detach().clone().float()
    out_f, in_f = W.shape
    g = group_size if granularity == "group" else in_f
    H = hessian.detach().clone().float()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    n_groups = math.ceil(in_f / g)
    rows = 1 if granularity == "tensor" else out_f
    scales = torch.zeros(rows, n_groups)
    zeros = torch.zeros(rows, n_groups) if fmt.has_zero else None
    static = act_order or granularity == "tensor"  # all scales fitted up front, on the original weight
    if static:
        s, z = fit_scales(W, fmt, granularity, g)
        scales.copy_(s)
        if zeros is not None:
            zeros.copy_(z)
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(in_f)
    W, H = W[:, perm], H[perm][:, perm]
    H.diagonal().add_(damp * torch.mean(torch.diag(H)))
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)

    codes = torch.zeros(out_f, in_f, dtype=torch.uint8)
    fitted = None if static else torch.zeros(n_groups, dtype=torch.bool)
    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        Wb = W[:, i1:i2].clone()
        Err = torch.zeros_like(Wb)
        for j in range(i2 - i1):
            col = int(perm[i1 + j])
            grp = col // g
            if fitted is not None and not fitted[grp]:  # first column of a group: fit on the updated weights
                lo = i1 + j
                s, z = fmt.fit(torch.cat([Wb[:, j:], W[:, i2:]], dim=1)[:, : min(g, in_f - lo)])
                scales[:, grp] = s
                if zeros is not None:
                    zeros[:, grp] = z
                fitted[grp] = True
            s = scales[:, grp].unsqueeze(-1)
            z = None if zeros is None else zeros[:, grp].unsqueeze(-1)
            q = fmt.encode(Wb[:, j:j + 1], s, z)
            codes[:, col] = q[:, 0]
            err = (Wb[:, j] - fmt.decode(q, s, z)[:, 0]) / U[i1 + j, i1 + j]
            Wb[:, j + 1:] -= err.unsqueeze(1) * U[i1 + j, i1 + j + 1:i2].unsqueeze(0)
            Err[:, j] = err
        W[:, i2:] -= Err @ U[i1:i2, i2:]
    return QuantizedWeight.from_codes(codes, scales, zeros, fmt, granularity, g)


@register("step", "gptq")
class GPTQ(Quantizer):
    Config = GPTQConfig
    needs = ("hessian",)

    def quantize(self, weight, stats: LayerStats | None = None):
        if stats is None:
            raise ValueError("GPTQ needs calibration statistics (a Hessian per layer)")
        c = self.config
        return gptq_round(weight, stats.hessian, self.fmt, c.granularity, c.group_size, c.damp, c.block_size,
                          c.act_order)

    def apply(self, model, calib=None):
        calib = calib if isinstance(calib, Calibration) else Calibration(windows=calib)
        names = [n for n, _ in find_linears(model, self.config.targets, self.config.ignore)]

        def quantize_block(stats: dict[str, LayerStats]) -> None:
            for name, st in stats.items():
                self.replace(model, name, model.get_submodule(name), st)

        run_blockwise(model, calib.get_windows(), names, quantize_block, desc=f"gptq {self.fmt.name}")
        return model
