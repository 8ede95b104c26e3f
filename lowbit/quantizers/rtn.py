"""Round-to-nearest (methods.md §3.1): per-group scales from min/max (or absmax), no data."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..formats import Format
from ..kernels.scales import fit_searched
from ..qtensor import QuantizedWeight, fit_scales, padded_groups
from ..registry import register
from .base import Quantizer, QuantizerConfig


@dataclass(frozen=True)
class RTNConfig(QuantizerConfig):
    """Round-to-nearest: asymmetric int4 with groups of 128 input columns unless told otherwise."""

    step = "rtn"


def rtn_quantize(w: torch.Tensor, fmt: Format, granularity: str = "group", group_size: int = 128,
                 search: str = "minmax", scale_steps: int = 0) -> QuantizedWeight:
    """Pure function. ``w (out, in)`` float -> QuantizedWeight with scales fitted per group (min/max, or the
    least-error clipped range with ``search="mse"``; K-quant super-block scales with ``scale_steps``) and
    nearest codes."""
    w = w.float()
    out_f, in_f = w.shape
    g = group_size if granularity == "group" else in_f
    s, z = fit_scales(w, fmt, granularity, g, search, scale_steps=scale_steps, fit=fit_searched)  # (rows, groups)
    grouped = padded_groups(w, g)  # (out, groups, g)
    codes = fmt.encode(grouped, s.unsqueeze(-1), None if z is None else z.unsqueeze(-1))
    codes = codes.reshape(out_f, -1)[:, :in_f]
    return QuantizedWeight.from_codes(codes, s, z, fmt, granularity, g)


@register("step", "rtn")
class RTN(Quantizer):
    Config = RTNConfig

    def quantize(self, weight, stats=None):
        c = self.config
        return rtn_quantize(weight, self.fmt, c.granularity, c.group_size, c.scale_search, c.scale_steps)
