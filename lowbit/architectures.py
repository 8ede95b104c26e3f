"""The architecture table: everything lowbit knows about a model family, in one place.

Every step that needs more than "the Linears inside the decoder blocks" reads it here — rotation and QUAD
(which Linears read and write the residual stream, which norms sit in front of them, their gain offset),
activation quantization (the residual writers), the embeddings step (embedding scaling), calibration and the
checkpoint loaders (the MoE expert layout). No other module names a family's modules.

A family this table does not list still has its decoder Linears quantized by generic traversal (with a warning:
untested); a step that reads the table (rotate, act: ``Step.needs_architecture``) refuses it with the list of
supported families, so a model whose structure lowbit has not checked never gets a silently different function.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from torch import nn

from .errors import LowbitError
from .models import decoder_blocks
from .nn.experts import EXPERT_INPUT, EXPERT_OUTPUT, ExpertList, fused_tensors

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MoELayout:
    """transformers' fused experts: in the MLP module, a router ``router`` (float by default, weight ``(E, d)``)
    and an experts module ``experts`` holding ``gate_up (E, 2I, d)`` and ``down (E, d, I)`` parameters."""

    router: str = "gate"
    experts: str = "experts"
    gate_up: str = "gate_up_proj"
    down: str = "down_proj"


@dataclass(frozen=True)
class Architecture:
    """One family's layout (names relative to a decoder block) and the facts that change what a step may do.

    Attributes:
        family: the name users know (``"gemma2"``); model_types: transformers' ``config.model_type`` values.
        attn_readers / mlp_readers: Linears reading the normed residual stream (fused ones: ``qkv_proj``).
        attn_writer / mlp_writer: Linears writing back to the residual stream.
        attn_norm / mlp_norm: the norms in front of the readers (None: the family has none there).
        post_norms: norms on a sub-layer's output before it is added to the residual (Gemma's sandwich norms,
            OLMo 2's post-norms): their gains act on the residual stream itself.
        norm_offset: the norm computes ``(offset + γ) · x / rms(x)`` (Gemma: 1).
        embed_scale: the input embeddings are multiplied by a constant (Gemma: ``√d``).
        qk_norm: RMSNorm on queries and keys after their projections; qkv_bias: biases on q/k/v.
        sliding_window: some or all layers attend to a window; moe: the expert layout, None for a dense MLP.
        refusals: step -> why this family cannot take it (empty for every family today).

    ``qk_norm``, ``qkv_bias`` and ``sliding_window`` change no step today (q/k norms and biases act after the
    projections a rotation touches, the window inside attention); they are recorded so a step that needs them
    reads them here.
    """

    family: str
    model_types: tuple[str, ...]
    attn: str = "self_attn"
    mlp: str = "mlp"
    attn_readers: tuple[str, ...] = ("q_proj", "k_proj", "v_proj")
    attn_writer: str = "o_proj"
    mlp_readers: tuple[str, ...] = ("gate_proj", "up_proj")
    mlp_writer: str = "down_proj"
    attn_norm: str | None = "input_layernorm"
    mlp_norm: str | None = "post_attention_layernorm"
    post_norms: tuple[str, ...] = ()
    final_norm: str = "norm"
    norm_offset: float = 0.0
    embed_scale: bool = False
    qk_norm: bool = False
    qkv_bias: bool = False
    sliding_window: bool = False
    moe: MoELayout | None = None
    refusals: dict[str, str] = field(default_factory=dict)  # step -> why this family cannot take it

    def refusal(self, step: str) -> str | None:
        """Why ``step`` cannot run exactly on this family (None: it can). Every family of the table takes every
        step today; a family whose layout a step cannot handle says so here, and the step refuses with it."""
        return self.refusals.get(step)

    def check(self, step: str) -> None:
        """Raise the one-line refusal naming the family, the step and the reason."""
        reason = self.refusal(step)
        if reason:
            raise LowbitError(f"the {step} step cannot run on {self.family}: {reason}; drop it from the recipe")

    def writer_globs(self) -> tuple[str, ...]:
        """Name globs of the residual writers (the act step's W4A4/A8 writers): o_proj, down_proj (each expert's)."""
        return (f"*.{self.attn}.{self.attn_writer}", f"*.{self.mlp_writer}")


_PHI3 = dict(attn_readers=("qkv_proj",), mlp_readers=("gate_up_proj",))
_SANDWICH = ("post_attention_layernorm", "post_feedforward_layernorm")
_GEMMA = dict(norm_offset=1.0, embed_scale=True)
ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture("llama", ("llama",)),
    Architecture("mistral", ("mistral",), sliding_window=True),
    Architecture("qwen2", ("qwen2",), qkv_bias=True, sliding_window=True),
    Architecture("qwen3", ("qwen3",), qk_norm=True, sliding_window=True),
    Architecture("gemma", ("gemma",), **_GEMMA),
    Architecture("gemma2", ("gemma2",), mlp_norm="pre_feedforward_layernorm", post_norms=_SANDWICH,
                 sliding_window=True, **_GEMMA),
    Architecture("gemma3", ("gemma3_text",), mlp_norm="pre_feedforward_layernorm", post_norms=_SANDWICH,
                 qk_norm=True, sliding_window=True, **_GEMMA),
    Architecture("phi3", ("phi3",), sliding_window=True, **_PHI3),
    Architecture("olmo2", ("olmo2",), attn_norm=None, mlp_norm=None, post_norms=_SANDWICH, qk_norm=True),
    Architecture("qwen3_moe", ("qwen3_moe",), qk_norm=True, sliding_window=True, moe=MoELayout(), mlp_readers=()),
    Architecture("mixtral", ("mixtral",), sliding_window=True, moe=MoELayout(), mlp_readers=()),
)
BY_MODEL_TYPE = {t: a for a in ARCHITECTURES for t in a.model_types}


def supported() -> str:
    return ", ".join(a.family for a in ARCHITECTURES)


def architecture(model: nn.Module) -> Architecture:
    """The table entry of ``model`` (by ``config.model_type``), or a clear error naming the supported families."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return by_model_type(model_type or type(model).__name__)


