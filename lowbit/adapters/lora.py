"""LoRA: ``h += s * B (A x)`` with ``A (r, in)`` Kaiming-initialised and ``B (out, r)`` zero, so training starts
from the base. ``s = alpha / r`` (or ``alpha / sqrt(r)`` with ``rslora``). Dropout acts on the adapter's input."""

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(x)
        if not torch.is_autocast_enabled(x.device.type):  # under autocast the matmuls cast (to bf16) themselves
            x = x.to(self.A.dtype)
        return (x @ self.A.t()) @ (self.B.t() * self.scale)  # the scale on B (out x r), not on the output

    def merge(self, w: torch.Tensor) -> torch.Tensor:
        return w + self.scale * (self.B.float() @ self.A.float()).to(w.dtype)
