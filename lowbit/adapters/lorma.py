"""LoRMA: low-rank *multiplicative* adaptation ``W = T W0`` (``pre``) or ``W = W0 T`` (``post``), methods.md §6.

Two rank-inflation variants keep ``T`` full rank (``s = alpha / r``):

* ``rri`` (LoRMA₊, additive identity): ``T = I + s B A``; ``B = 0`` at start, so ``T = I``.
* ``shift`` (LoRMA_π, permutation): ``T = s π(B A)``, where ``π`` cyclically shifts row ``i`` right by ``i``;
  ``A = e0 e0ᵀ`` and ``B`` Kaiming with its first column 1, both divided by ``sqrt(s)``, so ``T = I`` at start.

The forward never builds ``T`` (k×k) or the adapted weight (out×in): it applies ``T`` to activations (§6.3).
``pre`` transforms the base output ``h = x W0ᵀ`` (``k = out``), ``post`` the input ``x`` (``k = in``). Per
token: ``rri`` costs ``2 r k`` multiply-adds like LoRA; ``shift`` row ``i`` of ``π(BA) v`` is
``Σ_t B[i,t] c_t[i]`` with ``c_t = IFFT(conj(FFT(A_t)) FFT(v))`` (cyclic cross-correlation), ``O(r k log k)``.
Dropout (default 0) acts on the adapter branch of ``rri`` only (the reference applies it to ``x``; §6.3 says
why that would need a second base GEMM).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import LowbitError
from ..registry import register
from .base import Adapter, AdapterConfig, kaiming_

MODES = ("pre", "post")
VARIANTS = ("rri", "shift")


@dataclass(frozen=True)
class LoRMAConfig(AdapterConfig):
    step = "lorma"
    mode: str = "pre"  # pre: T on the output side (T W0); post: input side (W0 T)
    variant: str = "rri"  # rri: I + s B A; shift: s π(B A)

    def __post_init__(self):
        super().__post_init__()
        if self.mode not in MODES:
            raise LowbitError(f"LoRMA mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.variant not in VARIANTS:
            raise LowbitError(f"LoRMA variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}")


def shifted_product(v: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``π(B A) v`` for every row ``v`` of ``v (..., k)``, with ``A (r, k)``, ``B (k, r)``; never builds k×k.

    ``π(M)[i, j] = M[i, (j - i) mod k]``, so row ``i`` of the product is ``Σ_t B[i, t] Σ_j A[t, j] v[(i + j) mod k]``,
    a cyclic cross-correlation of each ``A_t`` with ``v``, done with real FFTs of length ``k``."""
    k = v.shape[-1]
    fv = torch.fft.rfft(v.float(), n=k)  # (..., k//2+1)
    fa = torch.fft.rfft(A.float(), n=k)  # (r, k//2+1)
    corr = torch.fft.irfft(fv.unsqueeze(-2) * fa.conj(), n=k)  # (..., r, k)
    return torch.einsum("...tk,kt->...k", corr, B.float()).to(v.dtype)


@register("adapter", "lorma")
class LoRMA(Adapter):
    Config = LoRMAConfig
    kind = "lorma"

    def __init__(self, config: LoRMAConfig, in_features: int, out_features: int):
        super().__init__(config, in_features, out_features)
        k, r = self.width, config.rank
        self.check_rank(k)
        s = self.scale
        if config.variant == "rri":
            self.A = nn.Parameter(kaiming_(torch.empty(r, k)))
            self.B = nn.Parameter(torch.zeros(k, r))
        else:
            A = torch.zeros(r, k)
            A[0, 0] = 1.0
            B = kaiming_(torch.empty(k, r))
            B[:, 0] = 1.0
            self.A = nn.Parameter(A / math.sqrt(s))
            self.B = nn.Parameter(B / math.sqrt(s))
        self.dropout = nn.Dropout(config.dropout) if config.dropout else nn.Identity()

    @property
    def place(self) -> str:
        return "output" if self.config.mode == "pre" else "input"

    @property
    def scale(self) -> float:
        return self.config.lora_alpha / self.config.rank

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        """``v (..., k)`` -> ``T v`` row-wise, same shape and dtype."""
        if self.config.variant == "rri":
            u = self.dropout(v).to(self.A.dtype)
            return v + ((u @ self.A.t()) @ self.B.t() * self.scale).to(v.dtype)
        return shifted_product(v, self.A, self.B) * self.scale

    def transform_matrix(self) -> torch.Tensor:
        """``T`` as a dense ``(k, k)`` fp32 matrix (merge and tests only; the forward never builds it)."""
        with torch.no_grad():
            eye = torch.eye(self.width, device=self.A.device)
            training = self.training
            self.eval()  # no dropout in a merge
            rows = self(eye)  # row j = T e_j, i.e. the rows of Tᵀ
            self.train(training)
        return rows.t().float()

    def merge(self, w: torch.Tensor) -> torch.Tensor:
        t = self.transform_matrix().to(w.dtype)
        return t @ w if self.config.mode == "pre" else w @ t
