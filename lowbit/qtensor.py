"""QuantizedWeight: packed codes plus the scales, zero points and metadata needed to decode them.

It is a plain object holding tensors, not a tensor subclass; nothing quantizes as a side effect. Granularity is
expressed by the shape of ``scales``: ``(rows, groups)`` with ``rows`` = 1 (one scale row shared by the whole
tensor) or ``out_features``, and ``groups = ceil(in_features / group_size)``. When ``group_size`` does not
divide ``in_features`` the last group of each row is shorter (GPTQ's column grouping): SmolLM2's 576 columns
with ``group_size=128`` make four groups of 128 and one of 64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import LowbitError
from .formats import Format, fit_searched, format_from_name, pack, packed_row_bytes, unpack

GRANULARITIES = ("tensor", "channel", "group")
UNIFORM = "uniform"  # storage kind of QuantizedWeight (a manifest entry without "kind" is this one)
_WEIGHT_KINDS: dict[str, type] = {}


def register_weight_kind(kind: str, cls: type) -> None:
    """Make a packed-weight class loadable from a manifest entry whose ``kind`` is ``kind``."""
    _WEIGHT_KINDS[kind] = cls


def weight_class(meta: dict) -> type:
    """The packed-weight class a manifest entry describes (QuantizedWeight or a registered kind)."""
    kind = meta.get("kind", UNIFORM)
    if kind not in _WEIGHT_KINDS:
        raise LowbitError(f"unknown packed weight kind {kind!r} (known: {', '.join(sorted(_WEIGHT_KINDS))}); "
                          "the checkpoint was written by a newer lowbit: upgrade lowbit")
    return _WEIGHT_KINDS[kind]


def empty_weight(meta: dict, device: torch.device | str = "cpu"):
    """Uninitialised packed storage of the layout ``meta`` describes (used when loading a checkpoint)."""
    return weight_class(meta).empty(meta, device)


def check_group_size(group_size: int) -> None:
    """Group sizes are positive multiples of 8 (32/64/128/256 are the usual ones)."""
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size <= 0 or group_size % 8:
        raise LowbitError(f"group_size must be a positive multiple of 8 (e.g. 32, 64, 128, 256), got {group_size!r}")


def padded_groups(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """View ``x (rows, n)`` as ``(rows, ceil(n/g), g)``, zero-padding the short last group."""
    rows, n = x.shape
    groups = math.ceil(n / group_size)
    pad = groups * group_size - n
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.view(rows, groups, group_size)


SUPERBLOCK = 256  # llama.cpp's K-quant super-block (QK_K): the columns whose group scales share one step


def superblock_step(scales: torch.Tensor, steps: int) -> torch.Tensor:
    """The power-of-two step ``d = 2^ceil(log2(max_j s_j / steps))`` of super-blocks of scales ``(..., per)``,
    keepdim: the one definition the fit (:func:`superblock_scales`) and the Q6_K export share."""
    return torch.exp2(torch.ceil(torch.log2(scales.amax(-1, keepdim=True) / steps)))


def superblock_scales(s: torch.Tensor, group_size: int, steps: int) -> torch.Tensor:
    """Scales ``s (rows, groups)`` rounded up to whole multiples ``1..steps`` of one power-of-two step ``d`` per
    :data:`SUPERBLOCK` columns, ``d = 2^ceil(log2(max_j s_j / steps))``: llama.cpp's K-quant scales
    (``scale_j = d · k_j``, Q6_K: ``k_j`` int8). A power of two times an integer below 2^11 is an fp16 value, so
    the stored scales hold exactly the K-quant's numbers. Rounding up keeps every group's extremes in its grid."""
    rows, groups = s.shape
    per = SUPERBLOCK // group_size
    if SUPERBLOCK % group_size or groups % per:
        raise LowbitError(f"a {groups * group_size}-wide weight in groups of {group_size} is not a whole number of "
                          f"{SUPERBLOCK}-column super-blocks, which K-quant grids need: use a target without "
                          "super-blocks (--target gguf:q8_0 or gguf:q4_0) for this model")
    sb = s.reshape(rows, groups // per, per)
    d = superblock_step(sb, steps)
    return (d * torch.ceil(sb / d).clamp(1, steps)).reshape(rows, groups)


def fit_scales(w: torch.Tensor, fmt: Format, granularity: str, group_size: int, search: str = "minmax",
               col_weight: torch.Tensor | None = None, scale_steps: int = 0, fit=fit_searched):
    """Scales/zeros ``(rows, groups)`` for ``w (out, in)``; a short last group is fitted on its own columns.

    ``search`` and ``col_weight`` (``(in,)`` importance of each input column, e.g. diag(H)) are passed to
    ``fit``: :func:`lowbit.formats.fit_searched`, or an equivalent (:func:`lowbit.kernels.scales.fit_searched`).
    ``scale_steps > 0``: the scales are K-quant super-block scales (:func:`superblock_scales`; zero-free formats
    only).
    """
    if scale_steps:
        s, z = fit_scales(w, fmt, granularity, group_size, search, col_weight, fit=fit)
        if z is not None or granularity != "group":
            raise LowbitError("super-block scales (scale_steps) need a symmetric grid in groups")
        return superblock_scales(s, group_size, scale_steps), None
    out_f, in_f = w.shape
    if granularity == "tensor":
        cw = None if col_weight is None else col_weight.repeat(out_f)
        s, z = fit(fmt, w.reshape(1, -1), search, cw)
        return s.view(1, 1), None if z is None else z.view(1, 1)
    g = in_f if granularity == "channel" else group_size
    full = (in_f // g) * g
    parts = []
    if full:
        cw = None if col_weight is None else col_weight[:full].reshape(full // g, g)
        parts.append(fit(fmt, w[:, :full].reshape(out_f, full // g, g), search, cw))
    if full < in_f:
        cw = None if col_weight is None else col_weight[full:].reshape(1, in_f - full)
        parts.append(fit(fmt, w[:, full:].reshape(out_f, 1, in_f - full), search, cw))
    s = torch.cat([p[0] for p in parts], dim=1)
    z = None if parts[0][1] is None else torch.cat([p[1] for p in parts], dim=1)
    return s, z


class PackedWeight:
    """What every packed weight kind shares: sizes from ``shape`` and byte accounting from ``tensors()``."""

    shape: tuple[int, int]

    def tensors(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def nbytes(self) -> int:
        """True bytes held in memory and written to disk: every stored tensor (codes, scales, zeros, codebooks)."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    @property
    def bits_per_weight(self) -> float:
        """Effective bits per weight, everything stored included (methods.md §2.6)."""
        return self.nbytes * 8 / self.numel

    @property
    def scale_layout(self) -> tuple[str, int] | None:
        """``(name, columns)``: the stored tensor holding one scale per output row and per group of ``columns``
        input columns, which a trained multiplier folds into exactly (:meth:`fold_multiplier`; RILQ's
        ``scales``, QUAD's PEFT); None when the weight has no row-wise scales (per-tensor scales)."""
        return None

    @property
    def scale_groups(self) -> int:
        """Scales per row of :attr:`scale_layout` (``ceil(in / columns)``)."""
        return math.ceil(self.in_features / self.scale_layout[1])

    def fold_multiplier(self, multiplier: torch.Tensor) -> torch.Tensor:
        """The :attr:`scale_layout` tensor times ``multiplier`` — ``(out,)`` or ``(out, 1)`` per row,
        ``(out, groups)`` per group, in the original row order — rounded once to the stored dtype, in stored
        row order: the same weight with one scale set (``(q - z) · s · c = (q - z) · (s c)``)."""
        layout = self.scale_layout
        groups = None if layout is None else self.scale_groups
        factor = multiplier.float()[:, None] if multiplier.dim() == 1 else multiplier.float()
        if layout is None or factor.dim() != 2 or factor.shape[0] != self.out_features \
                or factor.shape[1] not in (1, groups):
            expect = "none per row: per-tensor" if layout is None else f"({self.out_features}, {groups})"
            raise LowbitError(f"cannot fold trained scales of shape {tuple(multiplier.shape)} into this "
                              f"{self.out_features} x {self.in_features} weight's scales ({expect})")
        scales = self.tensors()[layout[0]]
        return (scales.float() * factor[self.stored_rows()].to(scales.device)).to(scales.dtype)

    def stored_rows(self) -> slice | torch.Tensor:
        """Index of the original rows in stored order (every row in place: ``slice(None)``)."""
        return slice(None)


