"""The input statistics of one Linear over a calibration set: GPTQ's Hessian ``H = 2/N Σ xᵀx`` (methods.md §3.2).

``xᵀx`` is symmetric, so each batch adds only the blocks on and above the diagonal, in panels of
:data:`PANEL` columns (``U[a:b, a:] += x[:, a:b]ᵀ x[:, a:]``: about 60% of the multiply-adds of a full ``xᵀx`` at
width 1536); the lower triangle is filled once, when :attr:`LayerStats.hessian` is next read. Sums stay fp32 (a
bf16 ``xᵀx`` loses the Hessian's positive definiteness on real layers). SciPy's ``ssyrk`` was measured faster
still, but OpenBLAS's threads keep spinning after each call and slowed torch's own GEMMs by 60%. Inputs a Linear
multiplies in bf16 (bf16 tensors, bf16 autocast) are rounded first — their Hessian is what the layer sees — and
then go through ``csrc/gram.cpp`` where the CPU has AVX512-BF16: bf16 products into fp32 sums, 2.6-2.8× the fp32
panels (15 against 43 ms at width 1536, 2,048 tokens).
"""

from __future__ import annotations

import torch

from .kernels import multiplies_bf16
from .kernels.cpu import gram_bf16_supports, gram_upper_bf16

PANEL = 256  # columns per panel of the upper-triangle update


class LayerStats:
    """Statistics of one Linear's inputs over the calibration set.

    Attributes:
        hessian: fp32 ``(in, in)``, ``2/N Σ xᵀx`` over all N calibration tokens (GPTQ's convention).
        tokens: N.
    """

    def __init__(self, hessian: torch.Tensor, tokens: int = 0):
        self._hessian = hessian
        self.tokens = tokens
        self._upper: torch.Tensor | None = None  # Σ xᵀx of the batches not folded in yet (upper blocks valid)
        self._pending = 0  # their tokens

    @property
    def hessian(self) -> torch.Tensor:
        if self._pending:
            upper, total = self._upper, self.tokens
            full = upper.triu() + upper.triu(1).t()
            self._hessian.mul_((total - self._pending) / total).add_(full, alpha=2.0 / total)
            self._upper, self._pending = None, 0
        return self._hessian

    @hessian.setter
    def hessian(self, value: torch.Tensor) -> None:
        self._hessian, self._upper, self._pending = value, None, 0

    def add(self, x: torch.Tensor) -> None:
        """Fold a batch of inputs ``x (..., in)`` into the statistics (accumulated in fp32). Where the Linear
        multiplies bf16 — ``x`` is bf16, or bf16 autocast is on (the calibration passes) — the statistics are those
        of the bf16-rounded inputs it sees, through ``csrc/gram.cpp`` on CPUs with AVX512-BF16 (exact products, fp32
        sums)."""
        x = x.detach().reshape(-1, x.shape[-1])
        width, kind = x.shape[1], x.device.type
        if self._upper is None:
            self._upper = torch.zeros(width, width, device=x.device)
        self._pending += x.shape[0]
        self.tokens += x.shape[0]
        rounded = multiplies_bf16(x)
        if rounded and gram_bf16_supports(x):
            gram_upper_bf16(x, self._upper)
            return
        x = x.to(torch.bfloat16).float() if rounded else x.float()  # (the same statistics without the kernel)
        with torch.autocast(kind, enabled=False):
            for a in range(0, width, PANEL):
                b = min(width, a + PANEL)
                self._upper[a:b, a:].addmm_(x[:, a:b].t(), x[:, a:])
