"""The value grid of a number format: how a group of weights is scaled, encoded to codes and decoded.

A format works elementwise on weights ``w`` with a scale ``s`` (and for asymmetric integers a zero point ``z``)
that broadcast against ``w``. Codes are unsigned ``uint8`` values below ``2**bits``; :mod:`.packing` stores them.
Scales are rounded (up) to fp16 before encoding because that is how they are stored, so encode/decode agree with
what a checkpoint holds.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod

import torch

from ..errors import LowbitError
from ..registry import get, known, register


class Format(ABC):
    """One number format at one bit width. Subclasses are small and stateless."""

    name: str  # canonical name stored in manifests, e.g. "int4", "int3_sym", "nf4", "fp4_e2m1"
    bits: int  # code width in bits
    has_zero: bool  # True when a per-group zero point is stored beside the scale

    @abstractmethod
    def fit(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Scale (and zero) for groups laid along the last dim: ``w (..., g)`` -> ``s (...)``, ``z (...)|None``.

        ``s`` is fp32 holding fp16-representable values; ``z`` is fp32 holding integers (or None).
        """

    @abstractmethod
    def encode(self, w: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
        """Codes (uint8, same shape as ``w``) for weights ``w`` with broadcastable scale/zero."""

    @abstractmethod
    def decode(self, codes: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
        """Weights (dtype of ``s``) from codes with broadcastable scale/zero."""

    def __repr__(self) -> str:
        return f"Format({self.name})"


def as_storage_scale(s: torch.Tensor) -> torch.Tensor:
    """Round a positive fp32 scale *up* to the next value fp16 storage holds (finite, non-zero).

    Rounding up keeps the group's extreme weights inside the grid; round-to-nearest can shrink the scale and
    clip them, which costs SmolLM2 0.11% perplexity at 8 bits (measured) instead of 0.00%.
    """
    s = s.clamp(min=torch.finfo(torch.float16).tiny, max=torch.finfo(torch.float16).max)
    h = s.to(torch.float16)
    h = torch.where(h.float() < s, torch.nextafter(h, torch.full_like(h, float("inf"))), h)
    return h.to(torch.float32)


SCALE_SEARCHES = ("minmax", "mse")
CLIP_GRID = tuple(1.0 - 0.01 * i for i in range(31))  # shrink factors tried by the "mse" scale search


def fit_searched(fmt: Format, w: torch.Tensor, search: str = "minmax", weight: torch.Tensor | None = None,
                 grid: tuple[float, ...] = CLIP_GRID) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (and zero) for groups along the last dim of ``w (..., g)``, like :meth:`Format.fit`.

    ``search="minmax"`` is the plain fit. ``"mse"`` also tries clipping the group's range to ``p·[min, max]``
    for each shrink factor ``p`` in ``grid`` and keeps, per group, the scale with the least squared error
    ``Σ weight·(w − ŵ)²`` (``weight`` broadcasts against ``w``, e.g. the Hessian diagonal of the group's
    columns; None = unweighted). Works for every format because every fit reads the group's range.
    """
    if search not in SCALE_SEARCHES:
        raise LowbitError(f"scale search must be one of {', '.join(SCALE_SEARCHES)}, got {search!r}")
    w = w.float()
    best_s, best_z = fmt.fit(w)
    if search == "minmax":
        return best_s, best_z
    lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)

    def error(s, z):
        zz = None if z is None else z.unsqueeze(-1)
        d = fmt.decode(fmt.encode(w, s.unsqueeze(-1), zz), s.unsqueeze(-1), zz) - w
        d = d * d
        return (d if weight is None else d * weight).sum(-1)

    best = error(best_s, best_z)
    for p in grid:
        if p >= 1.0:
            continue
        s, z = fmt.fit(torch.minimum(torch.maximum(w, lo * p), hi * p))
        e = error(s, z)
        better = e < best
        best = torch.where(better, e, best)
        best_s = torch.where(better, s, best_s)
        if best_z is not None:
            best_z = torch.where(better, z, best_z)
    return best_s, best_z


def format_family_names() -> list[str]:
    """Families a user can name in a recipe (``int``, ``nf``, ``fp4``, ``fp8``)."""
    return known("format")


def get_format(family: str, bits: int, symmetric: bool = False) -> Format:
    """The :class:`Format` of ``family`` at ``bits``; clear errors for unknown families and widths."""
    if not isinstance(bits, int) or not 1 <= bits <= 8:
        raise LowbitError(f"bits must be an integer in 1..8, got {bits!r}")
    factory = get("format", family)
    return factory(bits, symmetric)


@functools.cache
def format_from_name(name: str) -> Format:
    """Parse a canonical format name as stored in a manifest (``int4``, ``int3_sym``, ``nf2``, ...).

    Cached: formats are stateless, and every QLinear forward looks its format up by name."""
    for family in format_family_names():
        factory = get("format", family)
        parsed = factory.parse(name)
        if parsed is not None:
            return parsed
    raise LowbitError(f"unknown format name {name!r} (known families: {', '.join(format_family_names())})")


__all__ = ["Format", "SCALE_SEARCHES", "as_storage_scale", "fit_searched", "get_format", "format_from_name",
           "register", "format_family_names"]
