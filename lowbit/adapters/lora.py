"""LoRA: ``h += s * B (A x)`` with ``A (r, in)`` Kaiming-initialised and ``B (out, r)`` zero, so training starts
from the base. ``s = alpha / r`` (or ``alpha / sqrt(r)`` with ``rslora``). Dropout acts on the adapter's input.

A trained LoRA can be stored in int8 (:meth:`LoRA.store_int8`): ``A`` and ``B`` become int8 codes, each row of
``A`` and each column of ``B`` rounded on its own absmax / 127 grid, and one fp32 scale per rank component
(``rank_scale (r, 1)``, the product of the two grids' steps: ``B A = Σ_k b_k a_k`` does not change when a factor
moves from ``a_k`` to ``b_k``). A quarter of fp32's bytes, so rank 8 in int8 costs half what it costs in bf16. The
forward multiplies the dequantized factors (:meth:`LoRA.factors`); :meth:`LoRA.unpack` turns them back into
trainable float parameters."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import LowbitError
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
    def int8(self) -> bool:
        """Whether ``A`` and ``B`` hold int8 codes (:meth:`store_int8`) rather than float values."""
        return self.A.dtype == torch.int8

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A (r, in), B (out, r))`` as the forward multiplies them: the float parameters, or the int8 codes, ``A``'s
        times the rank components' scales (fp32: a 7-bit code times an fp32 scale is exact)."""
        if not self.int8:
            return self.A, self.B
        return self.A.float() * self.rank_scale, self.B.float()

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
    def store_int8(self) -> None:
        """In place: ``A`` and ``B`` become frozen int8 codes, symmetric round-to-nearest on an absmax / 127 grid per
        rank component (a row of ``A``, a column of ``B``), and one fp32 buffer ``rank_scale (r, 1)`` holding the
        product of each component's two steps. Works on the meta device (a checkpoint's skeleton). Already int8:
        unchanged."""
        if self.int8:
            return
        tiny = torch.finfo(torch.float32).tiny
        A, B = self.A.detach().float(), self.B.detach().float()
        step_a = A.abs().amax(dim=1, keepdim=True).clamp_min(tiny) / 127  # (r, 1)
        step_b = B.abs().amax(dim=0, keepdim=True).clamp_min(tiny) / 127  # (1, r)
        self.A = nn.Parameter((A / step_a).round().clamp(-127, 127).to(torch.int8), requires_grad=False)
        self.B = nn.Parameter((B / step_b).round().clamp(-127, 127).to(torch.int8), requires_grad=False)
        self.register_buffer("rank_scale", step_a * step_b.t())

    @torch.no_grad()
    def unpack(self) -> None:
        """In place: int8 factors back to fp32 parameters (their dequantized values), the scales dropped."""
        if not self.int8:
            return
        A, B = self.factors()
        del self.rank_scale
        self.A, self.B = nn.Parameter(A), nn.Parameter(B)
