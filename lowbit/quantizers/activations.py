"""The ``act`` recipe step: per-token activation quantization of every decoder Linear's input (W4A4, W4A4/A8).

It runs after the transform and weight steps (``[rotate, gptq(w4 channel sym), act]``) and sets the
:class:`~lowbit.formats.act.ActQuantConfig` of each selected layer's :class:`InputSpec`: ``bits`` for the
residual readers (q/k/v, gate/up), ``writer_bits`` for the inputs of the writers (o_proj, down_proj; 8 in QUAD's
W4A4/A8 mode). QUAD's full-precision outlier coordinates are never quantized. A float layer (no weight step
before) becomes a :class:`TransformedLinear`, so activations can be quantized alone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from torch import nn

from ..architectures import architecture
from ..config import StepConfig
from ..formats.act import ActQuantConfig
from ..models import DECODER, matches, select_layers, set_module
from ..nn.gemv_linear import FLOAT_LINEARS
from ..nn.input_transform import InputSpec, TransformedLinear
from ..nn.qlinear import QLinear
from ..registry import register
from .base import Step

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ActivationsConfig(StepConfig):
    step = "act"
    bits: int = 4  # per-token bits of the readers' inputs
    writer_bits: int = 0  # per-token bits of the writers' inputs (0 = same as bits; 8 = W4A4/A8)
    clip_ratio: float = 0.9
    writers: tuple[str, ...] = ()  # name globs of the residual writers (empty: the architecture table's)
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
    return select_layers(model, c.targets, c.ignore, (*FLOAT_LINEARS, TransformedLinear, QLinear),
                         lambda m: getattr(m, "role", "linear") == "linear", what="Linear layer")


@register("step", "act")
class Activations(Step):
    Config = ActivationsConfig
    needs_architecture = True  # the residual writers (W4A4/A8) come from the table

    def apply(self, model: nn.Module, calib=None) -> nn.Module:
        c = self.config
        layers = _layers(model, c)
        writers = c.writers or architecture(model).writer_globs()
        for name, m in layers:
            act = c.quantizer(writer=any(matches(name, p, None) for p in writers))
            if isinstance(m, QLinear):
                m.spec = (m.spec or InputSpec()).with_act(act)
            elif isinstance(m, TransformedLinear):
                m.spec = m.spec.with_act(act)
            else:
                set_module(model, name, TransformedLinear(m, InputSpec(act=act)))
        log.info("act: per-token int%d inputs on %d layers (writers int%d)", c.bits, len(layers),
                 c.writer_bits or c.bits)
        return model
