"""What every adapter shares: a typed config, where it sits in QLinear's forward, and how it merges.

An adapter is an ``nn.Module`` held by a :class:`~lowbit.QLinear` (``layer.adapters[name]``). Its ``place`` says
where it acts in the forward (methods.md §8.4, order fixed)::

    x  <- T_in(x)                     place "input":  multiplicative, input side (LoRMA post mode)
    h  <- base(x) + sum_i delta_i(x)  place "add":    additive, reads the (transformed) input (LoRA)
    h  <- T_out(h)                    place "output": multiplicative, output side (LoRMA pre mode)
    y  <- h + bias

So the effective weight is ``W_eff = T_out (Q(W) + sum_i dW_i) T_in`` and :meth:`Adapter.merge` applies one
adapter's part of it to a float weight ``(out, in)``. At most one multiplicative adapter per side.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..config import StepConfig
from ..errors import LowbitError
from ..models import DECODER


@dataclass(frozen=True)
class AdapterConfig(StepConfig):
    """Fields every adapter takes. ``alpha`` defaults to ``2 * rank`` when left at 0."""

    rank: int = 16
    alpha: float = 0.0  # scale numerator; 0 means 2 * rank
    dropout: float = 0.0
    targets: tuple[str, ...] = (DECODER,)  # QLinear names: globs, "re:" regexes, "@decoder"
    ignore: tuple[str, ...] = ()

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise LowbitError(f"rank must be a positive integer, got {self.rank!r}")
        if self.alpha < 0:
            raise LowbitError(f"alpha must be >= 0 (0 means 2 * rank), got {self.alpha!r}")
        if not 0 <= self.dropout < 1:
            raise LowbitError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not self.targets:
            raise LowbitError("targets is empty: name the layers to adapt, e.g. targets=['@decoder']")

    @property
    def lora_alpha(self) -> float:
        return self.alpha or 2.0 * self.rank


class Adapter(nn.Module, ABC):
    """One low-rank adapter on one layer of ``in_features -> out_features``. Only its own parameters train."""

    Config: ClassVar[type[AdapterConfig]]
    kind: ClassVar[str] = ""

    def __init__(self, config: AdapterConfig, in_features: int, out_features: int):
        super().__init__()
        self.config = config
        self.in_features, self.out_features = in_features, out_features

    @property
    @abstractmethod
    def place(self) -> str:
        """``input``, ``add`` or ``output`` (see the module docstring)."""

    @property
    def width(self) -> int:
        """Width of the vectors the adapter transforms (multiplicative) or reads (additive)."""
        return self.out_features if self.place == "output" else self.in_features

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        """``add``: the update ``delta(x) (..., out)``; ``input``/``output``: the transformed ``v``."""
        raise NotImplementedError

    @abstractmethod
    def merge(self, w: torch.Tensor) -> torch.Tensor:
        """This adapter's part of the effective weight applied to float ``w (out, in)``; returns a new tensor."""

    def float_tensors(self) -> dict[str, torch.Tensor]:
        """``{name: tensor}`` of the adapter's factors as float values (for exports that store floats)."""
        return dict(self.named_parameters())

    def check_rank(self, width: int) -> None:
        if self.config.rank >= width:
            raise LowbitError(f"{self.kind} rank {self.config.rank} is not below the width it adapts ({width}); "
                              f"choose rank < {width}")

    def extra_repr(self) -> str:
        return f"rank={self.config.rank}, alpha={self.config.lora_alpha:g}, place={self.place}"


def kaiming_(t: torch.Tensor) -> torch.Tensor:
    """nn.Linear's default init (Kaiming-uniform, a = sqrt(5)), as LoRA and LoRMA initialise ``A``."""
    return nn.init.kaiming_uniform_(t, a=math.sqrt(5))
