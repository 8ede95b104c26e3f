"""What every weight quantizer shares: the config fields, target selection and the apply loop."""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import StepConfig
from ..errors import LowbitError
from ..formats import SCALE_SEARCHES, Format, format_family_names, get_format
from ..models import DECODER, decoder_blocks, find_linears, set_module
from ..nn.input_transform import TransformedLinear
from ..nn.qlinear import QLinear, carried_parts, packable_weight, packed_linear
from ..qtensor import GRANULARITIES, QuantizedWeight, check_group_size

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GridConfig(StepConfig):
    """The value grid and what shares one scale: fields every step that stores packed weights takes."""

    format: str = "int"  # value grid family: int | nf | fp4 | fp8
    bits: int = 4  # code bits per weight, 1..8
    granularity: str = "group"  # tensor | channel | group: what shares one scale
    group_size: int = 128  # input columns per scale when granularity == "group"; positive multiple of 8
    symmetric: bool = False  # int only: scale-only grid (no zero point)
    scale_search: str = "minmax"  # minmax | mse: also try clipped ranges, keep the least-error scale per group
    scale_steps: int = 0  # >0: scales are multiples 1..n of one power-of-two step per 256 columns (K-quants)

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.scale_steps, int) or not 0 <= self.scale_steps <= 127:
            raise LowbitError(f"scale_steps must be an integer in 0..127 (0: free fp16 scales), "
                              f"got {self.scale_steps!r}")
        if self.scale_steps and (self.granularity != "group" or 256 % self.group_size or not self.symmetric):
            raise LowbitError("scale_steps (K-quant super-block scales) needs a symmetric grid in groups that divide "
                              f"256 columns, got {self.granularity} g{self.group_size} symmetric={self.symmetric}")
        if self.format not in format_family_names():
            raise LowbitError(f"unknown format {self.format!r}; known formats: {', '.join(format_family_names())}")
        if self.granularity not in GRANULARITIES:
            raise LowbitError(f"granularity must be one of {', '.join(GRANULARITIES)}, got {self.granularity!r}")
        if self.granularity == "group":
            check_group_size(self.group_size)
        if self.scale_search not in SCALE_SEARCHES:
            raise LowbitError(f"scale_search must be one of {', '.join(SCALE_SEARCHES)}, got {self.scale_search!r}")
        self.make_format()  # validates bits for the family

    def describe(self) -> str:
        where = f"g{self.group_size}" if self.granularity == "group" else self.granularity
        rest = super().describe().partition("(")[2].rstrip(")")
        extra = [p for p in rest.split(", ") if p and not p.startswith(("format=", "bits=", "group_size=",
                                                                        "granularity=", "symmetric="))]
        return f"{self.step}({', '.join([f'{self.make_format().name} {where}', *extra])})"

    def make_format(self) -> Format:
        return get_format(self.format, self.bits, self.symmetric)


@dataclass(frozen=True)
class QuantizerConfig(GridConfig):
    """Fields every weight quantizer takes: the grid plus which Linear layers it replaces."""

    targets: tuple[str, ...] = (DECODER,)  # module-name globs / "re:" regexes; "@decoder" = Linears in blocks
    ignore: tuple[str, ...] = ()  # patterns removed from the targets

    def __post_init__(self):
        super().__post_init__()
        if not self.targets:
            raise LowbitError("targets is empty: name the layers to quantize, e.g. targets=['@decoder']")


def check_finite(targets: list[tuple[str, nn.Module]]) -> None:
    """Refuse weights holding NaN or Inf before any work starts, naming the first such layer."""
    for name, module in targets:
        w = module.weight.detach()
        if not torch.isfinite(w).all():
            bad = int((~torch.isfinite(w)).sum())
            raise LowbitError(f"layer {name!r} has {bad} NaN/Inf weight(s): quantizing it would store garbage; "
                              "fix or reload the model (or add the layer to ignore=[...])")


@dataclass
class Target:
    """One float Linear a step turns into a packed layer (the driver's unit of work)."""

    name: str
    layer: nn.Module  # nn.Linear, a switched head, or a TransformedLinear (rotated / QUAD-split input)

    def weight(self) -> torch.Tensor:
        """``(out, in - r)`` fp32: the columns the packed weight holds (:func:`lowbit.nn.qlinear.packable_weight`)."""
        return packable_weight(self.layer)

    @property
    def columns(self) -> int:
        """Input columns the packed weight holds (``in - r``)."""
        return self.layer.in_features - (self.layer.spec.outliers if isinstance(self.layer, TransformedLinear) else 0)


def select_targets(model: nn.Module, targets, ignore, within=None) -> list[Target]:
    """The float Linears a step replaces (:func:`lowbit.models.find_linears`: one selection rule), checked finite.

    ``within``: a name filter (one decoder block, or the parts outside the blocks) for a step that runs part by
    part (streamed); the selection is then not checked for patterns that match nothing, since the whole
    selection was checked before the first part (:meth:`Step.check`)."""
    chosen = find_linears(model, targets, ignore, strict=within is None)
    if within is not None:
        chosen = [(n, m) for n, m in chosen if within(n)]
    check_finite(chosen)
    return [Target(n, m) for n, m in chosen]


