"""The ``"mse"`` scale search of integer grids on CPU (``csrc/scales.cpp``): :func:`lowbit.formats.fit_searched`'s
choice, one pass per group in C++ instead of ~12 tensor passes per shrink factor in torch (GPTQ w4g128 of SmolLM2:
7.0 s of its scale fits before). The operations are the Python's, in its order, except each group's error sum, so a
group's choice can differ only where two shrink factors' errors tie within fp32 rounding.
"""

from __future__ import annotations

import torch

from ..formats import fit_searched as fit_searched_reference
from ..formats.base import CLIP_GRID
from ..formats.int import IntFormat
from .cpu import extension


def fit_searched(fmt, w: torch.Tensor, search: str = "minmax", weight: torch.Tensor | None = None,
                 grid: tuple[float, ...] = CLIP_GRID) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`lowbit.formats.fit_searched` (same arguments and result) through the C++ search where it applies:
    ``search="mse"`` over an integer grid, ``w (rows, groups, g)`` on the CPU, ``weight`` None or ``(groups, g)``."""
    applies = (search == "mse" and isinstance(fmt, IntFormat) and w.dim() == 3 and w.device.type == "cpu"
               and w.numel() > 0
               and (weight is None or (weight.shape == w.shape[1:] and weight.device.type == "cpu"))
               and (ext := extension()) is not None and ext.mse_scales_applies())  # built only when it would run
    if not applies:
        return fit_searched_reference(fmt, w, search, weight, grid)
    cw = torch.empty(0) if weight is None else weight.float().contiguous()
    s, z = ext.int_mse_scales(w.float().contiguous(), cw, fmt.bits, fmt.symmetric, list(grid))
    return s, None if fmt.symmetric else z
