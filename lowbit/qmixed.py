"""MixedCodebookWeight: rows of one weight at different bit widths, each row with its own learned codebook.

This is LowRA's storage (methods.md §4.2, §4.6). For a weight ``W (out, in)``:

* each row is split into blocks of ``block_size`` input columns with one fp16 absmax ``a`` per block
  (rounded up, so ``u = w / a`` lies in [-1, 1]);
* each row ``r`` has a width ``b_r`` in {1, 2, 3, 4} and a sorted fp16 codebook of ``2**b_r`` levels ``m_r``;
  a weight decodes to ``a · m_r[code]``;
* rows are stored **permuted** so that rows of equal width are contiguous: stored row ``i`` is original row
  ``perm[i]``, where ``perm = argsort(row_bits, stable)`` (rows by width, original order within a width); segment
  ``b`` holds ``rows[b]`` rows packed at ``b`` bits per code (``lsb-rows-v1`` layout). :meth:`dequantize` (and
  every kernel) returns rows in the original order.

Stored tensors: ``row_bits`` uint8 ``(out,)`` (each original row's width: the permutation is derived from it, so
it costs 8 bits per row instead of a 32-bit index), ``absmax`` fp16 ``(out, ceil(in / block_size))`` block scales
in stored order (the block absmax, or a clipped scale chosen by LowRA's scale search), and per present width
``b``: ``codes_b{b}`` uint8 ``(rows[b], ceil(in·b/8))`` and ``codebook_b{b}`` fp16 ``(rows[b], 2**b)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .errors import LowbitError
from .formats import pack, packed_row_bytes, unpack
from .formats.base import as_storage_scale
from .qtensor import PackedWeight, padded_groups, register_weight_kind

KIND = "mixed-codebook"
WIDTHS = (1, 2, 3, 4)


@dataclass
class MixedCodebookWeight(PackedWeight):
    """A quantized ``(out, in)`` weight with per-row widths and codebooks (see the module docstring).

    Attributes:
        row_bits: uint8 ``(out,)`` width of each row, original order.
        perm: int32 ``(out,)`` (derived, not stored): stored row ``i`` is original row ``perm[i]``.
        absmax: fp16 ``(out, blocks)`` block scales, stored row order.
        codes: width -> uint8 ``(rows_b, ceil(in·b/8))`` packed codes.
        codebooks: width -> fp16 ``(rows_b, 2**b)`` sorted levels (in units of the block absmax).
        block_size: input columns per absmax.
        shape: ``(out_features, in_features)``.
    """

    row_bits: torch.Tensor
    absmax: torch.Tensor
    codes: dict[int, torch.Tensor]
    codebooks: dict[int, torch.Tensor]
    block_size: int
    shape: tuple[int, int]
    rows: dict[int, int] = field(init=False)
    perm: torch.Tensor = field(init=False)

    def __post_init__(self):
        self.shape = tuple(int(d) for d in self.shape)
        out_f, in_f = self.shape
        if tuple(self.row_bits.shape) != (out_f,) or self.row_bits.dtype != torch.uint8:
            raise LowbitError(f"row_bits must be uint8 ({out_f},), got {self.row_bits.dtype} "
                              f"{tuple(self.row_bits.shape)}")
        if set(self.codes) != set(self.codebooks) or not set(self.codes) <= set(WIDTHS):
            raise LowbitError(f"mixed weight widths must be a subset of {WIDTHS} with one codebook each, got codes "
                              f"{sorted(self.codes)} and codebooks {sorted(self.codebooks)}")
        self.rows = {b: int(self.codes[b].shape[0]) for b in sorted(self.codes)}
        if sum(self.rows.values()) != out_f:
            raise LowbitError(f"mixed weight segments hold {sum(self.rows.values())} rows, expected {out_f}")
        for b, n in self.rows.items():
            if tuple(self.codes[b].shape) != (n, packed_row_bytes(in_f, b)) or self.codes[b].dtype != torch.uint8:
                raise LowbitError(f"codes_b{b} must be uint8 {(n, packed_row_bytes(in_f, b))}, got "
                                  f"{self.codes[b].dtype} {tuple(self.codes[b].shape)}")
            if tuple(self.codebooks[b].shape) != (n, 2**b):
                raise LowbitError(f"codebook_b{b} must be {(n, 2 ** b)}, got {tuple(self.codebooks[b].shape)}")
        if self.row_bits.device.type != "meta":
            counts = {b: int((self.row_bits == b).sum()) for b in WIDTHS}
            if any(counts[b] != self.rows.get(b, 0) for b in WIDTHS):
                raise LowbitError(f"row_bits count {counts} rows per width but the segments hold {self.rows}")
        self.perm = torch.argsort(self.row_bits, stable=True).to(torch.int32)
        if tuple(self.absmax.shape) != (out_f, math.ceil(in_f / self.block_size)):
            raise LowbitError(f"absmax must have shape {(out_f, math.ceil(in_f / self.block_size))}, got "
                              f"{tuple(self.absmax.shape)}")

    # ---- construction -------------------------------------------------------------------------------------
    @classmethod
    def from_rows(cls, codes: torch.Tensor, widths: torch.Tensor, codebooks: dict[int, torch.Tensor],
                  absmax: torch.Tensor, block_size: int) -> MixedCodebookWeight:
        """Build from unpacked codes in the *original* row order.

        Args:
            codes: uint8 ``(out, in)``.
            widths: int ``(out,)`` bit width of each row.
            codebooks: width -> float ``(out, 2**b)`` levels per row (only rows of that width are read).
            absmax: float ``(out, blocks)`` block scales (stored as fp16; pass fp16-representable values).
        """
        row_bits = widths.to(torch.uint8)
        perm = torch.argsort(row_bits, stable=True)  # the order __post_init__ derives
        w_sorted = row_bits[perm]
        packed, books = {}, {}
        for b in WIDTHS:
            rows = perm[w_sorted == b]
            if rows.numel():
                packed[b] = pack(codes[rows], b)
                books[b] = codebooks[b][rows].to(torch.float16).contiguous()
        return cls(row_bits, absmax[perm].to(torch.float16).contiguous(), packed, books, block_size,
                   tuple(codes.shape))

    # ---- metadata (the interface QLinear, io and summaries use) --------------------------------------------
    kind = KIND

    @property
    def fmt(self) -> str:
        return "lowra"

    @property
    def code_bits(self) -> int:
        """Total code bits (not counting scales and codebooks)."""
        return sum(b * n for b, n in self.rows.items()) * self.in_features

    @property
    def bits(self) -> float:
        """Average code bits per weight."""
        return self.code_bits / self.numel

    @property
    def scale_layout(self) -> tuple[str, int]:
        """The block absmax: one scale per row and block (a trained multiplier folds into it)."""
        return "absmax", self.block_size

    def stored_rows(self) -> torch.Tensor:
        return self.perm.long()

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"row_bits": self.row_bits, "absmax": self.absmax}
        for b in self.rows:
            out[f"codes_b{b}"] = self.codes[b]
            out[f"codebook_b{b}"] = self.codebooks[b]
        return out

    def meta(self) -> dict:
        return {"kind": KIND, "fmt": "lowra", "block_size": self.block_size, "shape": list(self.shape),
                "rows": {str(b): n for b, n in self.rows.items()}}

    @classmethod
    def from_tensors(cls, meta: dict, tensors: dict[str, torch.Tensor]) -> MixedCodebookWeight:
        widths = [int(b) for b in meta["rows"]]
        return cls(tensors["row_bits"], tensors["absmax"], {b: tensors[f"codes_b{b}"] for b in widths},
                   {b: tensors[f"codebook_b{b}"] for b in widths}, int(meta["block_size"]), tuple(meta["shape"]))

    @classmethod
    def empty(cls, meta: dict, device: torch.device | str = "cpu") -> MixedCodebookWeight:
        out_f, in_f = meta["shape"]
        rows = {int(b): int(n) for b, n in meta["rows"].items()}
        blocks = math.ceil(in_f / int(meta["block_size"]))
        row_bits = torch.cat([torch.full((n,), b, dtype=torch.uint8) for b, n in sorted(rows.items())]).to(device)
        return cls(row_bits,
                   torch.empty(out_f, blocks, dtype=torch.float16, device=device),
                   {b: torch.empty(n, packed_row_bytes(in_f, b), dtype=torch.uint8, device=device)
                    for b, n in rows.items()},
                   {b: torch.empty(n, 2**b, dtype=torch.float16, device=device) for b, n in rows.items()},
                   int(meta["block_size"]), (out_f, in_f))

    # ---- decoding -----------------------------------------------------------------------------------------
    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight ``(out, in)`` in the original row order, computed in fp32."""
        out_f, in_f = self.shape
        parts = []
        for b in self.rows:  # stored (permuted) row order: segment by segment
            codes = unpack(self.codes[b], b, in_f).long()
            parts.append(torch.gather(self.codebooks[b].float(), 1, codes))
        u = torch.cat(parts) if parts else torch.empty(0, in_f)
        a = self.absmax.float().unsqueeze(-1)  # (out, blocks, 1)
        stored = (padded_groups(u, self.block_size) * a).reshape(out_f, -1)[:, :in_f].to(dtype)
        w = torch.empty_like(stored)
        w[self.perm.long()] = stored
        return w

    def to(self, device) -> MixedCodebookWeight:
        return MixedCodebookWeight(self.row_bits.to(device), self.absmax.to(device),
                                   {b: t.to(device) for b, t in self.codes.items()},
                                   {b: t.to(device) for b, t in self.codebooks.items()}, self.block_size, self.shape)


def block_absmax(w: torch.Tensor, block_size: int) -> torch.Tensor:
    """fp16-representable absmax ``(out, blocks)`` of ``w (out, in)`` per block of columns, rounded up (never 0)."""
    return as_storage_scale(padded_groups(w.float(), block_size).abs().amax(-1))


register_weight_kind(KIND, MixedCodebookWeight)
