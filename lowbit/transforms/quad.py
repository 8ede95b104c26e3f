"""QUAD's pieces (methods.md §7.2): the outlier projection from an SVD of calibration activations, and the
RMSNorm of a residual stream widened from ``d`` to ``d + r``. The ``rotate`` step (:mod:`.rotate`) applies them;
with ``r = 0`` it is QuaRot.

``G = E[xᵀx]`` over the outputs of every gain-free norm in front of a residual reader (one matrix for the whole
stream, since the residual is shared by all layers); ``P (d, r)`` = its top-``r`` eigenvectors;
``Q_P = [P | I - P Pᵀ] (d, d + r)`` with ``Q_P Q_Pᵀ = I_d``. ``h Q_P`` puts the outlier energy of ``h`` into its
first ``r`` coordinates and the rest into the last ``d``; ``‖h Q_P‖ = ‖h‖``, so an RMSNorm stays exact as long as
it divides by ``d``.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from ..architectures import architecture, final_norm, residual_norm_names
from ..models import decoder_blocks


class ResidualNorm(nn.Module):  # not named *RMSNorm: Gemma's weight init would look for a gain on it
    """Gain-free RMSNorm over a widened residual ``(..., d + r)`` that divides by the original width ``d``:
    ``x · rsqrt(Σ x² / d + ε)`` (QUAD's pitfall: dividing by ``d + r`` would change every layer)."""

    def __init__(self, d: int, eps: float):
        super().__init__()
        self.d, self.eps = d, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).sum(-1, keepdim=True) / self.d + self.eps)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"d={self.d}, eps={self.eps}"


def norm_eps(norm: nn.Module, default: float = 1e-6) -> float:
    """The ε of an RMSNorm module (transformers names it ``variance_epsilon`` or ``eps``)."""
    return getattr(norm, "variance_epsilon", getattr(norm, "eps", None)) or default


def residual_norms(model: nn.Module, d: int) -> None:
    """Replace every norm in front of residual readers (each block's, per the architecture table, and the final
    one) by a :class:`ResidualNorm` dividing by ``d``; also used when loading a QUAD checkpoint."""
    _, blocks = decoder_blocks(model)
    eps = norm_eps(final_norm(model), getattr(model.config, "rms_norm_eps", 1e-6))
    for b in blocks:
        for name in residual_norm_names(model):
            setattr(b, name, ResidualNorm(d, eps))
    setattr(model.get_decoder(), architecture(model).final_norm, ResidualNorm(d, eps))


class RotatedPostNorm(nn.Module):
    """A post-norm (Gemma 2/3, OLMo 2: a norm between a sub-layer's output and the residual stream) whose output
    joins a rotated residual stream: ``norm(x) @ M``, ``(..., d) -> (..., d + r)``. Its gain acts elementwise in
    the original basis, so it cannot be folded into a Linear; ``rotation`` ``M (d, d + r)`` fp32 is the one matrix
    of the whole stream, shared by every post-norm (stored once), and kept in fp32 when the checkpoint narrows
    the float tensors (``exact_buffers``)."""

    exact_buffers = ("rotation",)

    def __init__(self, norm: nn.Module, rotation: torch.Tensor):
        super().__init__()
        self.norm = norm
        self.register_buffer("rotation", rotation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(x)
        return (y.to(self.rotation.dtype) @ self.rotation).to(y.dtype)


@torch.no_grad()
def input_gram(model: nn.Module, inputs: list[nn.Module], windows: torch.Tensor) -> torch.Tensor:
    """``G (d, d)`` fp64: the mean of ``xᵀx`` over every token of every input of ``inputs`` (one reader per
    sub-layer: what the gain-free norm in front of it, or the raw stream, gives it), the model run on
    ``windows (n, L)`` token ids."""
    d = inputs[0].weight.shape[1]  # a reader's (or router's) weight is (out, d)
    gram, count = torch.zeros(d, d, dtype=torch.float64), [0]

    def hook(module, args):
        x = args[0].detach().reshape(-1, d).double()
        gram.add_(x.T @ x)
        count[0] += x.shape[0]

    handles = [m.register_forward_pre_hook(hook) for m in inputs]
    try:
        for w in tqdm(windows, desc="quad svd", unit="window", leave=False):
            model.get_decoder()(input_ids=w[None])
    finally:
        for h in handles:
            h.remove()
    return gram / count[0]


def projection(gram: torch.Tensor, r: int) -> torch.Tensor:
    """QUAD's ``Q_P = [P | I - P Pᵀ]`` ``(d, d + r)`` fp64 from the Gram matrix ``(d, d)``: ``P`` = its top-``r``
    eigenvectors. ``Q_P Q_Pᵀ = I_d``."""
    _, vecs = torch.linalg.eigh(gram.double())  # ascending eigenvalues
    p = vecs[:, -r:].flip(-1) if r else vecs[:, :0]
    return torch.cat([p, torch.eye(gram.shape[0], dtype=torch.float64) - p @ p.T], dim=1)
