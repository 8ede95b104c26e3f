"""Rotating the residual stream of a LLaMA-style decoder: QuaRot (methods.md §3.6) and QUAD (§7.2) in one step.

The float model is changed in place and computes the same function (logits within float rounding):

1. Untie the LM head; fold every RMSNorm gain ``γ`` into the Linears that read the norm's output
   (``W ← W diag(γ)``: q/k/v, gate/up, and the head for the final norm) and set ``γ = 1``.
2. ``M (d, d + r)``: QuaRot (``r = 0``) uses a randomized Hadamard ``H·D``; QUAD uses ``Q_P = [P | I - P Pᵀ]``
   with ``P (d, r)`` the top ``r`` eigenvectors of the Gram matrix ``G = E[xᵀx]`` of every norm output of every
   block on calibration windows (WikiText-2 valid), followed by ``block_diag(H_r, H_d)``. ``M Mᵀ = I_d``.
3. Residual readers ``W ← W M`` (q, k, v, gate, up, head), writers ``W ← Mᵀ W`` (o, down; biases too) and the
   embedding ``E ← E M``: the residual stream becomes ``h M``, ``d + r`` wide, its first ``r`` coordinates the
   outlier directions. RMSNorm is invariant (``‖h M‖ = ‖h‖``) but must keep dividing by the original ``d``
   (:class:`ResidualRMSNorm`).
4. Online Hadamards before o_proj and down_proj (``x ← x H``, ``W ← W H``), so their inputs are rotated too.

Readers become :class:`~lowbit.nn.input_transform.TransformedLinear` with ``outliers = r`` (their first ``r``
input columns stay float when a weight quantizer runs next); o_proj/down_proj with ``hadamard = True``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from ..config import StepConfig
from ..errors import LowbitError
from ..kernels.hadamard import hadamard_matrix, rotation_matrix
from ..models import decoder_blocks
from ..nn.gemv_linear import is_float_linear
from ..nn.input_transform import InputSpec, TransformedLinear
from ..quantizers.base import Step
from ..registry import register
from ..state import state_of
from .quad import ResidualRMSNorm, norm_gram, projection, residual_norms

log = logging.getLogger(__name__)

ROTATIONS = ("hadamard", "random", "none")
ATTN_READERS, MLP_READERS = ("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")


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
    d, kw = emb.weight.shape[1], {"device": emb.weight.device, "dtype": emb.weight.dtype}
    model.set_input_embeddings(nn.Embedding(emb.num_embeddings, d + outliers, emb.padding_idx, **kw))
    model.set_output_embeddings(nn.Linear(d + outliers, head.out_features, bias=head.bias is not None, **kw))
    for b in blocks:
        for parent, names, reader in ((b.attn, ATTN_READERS, True), (b.mlp, MLP_READERS, True),
                                      (b.attn, ("o_proj",), False), (b.mlp, ("down_proj",), False)):
            for name in names:
                old = getattr(parent, name)
                shape = (old.in_features + outliers, old.out_features) if reader else \
                    (old.in_features, old.out_features + outliers)
                setattr(parent, name, nn.Linear(*shape, bias=old.bias is not None, **kw))
    residual_norms(model, d)


@dataclass
class _Block:
    attn_norm: nn.Module
    attn: nn.Module
    mlp_norm: nn.Module
    mlp: nn.Module


def _layout(model: nn.Module) -> tuple[nn.Embedding, list[_Block], nn.Module, nn.Linear]:
    """``(embedding, blocks, final norm, head)`` of a LLaMA-style model, or a clear error."""
    _, blocks = decoder_blocks(model)
    out = []
    for i, b in enumerate(blocks):
        names = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")
        if not all(hasattr(b, n) for n in names) or \
                not all(hasattr(b.self_attn, n) for n in (*ATTN_READERS, "o_proj")) or \
                not all(hasattr(b.mlp, n) for n in (*MLP_READERS, "down_proj")):
            raise LowbitError(f"rotation needs LLaMA-style blocks (input_layernorm, self_attn.q/k/v/o_proj, "
                              f"post_attention_layernorm, mlp.gate/up/down_proj); block {i} of "
                              f"{type(model).__name__} is not one")
        out.append(_Block(b.input_layernorm, b.self_attn, b.post_attention_layernorm, b.mlp))
        if not isinstance(b.input_layernorm, ResidualRMSNorm):  # checked before anything changes
            _check_norm(b.input_layernorm)
            _check_norm(b.post_attention_layernorm)
    backbone = model.get_decoder()
    head = model.get_output_embeddings()
    if not is_float_linear(head) or not hasattr(backbone, "norm"):
        raise LowbitError("rotation needs a float nn.Linear LM head and a final norm: run the rotate step before "
                          "any quantizer (and before the embeddings step)")
    for b in out:
        for m in (*(getattr(b.attn, n) for n in (*ATTN_READERS, "o_proj")),
                  *(getattr(b.mlp, n) for n in (*MLP_READERS, "down_proj"))):
            if type(m) is not nn.Linear:
                raise LowbitError("rotation runs on the float model: put the rotate step first in the recipe")
    return model.get_input_embeddings(), out, backbone.norm, head


def _untie_head(model: nn.Module, emb: nn.Embedding, head: nn.Linear) -> None:
    if head.weight is emb.weight or head.weight.data_ptr() == emb.weight.data_ptr():
        head.weight = nn.Parameter(emb.weight.detach().clone(), requires_grad=False)
    if getattr(model.config, "tie_word_embeddings", False):
        model.config.tie_word_embeddings = False


def _check_norm(norm: nn.Module) -> None:
    """Refuse a norm that is not ``γ · x / rms(x)`` (its gain could not be folded into the next Linears)."""
    gain = norm.weight.detach()
    if gain.is_meta:  # a skeleton being widened for loading: nothing to fold
        return
    x = torch.randn(2, gain.shape[0], dtype=gain.dtype, device=gain.device)
    plain = gain * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + getattr(norm, "variance_epsilon", 1e-6))
    with torch.no_grad():
        same = torch.allclose(norm(x), plain, rtol=1e-3, atol=1e-3)
    if not same:
        raise LowbitError(f"rotation folds RMSNorm gains into the next Linears, which needs a norm computing "
                          f"γ·x/rms(x) (LLaMA, Mistral, Qwen2); {type(norm).__name__} computes something else "
                          "(e.g. Gemma's (1 + γ)) and is not supported")


def _fold_gain(norm: nn.Module, readers: list[nn.Linear]) -> None:
    """``W ← W diag(γ)`` for each reader, then ``γ = 1``."""
    gain = norm.weight.detach().double()
    for lin in readers:
        lin.weight.data = (lin.weight.detach().double() * gain).to(lin.weight.dtype)
    norm.weight.data.fill_(1.0)


def _rotation(n: int, kind: str, seed: int) -> torch.Tensor:
    return torch.eye(n, dtype=torch.float64) if kind == "none" or n == 0 else rotation_matrix(n, kind, seed)


def _set_weight(lin: nn.Linear, w: torch.Tensor) -> None:
    lin.weight = nn.Parameter(w.to(lin.weight.dtype).contiguous(), requires_grad=lin.weight.requires_grad)
    lin.out_features, lin.in_features = w.shape


@torch.no_grad()
def rotate_model(model: nn.Module, config: RotateConfig, windows: torch.Tensor | None = None) -> nn.Module:
    """Apply the transform (module docstring) in place; ``windows (n, L)`` token ids feed QUAD's SVD."""
    emb, blocks, final_norm, head = _layout(model)
    d, r = emb.weight.shape[1], config.outliers
    if r >= d:
        raise LowbitError(f"outliers={r} must be smaller than the hidden size {d}")
    _untie_head(model, emb, head)
    for b in blocks:
        _fold_gain(b.attn_norm, [getattr(b.attn, n) for n in ATTN_READERS])
        _fold_gain(b.mlp_norm, [getattr(b.mlp, n) for n in MLP_READERS])
    _fold_gain(final_norm, [head])
    if r:
        if windows is None:
            raise LowbitError("QUAD (outliers > 0) needs calibration windows for its activation SVD")
        m = projection(norm_gram(model, [n for b in blocks for n in (b.attn_norm, b.mlp_norm)], windows), r)
    else:
        m = torch.eye(d, dtype=torch.float64)
    m = m @ torch.block_diag(_rotation(r, config.rotation, config.seed + 1), _rotation(d, config.rotation,
                                                                                        config.seed))
    emb.weight.data = (emb.weight.detach().double() @ m).to(emb.weight.dtype)
    emb.embedding_dim = d + r
    _set_weight(head, head.weight.detach().double() @ m)
    for b in blocks:
        for lin in [*(getattr(b.attn, n) for n in ATTN_READERS), *(getattr(b.mlp, n) for n in MLP_READERS)]:
            _set_weight(lin, lin.weight.detach().double() @ m)
        for parent, name in ((b.attn, "o_proj"), (b.mlp, "down_proj")):
            lin = getattr(parent, name)
            w = m.T @ lin.weight.detach().double()
            if lin.bias is not None:
                lin.bias.data = (m.T @ lin.bias.detach().double()).to(lin.bias.dtype)
            if config.online:
                w = w @ hadamard_matrix(lin.in_features)
            _set_weight(lin, w)
            if config.online:
                setattr(parent, name, TransformedLinear(lin, InputSpec(hadamard=True)))
        if r:
            for parent, names in ((b.attn, ATTN_READERS), (b.mlp, MLP_READERS)):
                for name in names:
                    setattr(parent, name, TransformedLinear(getattr(parent, name), InputSpec(outliers=r)))
    if r:  # config.hidden_size stays d (transformers checks it against the heads); the manifest records r
        residual_norms(model, d)
    state_of(model).rotation = {"outliers": r, "hidden_size": d, "rotation": config.rotation,
                                "online": config.online, "seed": config.seed}
    log.info("rotated the residual stream (%s, %d outlier dims, online Hadamards %s)", config.rotation, r,
             config.online)
    return model


@register("step", "rotate")
class Rotate(Step):
    Config = RotateConfig
    needs_calibration = True

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
