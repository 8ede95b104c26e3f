"""The ``embeddings`` step: token embeddings (and the output head) stored packed, by round-to-nearest.

Decoder-layer quantizers leave the embedding table and the LM head in float. On small models that table is a
large share of the weights (SmolLM2-135M: 28M of 135M parameters, 113 MB in fp32) and, tied to the head, it is
read in full for every generated token. This step packs it (int8, one symmetric scale per row by default) into
a :class:`~lowbit.nn.QEmbedding`; a tied head becomes a :class:`~lowbit.QLinear` (``role="head"``) holding the
very same buffers, so the table is stored and read once. An untied head is quantized on its own with the same
grid. Compose it with any preset: ``rtn-w2g64+emb8``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from ..architectures import known
from ..errors import LowbitError
from ..models import module_name, set_module
from ..nn.gemv_linear import is_float_linear
from ..nn.qembedding import QEmbedding
from ..registry import register
from .base import GridConfig, Step, Target, check_finite, install
from .rtn import rtn_quantize

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbeddingsConfig(GridConfig):
    """int8 with one symmetric scale per embedding row (8.03 bits/weight at width 576) unless told otherwise."""

    step = "embeddings"
    bits: int = 8
    granularity: str = "channel"
    symmetric: bool = True
    head: bool = True  # also quantize the output head (shares the table when the model ties them)


def embedding_scale(model: nn.Module, embed: nn.Module) -> float:
    """The constant the input embeddings are multiplied by (the architecture table says whether there is one:
    Gemma's ``embed_scale``); anything but an ``nn.Embedding`` (scaled or not) is refused."""
    arch = known(model)  # a family outside the table: a plain nn.Embedding is all this step accepts
    scaled = arch is not None and arch.embed_scale
    if not isinstance(embed, nn.Embedding) or (type(embed) is not nn.Embedding and not scaled):
        raise LowbitError(f"the embeddings step needs an nn.Embedding input table, {type(model).__name__} has "
                          f"{type(embed).__name__}; drop the step from the recipe")
    if not scaled:
        return 1.0
    value = getattr(embed, "embed_scale", None)
    if value is None:
        raise LowbitError(f"{arch.family}'s embeddings should carry embed_scale and "
                          f"{type(embed).__name__} does not; this transformers changed them")
    return float(torch.as_tensor(value).to(embed.weight.dtype))


@register("step", "embeddings")
class QuantizeEmbeddings(Step):
    Config = EmbeddingsConfig
    streams = True  # its work is all outside the decoder blocks

    def apply_rest(self, model: nn.Module, calib=None) -> None:
        self.apply(model, calib)

    def outside_blocks(self, model: nn.Module) -> bool:
        return True

    def apply(self, model: nn.Module, calib=None) -> nn.Module:
        c = self.config
        fmt = c.make_format()
        embed = model.get_input_embeddings()
        if isinstance(embed, QEmbedding):
            raise LowbitError("the input embeddings are already quantized; the recipe has the embeddings step twice")
        scale = embedding_scale(model, embed)
        head = model.get_output_embeddings()
        head = head if is_float_linear(head) else None  # already quantized by a quantizer's targets, or none
        tied = head is not None and head.weight is embed.weight
        if tied and getattr(model.config, "tie_word_embeddings", False):
            model.config.tie_word_embeddings = False  # lowbit ties packed buffers itself; HF must not re-tie
        if not c.head:
            head = None  # a tied head keeps the float table as its own weight
        embed_name = module_name(model, embed)
        check_finite([(embed_name, embed)] + ([] if head is None or tied else [(module_name(model, head), head)]))

        g = c.group_size if c.granularity == "group" else embed.embedding_dim
        table = rtn_quantize(embed.weight.detach().float(), fmt, c.granularity, g, c.scale_search, c.scale_steps)
        if head is not None:
            head_name = module_name(model, head)
            qhead = table if tied else rtn_quantize(head.weight.detach().float(), fmt, c.granularity,
                                                    c.group_size if c.granularity == "group" else head.in_features,
                                                    c.scale_search, c.scale_steps)
            install(model, Target(head_name, head), qhead, role="head")  # unties the float weights
        set_module(model, embed_name, QEmbedding(table, embed.padding_idx, scale))
        log.info("embeddings %s%s: %.2f bits/weight", fmt.name, " (tied head shares it)" if tied else "",
                 table.bits_per_weight)
        return model
