"""LoRA: ``h += s * B (A x)`` with ``A (r, in)`` Kaiming-initialised and ``B (out, r)`` zero, so training starts
from the base. ``s = alpha / r`` (or ``alpha / sqrt(r)`` with ``rslora``). Dropout acts on the adapter's input.

A trained LoRA can be stored as integer codes (:meth:`LoRA.store_codes`, 8 or 4 bits): each row of ``A`` and each
column of ``B`` rounded on its own symmetric absmax grid (absmax / 127 in int8, absmax / 7 in int4), and one fp32
scale per rank component (``rank_scale (r, 1)``, the product of the two grids' steps: ``B A = Σ_k b_k a_k`` does not
change when a factor moves from ``a_k`` to ``b_k``). int8 keeps ``A (r, in)`` and ``B (out, r)`` as int8 tensors (a
quarter of fp32's bytes); int4 packs two codes per byte (:mod:`lowbit.formats.packing`, low nibble first, code + 8
stored so 0 is 8): ``A`` becomes uint8 ``(r, ceil(in / 2))`` and ``B`` holds ``Bᵀ``'s rows, uint8
``(r, ceil(out / 2))`` (an eighth of fp32's bytes). The forward multiplies the dequantized factors
(:meth:`LoRA.factors`); :meth:`LoRA.unpack` turns them back into trainable float parameters."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import LowbitError
from ..formats import packing
from ..registry import register
from .base import Adapter, AdapterConfig, kaiming_


@dataclass(frozen=True)
class LoRAConfig(AdapterConfig):
    step = "lora"
    rslora: bool = False  # scale alpha / sqrt(rank) instead of alpha / rank
    init: str = "kaiming"  # A's init: kaiming (LoRA, PEFT) or gaussian (N(0, 1/rank), RILQ); B = 0 either way

    def __post_init__(self):
        super().__post_init__()
        if self.init not in ("kaiming", "gaussian"):
            raise LowbitError(f"LoRA init must be kaiming or gaussian, got {self.init!r}")


@register("adapter", "lora")
class LoRA(Adapter):
    Config = LoRAConfig
    kind = "lora"
    place = "add"

    def __init__(self, config: LoRAConfig, in_features: int, out_features: int):
        super().__init__(config, in_features, out_features)
        self.check_rank(min(in_features, out_features))
        A = torch.empty(config.rank, in_features)
        self.A = nn.Parameter(kaiming_(A) if config.init == "kaiming" else nn.init.normal_(A, std=1 / config.rank))
        self.B = nn.Parameter(torch.zeros(out_features, config.rank))
        self.dropout = nn.Dropout(config.dropout) if config.dropout else nn.Identity()

    @property
    def scale(self) -> float:
        r = self.config.rank
        return self.config.lora_alpha / (math.sqrt(r) if self.config.rslora else r)

    @property
    def code_bits(self) -> int | None:
        """8 or 4 when ``A`` and ``B`` hold integer codes (:meth:`store_codes`), None for float values."""
        return {torch.int8: 8, torch.uint8: 4}.get(self.A.dtype)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A (r, in), B (out, r))`` as the forward multiplies them: the float parameters, or the integer codes,
        ``A``'s times the rank components' scales (fp32: a 7-bit code times an fp32 scale is exact). Codes are
        frozen, so their fp32 values are computed once and kept (rank x (in + out) x 4 bytes: 10 MB for rank 8 on
        SmolLM2) until a code or scale tensor is replaced or written in place; a decode step would otherwise unpack
        every adapter once per token."""
        bits = self.code_bits
        if bits is None:
            return self.A, self.B
        tensors = (self.A, self.B, self.rank_scale)
        if torch.compiler.is_compiling():  # traced into the graph (torch.compile folds or fuses it), as before
            return self._dequantize(bits)
        # an inference tensor has no version counter to tell an in-place write: its values are never kept
        key = None if any(t.is_inference() for t in tensors) else \
            tuple((t.device, t.data_ptr(), t._version) for t in tensors)
        cached = self.__dict__.get("_dequantized")
        if key is None or cached is None or cached[0] != key:
            with torch.inference_mode(False), torch.no_grad():  # normal tensors: autograd may save them later
                cached = (key, self._dequantize(bits))
            if key is not None:
                self.__dict__["_dequantized"] = cached
        return cached[1]

    def _dequantize(self, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
        if bits == 8:
            qa, qb = self.A.float(), self.B.float()
        else:
            qa = packing.unpack(self.A, 4, self.in_features).float() - 8
            qb = (packing.unpack(self.B, 4, self.out_features).float() - 8).t()
        return qa * self.rank_scale, qb

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        A, B = self.factors()
        x = self.dropout(x)
        if not torch.is_autocast_enabled(x.device.type):  # under autocast the matmuls cast (to bf16) themselves
            x = x.to(A.dtype)
        return (x @ A.t()) @ (B.t() * self.scale)  # the scale on B (out x r), not on the output

    def merge(self, w: torch.Tensor) -> torch.Tensor:
        A, B = self.factors()
        return w + self.scale * (B.float() @ A.float()).to(w.dtype)

    def float_tensors(self) -> dict[str, torch.Tensor]:
        A, B = self.factors()
        return {"A": A, "B": B}

    @torch.no_grad()
    def store_codes(self, bits: int) -> None:
        """In place: ``A`` and ``B`` become frozen integer codes of ``bits`` (8 or 4), symmetric round-to-nearest on
        an absmax / (2^(bits-1) - 1) grid per rank component (a row of ``A``, a column of ``B``), and one fp32 buffer
        ``rank_scale (r, 1)`` holding the product of each component's two steps (layouts: the module docstring).
        Works on the meta device (a checkpoint's skeleton). Already stored as codes: unchanged."""
        if bits not in (8, 4):
            raise LowbitError(f"LoRA codes are 8 or 4 bits, got {bits!r}")
        if self.code_bits is not None:
            return
        qmax, tiny = 2 ** (bits - 1) - 1, torch.finfo(torch.float32).tiny
        A, B = self.A.detach().float(), self.B.detach().float()
        step_a = A.abs().amax(dim=1, keepdim=True).clamp_min(tiny) / qmax  # (r, 1)
        step_b = B.abs().amax(dim=0, keepdim=True).clamp_min(tiny) / qmax  # (1, r)
        qa = (A / step_a).round().clamp(-qmax, qmax)
        qb = (B / step_b).round().clamp(-qmax, qmax)
        if bits == 8:
            qa, qb = qa.to(torch.int8), qb.to(torch.int8)
        else:  # code + 8 in [1, 15], two per byte; B packed along its output dimension (Bᵀ's rows)
            qa, qb = packing.pack((qa + 8).to(torch.uint8), 4), packing.pack((qb.t() + 8).to(torch.uint8), 4)
        self.A = nn.Parameter(qa, requires_grad=False)
        self.B = nn.Parameter(qb, requires_grad=False)
        self.register_buffer("rank_scale", step_a * step_b.t())
        self.__dict__.pop("_dequantized", None)

    @torch.no_grad()
    def unpack(self) -> None:
        """In place: integer-coded factors back to fp32 parameters (their dequantized values), the scales dropped."""
        if self.code_bits is None:
            return
        A, B = self._dequantize(self.code_bits)
        del self.rank_scale
        self.__dict__.pop("_dequantized", None)
        self.A, self.B = nn.Parameter(A), nn.Parameter(B)