def install(model: nn.Module, target: Target, qweight, role: str = "linear",
            adapters: nn.ModuleDict | None = None) -> QLinear:
    """Put the packed replacement of ``target`` in its place: the packed weight plus whatever the layer carried
    (bias, input transform, QUAD's float columns; :func:`lowbit.nn.qlinear.carried_parts`) and ``adapters``."""
    parts = carried_parts(target.layer)
    if adapters is not None:
        parts["adapters"] = adapters
    layer = packed_linear(qweight, role=role, **parts)
    set_module(model, target.name, layer)
    return layer


class Step(ABC):
    """A recipe step: ``apply(model, calib)`` changes the model in place and returns it.

    A step that ``streams`` can also run on a model streamed from its shards (a model larger than memory): the
    driver calls :meth:`check` on the empty model, then :meth:`apply_block` once per decoder block while only
    that block is filled, then :meth:`apply_rest` with the parts outside the blocks (embeddings, final norm,
    head) filled. Its result is the same as :meth:`apply`'s."""

    Config: type[StepConfig]
    needs_calibration: bool = False  # True when apply() reads calibration windows
    needs_architecture: bool = False  # True when apply() reads the architecture table (a family outside it: refused)
    streams: bool = False  # True when apply_block / apply_rest do apply()'s work one part at a time
    # True when the step's calibration passes run at the Calibration's precision (bf16 where native; measured for
    # GPTQ): the others calibrate in fp32, and a streamed recipe in bf16 only when all of its steps allow it
    follows_precision: bool = False

    def __init__(self, config: StepConfig):
        self.config = config

    def prepare(self, model: nn.Module, calib=None) -> None:
        """Runs on the float model before any step of the recipe applies (default: nothing)."""
        return None

    @abstractmethod
    def apply(self, model: nn.Module, calib=None) -> nn.Module: ...

    def check(self, model: nn.Module) -> None:
        """Streamed: refuse what :meth:`apply` would refuse, on the model whose weights are still empty."""
        return None

    def apply_block(self, model: nn.Module, prefix: str, collect) -> None:
        """Streamed: this step's work on the decoder block whose names start with ``prefix`` (the only one
        filled); ``collect(names)`` gives those Linears' calibration statistics. Default: nothing."""
        return None

    def apply_rest(self, model: nn.Module, calib=None) -> None:
        """Streamed: this step's work outside the decoder blocks (whose layers are then empty). Default: nothing."""
        return None

    def outside_blocks(self, model: nn.Module) -> bool:
        """Streamed: whether :meth:`apply_rest` changes anything (else the parts outside the blocks are copied to
        the checkpoint one tensor at a time, never all in memory). Default: no."""
        return False


class Quantizer(Step):
    """A weight quantizer: turns each target ``nn.Linear`` into a :class:`QLinear`."""

    Config = QuantizerConfig
    needs: tuple[str, ...] = ()  # calibration statistics it needs per layer (e.g. "hessian")

    def __init__(self, config: QuantizerConfig):
        super().__init__(config)
        self.fmt = config.make_format()

    @abstractmethod
    def quantize(self, weight: torch.Tensor, stats=None) -> QuantizedWeight:
        """Quantize one float weight ``(out, in)``."""

    streams = True

    def apply(self, model: nn.Module, calib=None) -> nn.Module:
        targets = select_targets(model, self.config.targets, self.config.ignore)
        self._install_all(model, targets)
        log.info("quantized %d layers with %s %s", len(targets), self.config.step, self.fmt.name)
        return model

    def _install_all(self, model: nn.Module, targets: list[Target]) -> None:
        for target in tqdm(targets, desc=f"{self.config.step} {self.fmt.name}", unit="layer", leave=False):
            install(model, target, self.quantize(target.weight()))

    def check(self, model: nn.Module) -> None:
        find_linears(model, self.config.targets, self.config.ignore)  # a pattern matching nothing is an error

    def apply_block(self, model: nn.Module, prefix: str, collect) -> None:
        self._install_all(model, select_targets(model, self.config.targets, self.config.ignore,
                                                within=lambda name: name.startswith(prefix)))

    def apply_rest(self, model: nn.Module, calib=None) -> None:
        blocks = decoder_blocks(model)[0] + "."
        self._install_all(model, select_targets(model, self.config.targets, self.config.ignore,
                                                within=lambda name: not name.startswith(blocks)))

    def outside_blocks(self, model: nn.Module) -> bool:
        return targets_outside_blocks(model, self.config.targets, self.config.ignore)


def targets_outside_blocks(model: nn.Module, targets, ignore) -> bool:
    """Whether a selection holds a Linear outside the decoder blocks (e.g. ``lm_head``)."""
    blocks = decoder_blocks(model)[0] + "."
    return any(not name.startswith(blocks) for name, _ in find_linears(model, targets, ignore, strict=False))
