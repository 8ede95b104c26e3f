"""Uniform integer formats (methods.md §2.1).

* asymmetric (affine): ``s = (max - min) / (2^b - 1)`` with the range widened to include 0,
  integer zero point ``z = clamp(round(-min / s), 0, 2^b - 1)``, ``q = clamp(round(w / s) + z, 0, 2^b - 1)``,
  ``w_hat = s (q - z)``. This is GPTQ's RTN convention; the zero point is stored as one byte per group.
* symmetric: ``s = max|w| / (2^(b-1) - 1)``, ``q = clamp(round(w / s), -2^(b-1), 2^(b-1) - 1)``, stored as the
  unsigned code ``q + 2^(b-1)``; no zero point is stored. Needs b >= 2 (1-bit symmetric has no levels).
"""

from __future__ import annotations

import re

import torch

from ..errors import LowbitError
from .base import Format, as_storage_scale, register


class IntFormat(Format):
    """b-bit integer grid, asymmetric (scale + integer zero) or symmetric (scale only)."""

    def __init__(self, bits: int, symmetric: bool = False):
        if symmetric and bits < 2:
            raise LowbitError("symmetric integers need at least 2 bits; use symmetric=False or the nf/fp formats")
        self.bits = bits
        self.symmetric = symmetric
        self.has_zero = not symmetric
        self.name = f"int{bits}_sym" if symmetric else f"int{bits}"
        self.qmax = (1 << bits) - 1  # largest unsigned code
        self.offset = 1 << (bits - 1)  # symmetric codes are q + offset

    @staticmethod
    def parse(name: str) -> IntFormat | None:
        m = re.fullmatch(r"int([1-8])(_sym)?", name)
        return IntFormat(int(m.group(1)), bool(m.group(2))) if m else None

    def fit(self, w):
        w = w.float()
        if self.symmetric:
            s = as_storage_scale(w.abs().amax(-1) / (self.offset - 1))
            return s, None
        lo = w.amin(-1).clamp(max=0)
        hi = w.amax(-1).clamp(min=0)
        span = hi - lo
        s = as_storage_scale(torch.where(span > 0, span / self.qmax, torch.ones_like(span)))
        z = torch.clamp(torch.round(-lo / s), 0, self.qmax)
        return s, z

    def encode(self, w, s, z):
        if self.symmetric:
            q = torch.clamp(torch.round(w.float() / s), -self.offset, self.offset - 1) + self.offset
        else:
            q = torch.clamp(torch.round(w.float() / s) + z, 0, self.qmax)
        return q.to(torch.uint8)

    def decode(self, codes, s, z):
        zero = self.offset if self.symmetric else z
        return (codes.to(s.dtype) - zero) * s


@register("format", "int")
def int_format(bits: int, symmetric: bool = False) -> IntFormat:
    return IntFormat(bits, symmetric)


int_format.parse = IntFormat.parse