@dataclass
class QuantizedWeight(PackedWeight):
    """A quantized ``(out_features, in_features)`` weight.

    Attributes:
        codes: uint8 ``(out, ceil(in * bits / 8))``, rows packed by :mod:`lowbit.formats.packing`.
        scales: fp16 ``(rows, groups)``, rows = 1 (per-tensor) or ``out``.
        zeros: uint8 ``(rows, groups)`` integer zero points for asymmetric integer formats, else None.
        fmt: canonical format name (``int4``, ``int3_sym``, ``nf4``, ``fp4_e2m1``, ``fp8_e4m3``).
        granularity: ``tensor``, ``channel`` or ``group``.
        group_size: input columns per scale (``in_features`` for tensor/channel granularity).
        shape: ``(out_features, in_features)``.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    fmt: str
    granularity: str
    group_size: int
    shape: tuple[int, int]

    def __post_init__(self):
        self.shape = tuple(int(d) for d in self.shape)
        if self.granularity not in GRANULARITIES:
            raise LowbitError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        out_f, in_f = self.shape
        if self.granularity == "group":
            check_group_size(self.group_size)
        elif self.group_size != in_f:
            raise LowbitError(f"{self.granularity} granularity needs group_size == in_features ({in_f}), "
                              f"got {self.group_size!r}")
        expect = (out_f, packed_row_bytes(in_f, self.format.bits))
        if tuple(self.codes.shape) != expect or self.codes.dtype != torch.uint8:
            raise LowbitError(f"codes must be uint8 {expect} for {self.fmt} {self.shape}, got "
                              f"{self.codes.dtype} {tuple(self.codes.shape)}")
        rows = 1 if self.granularity == "tensor" else out_f
        expect_s = (rows, math.ceil(in_f / self.group_size))
        if tuple(self.scales.shape) != expect_s:
            raise LowbitError(f"scales must have shape {expect_s} for {self.granularity} granularity, "
                              f"got {tuple(self.scales.shape)}")
        if (self.zeros is not None) != self.format.has_zero:
            raise LowbitError(f"format {self.fmt} {'needs' if self.format.has_zero else 'has no'} zero points")

    # ---- construction -------------------------------------------------------------------------------------
    @classmethod
    def from_codes(cls, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, fmt: Format,
                   granularity: str, group_size: int) -> QuantizedWeight:
        """Pack unpacked uint8 codes ``(out, in)`` with fp32 scales/zeros ``(rows, groups)`` into storage form."""
        return cls(
            codes=pack(codes, fmt.bits),
            scales=scales.to(torch.float16).contiguous(),
            zeros=None if zeros is None else zeros.to(torch.uint8).contiguous(),
            fmt=fmt.name,
            granularity=granularity,
            group_size=group_size,
            shape=tuple(codes.shape),
        )

    # ---- metadata -----------------------------------------------------------------------------------------
    kind = UNIFORM

    @property
    def format(self) -> Format:
        return format_from_name(self.fmt)

    @property
    def bits(self) -> int:
        return self.format.bits

    @property
    def code_bits(self) -> int:
        """Total code bits (scales and zero points not counted)."""
        return self.bits * self.numel

    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored tensors by flat name (``codes``, ``scales`` and, if present, ``zeros``)."""
        out = {"codes": self.codes, "scales": self.scales}
        if self.zeros is not None:
            out["zeros"] = self.zeros
        return out

    @property
    def scale_layout(self) -> tuple[str, int] | None:
        return None if self.granularity == "tensor" else ("scales", self.group_size)

    def meta(self) -> dict:
        """JSON-able description (no tensors) from which :meth:`empty` rebuilds the storage layout."""
        return {"fmt": self.fmt, "granularity": self.granularity, "group_size": self.group_size,
                "shape": list(self.shape)}

    @classmethod
    def from_tensors(cls, meta: dict, tensors: dict[str, torch.Tensor]) -> QuantizedWeight:
        """Rebuild from :meth:`meta` and :meth:`tensors` (no copy)."""
        return cls(tensors["codes"], tensors["scales"], tensors.get("zeros"), meta["fmt"], meta["granularity"],
                   int(meta["group_size"]), tuple(meta["shape"]))

    @classmethod
    def empty(cls, meta: dict, device: torch.device | str = "cpu") -> QuantizedWeight:
        """Uninitialised storage with the layout ``meta`` describes (used when loading a checkpoint)."""
        fmt = format_from_name(meta["fmt"])
        out_f, in_f = meta["shape"]
        rows = 1 if meta["granularity"] == "tensor" else out_f
        groups = math.ceil(in_f / meta["group_size"])
        return cls(
            codes=torch.empty(out_f, packed_row_bytes(in_f, fmt.bits), dtype=torch.uint8, device=device),
            scales=torch.empty(rows, groups, dtype=torch.float16, device=device),
            zeros=torch.empty(rows, groups, dtype=torch.uint8, device=device) if fmt.has_zero else None,
            fmt=fmt.name, granularity=meta["granularity"], group_size=int(meta["group_size"]),
            shape=(out_f, in_f),
        )

    # ---- decoding -----------------------------------------------------------------------------------------
    def unpacked_codes(self) -> torch.Tensor:
        """uint8 codes ``(out, in)``."""
        return unpack(self.codes, self.format.bits, self.in_features)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight ``(out, in)`` in ``dtype``, computed in fp32."""
        out_f, in_f = self.shape
        grouped = padded_groups(self.unpacked_codes(), self.group_size)  # (out, groups, g)
        s = self.scales.float().unsqueeze(-1)  # (rows, groups, 1)
        z = None if self.zeros is None else self.zeros.float().unsqueeze(-1)
        w = self.format.decode(grouped, s, z)
        return w.reshape(out_f, -1)[:, :in_f].to(dtype)

    def select_rows(self, index: torch.Tensor) -> QuantizedWeight:
        """The weight of rows ``index`` (1-D integer tensor, repeats allowed), still packed: an embedding lookup
        dequantizes only the rows it needs."""
        pick = (lambda t: t) if self.granularity == "tensor" else (lambda t: t.index_select(0, index))
        return QuantizedWeight(self.codes.index_select(0, index), pick(self.scales),
                               None if self.zeros is None else pick(self.zeros), self.fmt, self.granularity,
                               self.group_size, (index.numel(), self.in_features))

    def to(self, device: torch.device | str) -> QuantizedWeight:
        """A copy whose tensors live on ``device``; moves data only."""
        moved = {k: v.to(device) for k, v in self.tensors().items()}
        return QuantizedWeight(moved["codes"], moved["scales"], moved.get("zeros"), self.fmt, self.granularity,
                               self.group_size, self.shape)


register_weight_kind(UNIFORM, QuantizedWeight)
