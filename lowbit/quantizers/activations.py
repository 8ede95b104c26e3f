"""The ``act`` recipe step: per-token activation quantization of every decoder Linear's input (W4A4, W4A4/A8).

It runs after the transform and weight steps (``[rotate, gptq(w4 channel sym), act]``) and sets the
:class:`~lowbit.quantizers.act.ActQuantConfig` of each selected layer's :class:`InputSpec`: ``bits`` for the
residual readers (q/k/v, gate/up), ``writer_bits`` for the inputs of the writers (o_proj, down_proj; 8 in QUAD's
W4A4/A8 mode). QUAD's full-precision outlier coordinates are never quantized. A float layer (no weight step
before) becomes a :class:`TransformedLinear`, so activations can be quantized alone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from torch import nn

from ..errors import LowbitError
from ..models import DECODER, decoder_blocks, matches, set_module
from ..nn.gemv_linear import FLOAT_LINEARS
from ..nn.input_transform import InputSpec, TransformedLinear
from ..nn.qlinear import QLinear
from ..recipe import StepConfig
from ..registry import register
from .act import ActQuantConfig
from .base import Step

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ActivationsConfig(StepConfig):
    step = "act"
    bits: int = 4  # per-token bits of the readers' inputs
    writer_bits: int = 0  # per-token bits of the writers' inputs (0 = same as bits; 8 = W4A4/A8)
    clip_ratio: float = 0.9
    writers: tuple[str, ...] = ("*.o_proj", "*.down_proj")  # name globs of the residual writers
    targets: tuple[str, ...] = (DECODER,)
    ignore: tuple[str, ...] = ()

    def __post_init__(self):
        super().__post_init__()
        self.quantizer(writer=False)
        self.quantizer(writer=True)

    def quantizer(self, writer: bool) -> ActQuantConfig:
        bits = self.writer_bits if writer and self.writer_bits else self.bits
        return ActQuantConfig(bits=bits, clip_ratio=self.clip_ratio)


def _layers(model: nn.Module, c: ActivationsConfig) -> list[tuple[str, nn.Module]]:
    prefix = decoder_blocks(model)[0] if DECODER in c.targets else None
    kinds = (*FLOAT_LINEARS, TransformedLinear, QLinear)
    layers = [(n, m) for n, m in model.named_modules() if type(m) in kinds and getattr(m, "role", "linear") == "linear"]
    chosen = [(n, m) for n, m in layers if any(matches(n, p, prefix) for p in c.targets)
              and not any(matches(n, p, prefix) for p in c.ignore)]
    if not chosen:
        raise LowbitError(f"act: targets={list(c.targets)} select no Linear layer")
    return chosen


@register("step", "act")
class Activations(Step):
    Config = ActivationsConfig

    def apply(self, model: nn.Module, calib=None) -> nn.Module:
        c = self.config
        layers = _layers(model, c)
        for name, m in layers:
            act = c.quantizer(writer=any(matches(name, p, None) for p in c.writers))
            if isinstance(m, QLinear):
                m.spec = (m.spec or InputSpec()).with_act(act)
            elif isinstance(m, TransformedLinear):
                m.spec = m.spec.with_act(act)
            else:
                set_module(model, name, TransformedLinear(m, InputSpec(act=act)))
        log.info("act: per-token int%d inputs on %d layers (writers int%d)", c.bits, len(layers),
                 c.writer_bits or c.bits)
        return model
