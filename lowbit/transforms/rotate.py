"""Rotating the residual stream of a decoder, laid out per :mod:`lowbit.architectures`: QuaRot (methods.md §3.6)
and QUAD (§7.2) in one step.

The float model is changed in place and computes the same function (logits within float rounding):

1. Untie the LM head; fold every RMSNorm gain ``γ`` (``offset + γ`` for Gemma's norms) into the Linears that read
   the norm's output (``W ← W diag(γ)``: q/k/v, gate/up or an MoE block's router and experts, and the head for
   the final norm) and make the norm's gain 1. A post-norm (Gemma 2/3, OLMo 2: between a writer and the stream)
   cannot be folded: the writer stays unrotated and the norm's output is rotated online (:class:`RotatedPostNorm`,
   one ``(d, d + r)`` fp32 matrix for the model; a float matmul per sub-layer).
2. ``M (d, d + r)``: QuaRot (``r = 0``) uses a randomized Hadamard ``H·D``; QUAD uses ``Q_P = [P | I - P Pᵀ]``
   with ``P (d, r)`` the top ``r`` eigenvectors of the Gram matrix ``G = E[xᵀx]`` of every sub-layer's input (the
   output of the norm in front of it, or the stream itself) of every block on calibration windows (WikiText-2
   valid), followed by ``block_diag(H_r, H_d)``. ``M Mᵀ = I_d``.
3. Residual readers ``W ← W M`` (q, k, v, gate, up, head), writers ``W ← Mᵀ W`` (o, down; biases too) and the
   embedding ``E ← E M``: the residual stream becomes ``h M``, ``d + r`` wide, its first ``r`` coordinates the
   outlier directions. RMSNorm is invariant (``‖h M‖ = ‖h‖``) but must keep dividing by the original ``d``
   (:class:`ResidualNorm`).
4. Online Hadamards before o_proj and down_proj (``x ← x H``, ``W ← W H``), so their inputs are rotated too.

Readers become :class:`~lowbit.nn.input_transform.TransformedLinear` with ``outliers = r`` (their first ``r``
input columns stay float when a weight quantizer runs next); o_proj/down_proj with ``hadamard = True``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from ..architectures import BlockParts, architecture, block_parts, final_norm, unfuse_experts
from ..config import StepConfig
from ..errors import LowbitError
from ..kernels.hadamard import hadamard_matrix, rotation_matrix
from ..models import decoder_blocks
from ..nn.gemv_linear import is_float_linear
from ..nn.input_transform import InputSpec, TransformedLinear
from ..quantizers.base import Step
from ..registry import register
from ..state import state_of
from .quad import ResidualNorm, RotatedPostNorm, input_gram, norm_eps, projection, residual_norms

log = logging.getLogger(__name__)

ROTATIONS = ("hadamard", "random", "none")


@dataclass(frozen=True)
class RotateConfig(StepConfig):
    step = "rotate"
    outliers: int = 0  # QUAD's r (64 in the paper's scripts); 0 = QuaRot
    rotation: str = "hadamard"  # hadamard (randomized H·D) | random (orthogonal, any width) | none
    online: bool = True  # online Hadamards before o_proj and down_proj
    samples: int = 32  # calibration windows for QUAD's activation SVD
    seq_len: int = 512
    seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        if self.rotation not in ROTATIONS:
            raise LowbitError(f"rotation must be one of {', '.join(ROTATIONS)}, got {self.rotation!r}")
        if not isinstance(self.outliers, int) or self.outliers < 0:
            raise LowbitError(f"outliers must be a non-negative integer, got {self.outliers!r}")
        if self.samples < 1 or self.seq_len < 2:
            raise LowbitError("samples must be >= 1 and seq_len >= 2")


def widen_skeleton(model: nn.Module, outliers: int) -> None:
    """On a model built from its config (meta or random weights): give the embedding, the head and every
    residual reader/writer the ``d + r`` width of a QUAD checkpoint, and residual norms dividing by ``d``, so its
    tensors load into it."""
    emb, blocks, _, head = _layout(model)
    d = emb.weight.shape[1]
    rotation = torch.empty(d, d + outliers)  # RotatedPostNorm's matrix, one for the model (filled by loading)
    for b in blocks:
        for parent, name in b.post_norms:
            setattr(parent, name, RotatedPostNorm(getattr(parent, name), rotation))
    if not outliers:
        return
    _set_weight(emb, emb.weight.new_empty(emb.num_embeddings, d + outliers))
    _set_weight(head, head.weight.new_empty(head.weight.shape[0], d + outliers))
    for b in blocks:
        for parent, name, _ in b.readers:
            w = getattr(parent, name).weight
            _set_weight(getattr(parent, name), w.new_empty(w.shape[0], w.shape[1] + outliers))
        for parent, name in [] if b.post_norms else b.writers:  # behind a post-norm a writer keeps width d
            lin = getattr(parent, name)
            setattr(parent, name, nn.Linear(lin.in_features, lin.out_features + outliers, bias=lin.bias is not None,
                                            device=lin.weight.device, dtype=lin.weight.dtype))
    residual_norms(model, d)


def _layout(model: nn.Module) -> tuple[nn.Embedding, list[BlockParts], nn.Module, nn.Linear]:
    """``(embedding, blocks, final norm, head)`` per the architecture table, or a clear error."""
    arch = architecture(model)
    arch.check("rotate")
    unfuse_experts(model)
    _, blocks = decoder_blocks(model)
    out = [block_parts(model, b) for b in blocks]
    head, norm = model.get_output_embeddings(), final_norm(model)
    if not is_float_linear(head):
        raise LowbitError("rotation needs a float nn.Linear LM head: run the rotate step before any quantizer "
                          "(and before the embeddings step)")
    for b in out:
        for parent, name, *_ in b.readers + b.writers:
            m = getattr(parent, name)
            router = arch.moe is not None and name == arch.moe.router
            if not (type(m) is nn.Linear or (router and isinstance(getattr(m, "weight", None), nn.Parameter))):
                raise LowbitError("rotation runs on the float model: put the rotate step first in the recipe")
        if not isinstance(b.attn_norm, ResidualNorm):  # checked before anything changes
            for n in (b.attn_norm, b.mlp_norm, norm):
                if n is not None:
                    _check_norm(n, arch.norm_offset)
    return model.get_input_embeddings(), out, norm, head


def _untie_head(model: nn.Module, emb: nn.Embedding, head: nn.Linear) -> None:
    if head.weight is emb.weight or head.weight.data_ptr() == emb.weight.data_ptr():
        head.weight = nn.Parameter(emb.weight.detach().clone(), requires_grad=False)
    if getattr(model.config, "tie_word_embeddings", False):
        model.config.tie_word_embeddings = False


def _check_norm(norm: nn.Module, offset: float) -> None:
    """Refuse a norm that is not ``(offset + γ) · x / rms(x)`` (its gain could not be folded into the next
    Linears)."""
    gain = norm.weight.detach()
    if gain.is_meta:  # a skeleton being widened for loading: nothing to fold
        return
    x = torch.randn(2, gain.shape[0], dtype=gain.dtype, device=gain.device)
    plain = (offset + gain) * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm_eps(norm))
    with torch.no_grad():
        same = torch.allclose(norm(x), plain, rtol=1e-3, atol=1e-3)
    if not same:
        raise LowbitError(f"rotation folds RMSNorm gains into the next Linears, which needs a norm computing "
                          f"({offset:g} + γ)·x/rms(x) as the architecture table says; {type(norm).__name__} computes "
                          "something else")


def _fold_gain(norm: nn.Module, readers: list[nn.Module], offset: float) -> None:
    """``W ← W diag(offset + γ)`` for each reader, then ``γ = 1 - offset`` (the norm's gain becomes 1)."""
    gain = norm.weight.detach().double() + offset
    for lin in readers:
        lin.weight.data = (lin.weight.detach().double() * gain).to(lin.weight.dtype)
    norm.weight.data.fill_(1.0 - offset)


def _rotation(n: int, kind: str, seed: int) -> torch.Tensor:
    return torch.eye(n, dtype=torch.float64) if kind == "none" or n == 0 else rotation_matrix(n, kind, seed)


def _set_weight(module: nn.Module, w: torch.Tensor) -> None:
    """A new ``weight (out, in)`` for a Linear, an embedding ``(n, d)`` or a router; the width attributes follow."""
    module.weight = nn.Parameter(w.to(module.weight.dtype).contiguous(), requires_grad=module.weight.requires_grad)
    for attr, size in (("out_features", w.shape[0]), ("in_features", w.shape[1]), ("embedding_dim", w.shape[1]),
                       ("hidden_dim", w.shape[1])):  # a router reshapes its input to hidden_dim
        if hasattr(module, attr):
            setattr(module, attr, size)


@torch.no_grad()
def rotate_model(model: nn.Module, config: RotateConfig, windows: torch.Tensor | None = None) -> nn.Module:
    """Apply the transform (module docstring) in place; ``windows (n, L)`` token ids feed QUAD's SVD."""
    emb, blocks, norm, head = _layout(model)
    offset = architecture(model).norm_offset
    d, r = emb.weight.shape[1], config.outliers
    if r >= d:
        raise LowbitError(f"outliers={r} must be smaller than the hidden size {d}")
    _untie_head(model, emb, head)
    final_gain = norm.weight.detach().double() + offset  # before folding: what maps float final states over
    for b in blocks:
        for block_norm in (b.attn_norm, b.mlp_norm):
            if block_norm is not None:  # OLMo 2's readers read the stream itself
                _fold_gain(block_norm, [getattr(p, n) for p, n, front in b.readers if front is block_norm], offset)
    _fold_gain(norm, [head], offset)
    if r:
        if windows is None:
            raise LowbitError("QUAD (outliers > 0) needs calibration windows for its activation SVD")
        m = projection(input_gram(model, [x for b in blocks for x in b.inputs], windows), r)
    else:
        m = torch.eye(d, dtype=torch.float64)
    m = m @ torch.block_diag(_rotation(r, config.rotation, config.seed + 1), _rotation(d, config.rotation,
                                                                                        config.seed))
    _set_weight(emb, emb.weight.detach().double() @ m)
    _set_weight(head, head.weight.detach().double() @ m)
    post_rotation = m.to(torch.float32)  # shared by every post-norm
    for b in blocks:
        for parent, name, _ in b.readers:
            reader = getattr(parent, name)
            _set_weight(reader, reader.weight.detach().double() @ m)
            if r and type(reader) is nn.Linear:  # a router stays a float weight reading the whole stream
                setattr(parent, name, TransformedLinear(reader, InputSpec(outliers=r)))
        for parent, name in b.writers:
            lin = getattr(parent, name)
            w = lin.weight.detach().double()
            if not b.post_norms:  # else the post-norm's output is rotated (RotatedPostNorm), not the writer's
                w = m.T @ w
                if lin.bias is not None:
                    lin.bias.data = (m.T @ lin.bias.detach().double()).to(lin.bias.dtype)
            if config.online:
                w = w @ hadamard_matrix(lin.in_features)
            _set_weight(lin, w)
            if config.online:
                setattr(parent, name, TransformedLinear(lin, InputSpec(hadamard=True)))
        for parent, name in b.post_norms:
            setattr(parent, name, RotatedPostNorm(getattr(parent, name), post_rotation))
    if r:  # config.hidden_size stays d (transformers checks it against the heads); the manifest records r
        residual_norms(model, d)
    state_of(model).rotation = {"outliers": r, "hidden_size": d, "rotation": config.rotation,
                                "online": config.online, "seed": config.seed}
    state_of(model).residual_map = (final_gain, m)
    log.info("rotated the residual stream (%s, %d outlier dims, online Hadamards %s)", config.rotation, r,
             config.online)
    return model


@register("step", "rotate")
class Rotate(Step):
    Config = RotateConfig
    needs_calibration = True
    needs_architecture = True

    def apply(self, model: nn.Module, calib=None) -> nn.Module:
        c = self.config
        windows = None
        if c.outliers:  # samples x seq_len windows of the calibration's source, or the windows it was given
            if getattr(calib, "tokenizer", None) is not None:
                windows = calib.draw(c.samples, c.seq_len, c.seed, model)
            elif getattr(calib, "windows", None) is not None:
                windows = calib.windows
            else:
                raise LowbitError("QUAD needs calibration data for its activation SVD: pass "
                                  "calib=lowbit.Calibration(tokenizer=tok) (WikiText-2 valid by default)")
        return rotate_model(model, c, windows)