def by_model_type(model_type: str) -> Architecture:
    """The table entry of a ``config.model_type``, or the error naming the supported families."""
    arch = BY_MODEL_TYPE.get(model_type)
    if arch is None:
        raise LowbitError(f"architecture {model_type!r} is not supported; lowbit supports {supported()} (ask for "
                          "yours with its config.json attached)")
    return arch


def check_family(model_type: str, steps: list) -> Architecture | None:
    """The table entry of ``model_type``; for a family outside the table, the error naming the supported families
    when one of ``steps`` (recipe steps) reads the table, else None with a warning: steps that only quantize the
    Linears inside the decoder blocks run on any family, by generic traversal."""
    if model_type in BY_MODEL_TYPE:
        return BY_MODEL_TYPE[model_type]
    if any(getattr(s, "needs_architecture", False) for s in steps):
        by_model_type(model_type)  # raises, naming the supported families
    log.warning("architecture %r is not in lowbit's table (%s): its decoder Linears are quantized by generic "
                "traversal, untested on this family; rotate and act steps refuse it", model_type, supported())
    return None


def known(model: nn.Module) -> Architecture | None:
    """The table entry of ``model``, or None for a family outside the table."""
    return BY_MODEL_TYPE.get(getattr(getattr(model, "config", None), "model_type", None))


def moe_blocks(model: nn.Module) -> list[nn.Module]:
    """The MLP module of every decoder block of an MoE family (empty for a dense one or one outside the table)."""
    arch = known(model)
    if arch is None or arch.moe is None:
        return []
    return [getattr(b, arch.mlp) for b in decoder_blocks(model)[1]]


def unfuse_experts(model: nn.Module) -> int:
    """Replace every fused experts module by an :class:`ExpertList` holding the same weights (in place; a no-op
    for a dense family or experts already unfused). Returns the number of experts now held as Linears."""
    arch, count = known(model), 0
    for mlp in moe_blocks(model):
        fused = getattr(mlp, arch.moe.experts)
        if not isinstance(fused, ExpertList):
            gate_up, down = getattr(fused, arch.moe.gate_up), getattr(fused, arch.moe.down)
            if not (isinstance(gate_up, nn.Parameter) and gate_up.dim() == 3 and down.dim() == 3):
                raise LowbitError(f"{arch.family}'s experts are not in the fused (E, 2I, d) layout lowbit reads; "
                                  f"this transformers ({type(fused).__name__}) changed it")
            unfused = ExpertList.from_fused(gate_up, down, fused.act_fn)
            unfused.fused_class = type(fused)  # what fuse_experts rebuilds (not saved: a skeleton has it again)
            setattr(mlp, arch.moe.experts, unfused)
        count += len(getattr(mlp, arch.moe.experts))
    return count


