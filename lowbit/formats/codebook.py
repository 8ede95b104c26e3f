"""Codebook formats: a fixed table of levels, scaled per group by ``absmax / max|level|`` (methods.md §2.2-2.3).

* ``nf2``/``nf3``/``nf4``: normal-float quantiles (QLoRA / LoftQ ``create_normal_map``), built from the normal
  quantile function in code; nf4 equals the bitsandbytes table.
* ``fp4_e2m1``: OCP FP4, codes in the E2M1 bit order (sign bit 3, magnitudes {0, .5, 1, 1.5, 2, 3, 4, 6}).
* ``fp8_e4m3``: OCP FP8 E4M3 (max 448), codes are the float8 bytes themselves.
* ``iq4_nl``: llama.cpp's IQ4_NL grid, 16 fixed non-uniform integer levels (ggml's ``kvalues_iq4nl``); with
  groups of 32 its scale is the GGUF block's ``d`` (``w = d · level``), so it exports to GGUF exactly.

Encoding picks the nearest level (thresholds are the midpoints of the sorted levels).
"""

from __future__ import annotations

import torch

from ..errors import LowbitError
from .base import Format, as_storage_scale, register

NF_OFFSET = 0.9677083  # 1 - (1/30 + 1/32) / 2, the QLoRA quantile offset


def normal_float_levels(bits: int) -> torch.Tensor:
    """Asymmetric NF-b levels in [-1, 1] with an exact zero: 2^(b-1) positive, 2^(b-1) - 1 negative quantiles."""
    half = 2 ** (bits - 1)
    pos = torch.special.ndtri(torch.linspace(NF_OFFSET, 0.5, half + 1, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(NF_OFFSET, 0.5, half, dtype=torch.float64)[:-1])
    levels = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    return (levels / levels.max()).float()


def fp4_e2m1_levels() -> torch.Tensor:
    """The 16 E2M1 values in code order: codes 0-7 positive, 8-15 the same magnitudes negated."""
    mags = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    return torch.cat([mags, -mags])


def fp8_e4m3_levels() -> torch.Tensor:
    """The 256 E4M3 values in byte order; the two NaN bytes map to 0 and are never produced by encoding."""
    v = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    return torch.nan_to_num(v, nan=0.0)


IQ4_NL_LEVELS = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)  # ggml-common.h


def iq4_nl_levels() -> torch.Tensor:
    """IQ4_NL's levels in code order (code i is ggml's 4-bit index i)."""
    return torch.tensor(IQ4_NL_LEVELS, dtype=torch.float32)


class CodebookFormat(Format):
    """Nearest-level quantization to a fixed table ``levels`` (code i decodes to ``s * levels[i]``)."""

    has_zero = False

    def __init__(self, name: str, bits: int, levels: torch.Tensor):
        if levels.numel() > 2**bits:
            raise LowbitError(f"format {name} has {levels.numel()} levels, more than {bits} bits can index")
        self.name, self.bits, self.levels = name, bits, levels.float()
        self.max_level = float(self.levels.abs().max())
        # Sorted distinct levels and, for each, its first code: duplicates such as -0 are never emitted.
        uniq, inverse = torch.unique(self.levels, sorted=True, return_inverse=True)
        first_code = torch.full((uniq.numel(),), len(levels), dtype=torch.long)
        first_code.scatter_reduce_(0, inverse, torch.arange(len(levels)), reduce="amin")
        self._sorted = uniq
        self._sorted_codes = first_code.to(torch.uint8)
        self._thresholds = (uniq[1:] + uniq[:-1]) / 2

    def fit(self, w):
        absmax = w.float().abs().amax(-1)
        # An all-zero group: scale 1 where a level is 0; else (IQ4_NL) the smallest scale, so it decodes to ~0
        empty = 1.0 if bool((self.levels == 0).any()) else torch.finfo(torch.float16).tiny
        s = torch.where(absmax > 0, absmax / self.max_level, torch.full_like(absmax, empty))
        return as_storage_scale(s), None

    def encode(self, w, s, z=None):
        u = (w.float() / s).contiguous()
        idx = torch.bucketize(u, self._thresholds.to(u.device))
        return self._sorted_codes.to(u.device)[idx]

    def decode(self, codes, s, z=None):
        return self.levels.to(device=codes.device, dtype=s.dtype)[codes.long()] * s


@register("format", "nf")
def nf_format(bits: int, symmetric: bool = False) -> CodebookFormat:
    if bits not in (2, 3, 4):
        raise LowbitError(f"nf formats exist for 2, 3 and 4 bits, got {bits}; use int{bits} instead")
    return CodebookFormat(f"nf{bits}", bits, normal_float_levels(bits))


nf_format.parse = lambda name: nf_format(int(name[2])) if name in ("nf2", "nf3", "nf4") else None


def _fixed_width(family: str, bits: int, name: str, kind: str, levels):
    """Register a format that exists at one width only (``fp4`` = E2M1, ``fp8`` = E4M3), as ``family``."""

    def make(bits: int = bits, symmetric: bool = True) -> CodebookFormat:
        if bits != make.width:
            raise LowbitError(f"{family} ({kind}) is a {make.width}-bit format, got bits={bits}; use bits={make.width}")
        return CodebookFormat(name, make.width, levels())

    make.width = bits
    make.parse = lambda text: make() if text == name else None
    return register("format", family)(make)


fp4_format = _fixed_width("fp4", 4, "fp4_e2m1", "E2M1", fp4_e2m1_levels)
fp8_format = _fixed_width("fp8", 8, "fp8_e4m3", "E4M3", fp8_e4m3_levels)
iq4_nl_format = _fixed_width("iq4_nl", 4, "iq4_nl", "IQ4_NL", iq4_nl_levels)