def fuse_experts(model: nn.Module) -> None:
    """Undo :func:`unfuse_experts` on a float model (every expert an ``nn.Linear`` again): transformers' fused
    module with the stacked weights, so ``save_pretrained`` writes the layout transformers loads."""
    arch = known(model)
    for mlp in moe_blocks(model):  # none unless the table knows the family as an MoE one
        experts = getattr(mlp, arch.moe.experts)
        if not isinstance(experts, ExpertList):
            continue
        layers = [m for e in experts for m in (e.gate_up_proj, e.down_proj)]
        if any(type(m) is not nn.Linear for m in layers):
            raise LowbitError("the experts hold packed or rotated layers; merge them to float first (lowbit merge)")
        gate_up, down = fused_tensors(experts, layers[0].weight.dtype)
        fused = experts.fused_class(model.config).to(gate_up.device)
        getattr(fused, arch.moe.gate_up).data = gate_up
        getattr(fused, arch.moe.down).data = down
        setattr(mlp, arch.moe.experts, fused)


def expert_lists(model: nn.Module) -> dict[str, ExpertList]:
    """``{qualified name: ExpertList}`` of the unfused experts of the model."""
    return {n: m for n, m in model.named_modules() if isinstance(m, ExpertList)}


def expert_layer_names(model: nn.Module, names) -> list[str]:
    """Those of the layer ``names`` that lie inside an MoE expert (the experts are found once)."""
    prefixes = tuple(f"{n}." for n in expert_lists(model))
    return [n for n in names if prefixes and n.startswith(prefixes)]


@dataclass
class BlockParts:
    """The residual-stream view of one decoder block: its norms and the Linears (or a router's weight holder)
    reading and writing the stream, as ``(parent module, attribute name)`` pairs."""

    attn_norm: nn.Module | None
    mlp_norm: nn.Module | None
    readers: list[tuple[nn.Module, str, nn.Module | None]]  # (parent, attribute, norm in front of it)
    writers: list[tuple[nn.Module, str]]
    post_norms: list[tuple[nn.Module, str]]  # norms between a writer and the residual stream (Gemma 2, OLMo 2)
    inputs: list[nn.Module]  # one reader per sub-layer (attention, MLP): its input is what the sub-layer reads


def block_parts(model: nn.Module, block: nn.Module) -> BlockParts:
    """:class:`BlockParts` of ``block`` per the table (MoE: the router and every expert's gate_up read, every
    expert's down writes; the experts must be unfused). Missing modules are a clear error."""
    arch = architecture(model)
    try:
        attn, mlp = getattr(block, arch.attn), getattr(block, arch.mlp)
        attn_norm = getattr(block, arch.attn_norm) if arch.attn_norm else None
        mlp_norm = getattr(block, arch.mlp_norm) if arch.mlp_norm else None
        readers = [(attn, n, attn_norm) for n in arch.attn_readers]
        writers = [(attn, arch.attn_writer)]
        if arch.moe is not None:
            experts = getattr(mlp, arch.moe.experts)
            if not isinstance(experts, ExpertList):
                raise LowbitError(f"{arch.family}'s experts must be unfused first (lowbit.architectures."
                                  "unfuse_experts)")
            readers += [(mlp, arch.moe.router, mlp_norm)] + [(e, EXPERT_INPUT, mlp_norm) for e in experts]
            writers += [(e, EXPERT_OUTPUT) for e in experts]
        else:
            readers += [(mlp, n, mlp_norm) for n in arch.mlp_readers]
            writers.append((mlp, arch.mlp_writer))
        post_norms = [(block, n) for n in arch.post_norms]
        for parent, name, *_ in readers + writers + post_norms:
            getattr(parent, name)
        inputs = [getattr(attn, arch.attn_readers[0]),
                  getattr(mlp, arch.moe.router) if arch.moe is not None else getattr(mlp, arch.mlp_readers[0])]
    except AttributeError as e:
        raise LowbitError(f"{type(model).__name__} does not have the {arch.family} layout lowbit's table expects "
                          f"({e}); this transformers version changed it") from e
    return BlockParts(attn_norm, mlp_norm, readers, writers, post_norms, inputs)


def final_norm(model: nn.Module) -> nn.Module:
    return getattr(model.get_decoder(), architecture(model).final_norm)


def residual_norm_names(model: nn.Module) -> tuple[str, ...]:
    """Attribute names (in a block) of the norms in front of residual readers."""
    arch = architecture(model)
    return tuple(n for n in (arch.attn_norm, arch.mlp_norm) if n)
