"""Block-wise reconstruction (issue 23; EfficientQAT's Block-AP, AutoRound): after a weight quantizer packs a
decoder block, train that block's quantization against the float block's outputs, then feed the trained block's
outputs to the next block.

For each decoder block, on the calibration windows ``X`` (what the already trained blocks before it produce):

1. the float block's outputs ``Y = f(X)`` are the target;
2. the start quantizer (GPTQ by default, any uniform-integer quantizer that works block by block) packs the
   block's Linears;
3. every packed Linear becomes a :class:`RelaxedLinear`: a latent code per weight, ``q̃ = q + clamp(w/s + z − q,
   ±0.49)`` — the packed code ``q`` moved towards where the float weight ``w`` lies, so it still rounds to ``q``
   but a weight GPTQ left near a cell edge needs only a small push to change code — plus a trainable offset ``v``
   (in grid steps), rounded with a straight-through estimator, and a trainable multiplier ``m`` of every group's
   scale: ``Ŵ = (clamp(round(q̃ + v), 0, qmax) − z) · s·m`` (AutoRound's rounding offsets, started at GPTQ);
4. Adam minimises ``‖f̂(X) − Y‖²`` over the training windows; after every epoch the held-out windows' loss is
   measured and the block keeps its best epoch (the start, GPTQ's codes, if none beats it);
5. the block is packed again: codes ``round(q + v)``, scales ``s·m`` in fp16. Formats, kernels and checkpoints
   are the start quantizer's: the result is an ordinary packed model.

Memory: one block's float copy is never made (the targets come from the start quantizer's pass over the float
block, the one that gathers its statistics, or are computed before it packs the block); the windows' inputs and
targets, ``2 × N × L × d`` floats (16 × 2048 × 576 × 4 B × 2 = 151 MB for SmolLM2), and one block's trainable
offsets and Adam state (3 × the block's weights in fp32).
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..calibration import Calibration, block_inputs, block_output, for_each_block
from ..config import StepConfig
from ..errors import LowbitError
from ..formats.int import IntFormat
from ..models import set_module
from ..nn.input_transform import rotate_input, split_input
from ..nn.qlinear import QLinear, carried_parts, packable_weight, packed_linear
from ..qtensor import QuantizedWeight
from ..registry import get, register
from ..state import state_of
from ..train.engine import Engine, OptimConfig
from ..train.trainer import autocast, check_precision
from .base import Quantizer, Step, select_targets

log = logging.getLogger(__name__)


def _default_start() -> dict:
    return {"step": "gptq", "bits": 4, "group_size": 128}


@dataclass(frozen=True)
class BlockwiseConfig(StepConfig):
    """Block-wise reconstruction over ``quantizer`` (a step config dict; default GPTQ int4 g128)."""

    step = "blockwise"
    quantizer: dict = field(default_factory=_default_start)  # the start: a uniform-int quantizer that streams
    epochs: int = 1  # passes over the training windows per block (blocks 0-1 of SmolLM2 w3g128: the first epoch
    # of two gave 0.0454 -> 0.0398 held-out, the second 0.0395)
    # Adam's peak lr of the rounding offsets, in grid steps (cosine to 0 over the block's steps). 0 by default: on
    # SmolLM2 w3g128 (blocks 0-1, held-out windows of WikiText-2 valid) 1e-3 gave 0.0454 -> 0.0405, 1e-2 0.22
    # and 0.1 0.90 (worse than GPTQ: Adam moves every offset at the same speed, flipping codes GPTQ chose well),
    # where the scales alone gave 0.0395 (BENCHMARKS.md)
    lr: float = 0.0
    scale_lr: float = 0.005  # Adam's peak lr of the group-scale multipliers (relative: 0.005 = 0.5 % a step)
    float_lr: float = 0.0  # Adam's peak lr of the block's float parameters (norm gains, biases); 0: frozen
    val_windows: int = 2  # calibration windows held out: each block keeps its best epoch on them
    precision: str = "auto"  # matmul precision: auto (bf16 where the CPU/GPU has it) | bf16 | fp32

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.epochs, int) or isinstance(self.epochs, bool) or self.epochs < 1:
            raise LowbitError(f"blockwise epochs must be a positive integer, got {self.epochs!r}")
        if not isinstance(self.val_windows, int) or isinstance(self.val_windows, bool) or self.val_windows < 0:
            raise LowbitError(f"blockwise val_windows must be an integer >= 0, got {self.val_windows!r}")
        for name in ("lr", "scale_lr", "float_lr"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not 0 <= value < float("inf"):
                raise LowbitError(f"blockwise {name} must be a finite number >= 0, got {value!r}")
        check_precision(self.precision)
        start = self.start_config()
        cls = get("step", start.step)
        if not issubclass(cls, Quantizer) or not cls.streams or not isinstance(start.make_format(), IntFormat):
            raise LowbitError(f"blockwise trains uniform integer grids packed block by block; {start.step!r} with "
                              f"format {getattr(start, 'format', '?')!r} is not one (use gptq or rtn with format int)")

    def __hash__(self):
        return hash((self.step, tuple(sorted(self.quantizer.items())), self.epochs, self.lr, self.scale_lr,
                     self.float_lr, self.val_windows, self.precision))

    def start_config(self):
        if not isinstance(self.quantizer, dict) or "step" not in self.quantizer:
            raise LowbitError("blockwise quantizer must be a step config mapping, e.g. {'step': 'gptq', 'bits': 3}")
        return StepConfig.from_dict(self.quantizer)


CELL = 0.49  # the latent code stays this far from its code's cell edge (so it still rounds to the code)


def _columns(t: torch.Tensor, group_size: int, in_features: int) -> torch.Tensor:
    """``(rows, groups)`` per-group values spread over the ``in_features`` columns they cover: ``(rows, in)``."""
    return t.repeat_interleave(group_size, dim=1)[:, :in_features]


class RelaxedLinear(nn.Module):
    """A packed uniform-integer Linear made trainable (see the module docstring): ``y = x Ŵᵀ + b`` with
    ``Ŵ (out, in) = (clamp(round(codes + offset), 0, qmax) − z) · scales · multiplier``, the rounding passed
    straight through in the backward. ``codes (out, in)`` are the packed codes, moved within their cells towards
    ``float_weight (out, in)`` when it is given (the weight before packing); ``offset`` (grid steps) and
    ``multiplier (rows, groups)`` are fp32 Parameters starting at 0 and 1, so the module starts equal to the
    packed layer."""

    def __init__(self, layer: QLinear, float_weight: torch.Tensor | None = None):
        super().__init__()
        qw = layer.qweight
        if not isinstance(qw, QuantizedWeight) or not isinstance(qw.format, IntFormat):
            raise LowbitError(f"blockwise trains uniform integer weights, got {layer.layout()}")
        if layer._modules.get("adapters"):
            raise LowbitError("blockwise trains packed weights before any adapter is attached; put it before the "
                              "compensation steps (loftq, rilq) of the recipe")
        self.fmt, self.granularity, self.group_size = qw.format, qw.granularity, qw.group_size
        self.in_features, self.out_features = qw.in_features, qw.out_features
        codes = qw.unpacked_codes().float()
        self.register_buffer("scales", qw.scales.float())
        zero = torch.full_like(self.scales, float(self.fmt.offset)) if qw.zeros is None else qw.zeros.float()
        self.register_buffer("zeros", zero)
        if float_weight is not None:  # where the float weight lies in its code's cell: near a boundary, a small
            # offset flips the code (the codes themselves are integers, half a step from any boundary)
            g = self.group_size
            position = float_weight.float() / _columns(self.scales, g, self.in_features) + \
                _columns(self.zeros, g, self.in_features)
            codes = codes + (position - codes).clamp(-CELL, CELL)
        self.register_buffer("codes", codes)
        self.offset = nn.Parameter(torch.zeros_like(self.codes))
        self.multiplier = nn.Parameter(torch.ones_like(self.scales))
        self.bias, self.spec, self.outlier = layer.bias, layer.spec, layer.outlier  # carried as they are
        self.carried = carried_parts(layer)

    def rounded_codes(self) -> torch.Tensor:
        """``(out, in)`` fp32 integer codes ``clamp(round(q + offset), 0, qmax)``, straight-through."""
        q = self.codes + self.offset
        return (q + (torch.round(q) - q).detach()).clamp(0, self.fmt.qmax)

    def centered_codes(self) -> torch.Tensor:
        """``(out, in)`` fp32 ``rounded codes − zero point``. While the offsets are not trained (the scale-only
        default) it is computed once and kept until they change (their storage or version counter)."""
        if self.offset.requires_grad:
            return self.rounded_codes() - _columns(self.zeros, self.group_size, self.in_features)
        key = (self.offset.data_ptr(), self.offset._version, self.codes.data_ptr())
        cached = self.__dict__.get("_centered")
        if cached is None or cached[0] != key:
            with torch.no_grad():
                centered = self.rounded_codes() - _columns(self.zeros, self.group_size, self.in_features)
            cached = self.__dict__["_centered"] = (key, centered)
        return cached[1]

    def weight(self) -> torch.Tensor:
        """``(out, in)`` fp32: the weight the packed layer would hold now."""
        return self.centered_codes() * _columns(self.scales * self.multiplier, self.group_size, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """As :meth:`QLinear.forward <lowbit.nn.qlinear.QLinear.forward>`: the input transform (online Hadamard,
        QUAD's float outlier columns, activation quantization) if any, then the relaxed weight."""
        x_out = None
        if self.spec is not None:
            x_out, x = split_input(rotate_input(x, self.spec), self.spec)
        y = F.linear(x, self.weight().to(x.dtype))
        if x_out is not None:
            y = y + F.linear(x_out, self.outlier.to(x_out.dtype)).to(y.dtype)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    @torch.no_grad()
    def packed(self) -> QLinear:
        """The trained layer packed again (codes, fp16 scales ``s·m``, the same zero points and layout)."""
        codes = self.rounded_codes().to(torch.uint8)
        zeros = None if self.fmt.symmetric else self.zeros
        qw = QuantizedWeight.from_codes(codes, self.scales * self.multiplier, zeros, self.fmt, self.granularity,
                                        self.group_size)
        return packed_linear(qw, **self.carried)


@register("step", "blockwise")
class Blockwise(Step):
    """Each decoder block packed by the start quantizer, then trained to reproduce the float block's outputs."""

    Config = BlockwiseConfig
    needs_calibration = True
    streams = True

    def __init__(self, config: BlockwiseConfig):
        super().__init__(config)
        self.start_config = config.start_config()
        self.start = get("step", self.start_config.step)(self.start_config)
        self.report: dict[str, dict] = {}

    def prepare(self, model: nn.Module, calib=None) -> None:
        self.start.prepare(model, calib)

    def check(self, model: nn.Module) -> None:
        self.start.check(model)

    def apply(self, model: nn.Module, calib=None) -> nn.Module:
        calib = calib if isinstance(calib, Calibration) else Calibration(windows=calib)
        start = self.start_config
        select_targets(model, start.targets, start.ignore)  # the whole selection checked up front
        windows = calib.get_windows(model)
        for_each_block(model, block_inputs(model, windows), lambda prefix, collect: self.apply_block(
            model, prefix, collect), desc=f"blockwise {self.start.fmt.name}")
        self.finish(model)
        return model

    def apply_block(self, model: nn.Module, prefix: str, collect) -> None:
        start = self.start_config
        names = [t.name for t in select_targets(model, start.targets, start.ignore,
                                                within=lambda name: name.startswith(prefix))]
        if not names:
            return
        block, hidden, kwargs = collect.block, collect.hidden, collect.kwargs
        if hidden is None:
            raise LowbitError("blockwise needs calibration windows")
        weights = {n: packable_weight(model.get_submodule(n)).clone() for n in names}
        targets: list[torch.Tensor] = []  # the float block's outputs: kept from the start quantizer's own pass
        # over the float block (its statistics) where it makes one, else computed here before it packs the block

        def collect_keeping_outputs(layer_names: list[str]):
            return collect(layer_names, outputs=None if targets else targets)

        if not self.start.needs_calibration:
            targets.extend(block_output(block, h, kwargs) for h in hidden)
        self.start.apply_block(model, prefix, collect_keeping_outputs)
        if len(targets) != len(hidden):
            raise LowbitError(f"blockwise: the start quantizer {start.step!r} packed {prefix.rstrip('.')} without "
                              "running the float block over the calibration windows; use gptq or rtn")
        relaxed = {n: RelaxedLinear(model.get_submodule(n), weights.pop(n)) for n in names}
        for n, m in relaxed.items():
            set_module(model, n, m)
        try:
            self.report[prefix.rstrip(".")] = self._train(block, relaxed, hidden, targets, kwargs, prefix)
        finally:
            for n, m in relaxed.items():
                set_module(model, n, m.packed())

    def _train(self, block: nn.Module, relaxed: dict[str, RelaxedLinear], hidden: list[torch.Tensor],
               targets: list[torch.Tensor], kwargs: dict, prefix: str) -> dict:
        """Adam over the block's offsets and multipliers; the best epoch by held-out loss is kept. Returns the
        block's figures (held-out loss at the start and the best, the best epoch, seconds)."""
        c, begin = self.config, time.perf_counter()
        n_val = min(c.val_windows, len(hidden) - 1)
        val, train = list(range(n_val)), list(range(n_val, len(hidden)))
        offsets = [m.offset for m in relaxed.values()] if c.lr > 0 else []  # lr 0: no (out, in) Adam state
        multipliers = [m.multiplier for m in relaxed.values()] if c.scale_lr > 0 else []
        relaxed_ids = {id(p) for m in relaxed.values() for p in (m.offset, m.multiplier)}
        floats = [p for p in block.parameters() if id(p) not in relaxed_ids and p.is_floating_point()] \
            if c.float_lr > 0 else []
        trained = offsets + multipliers + floats
        if not trained:  # every lr 0: the start quantizer's result as it is
            return {"start": None, "best": None, "best_epoch": 0, "held_out": [], "seconds": 0.0}
        flags = {p: p.requires_grad for p in block.parameters()}
        chosen = {id(p) for p in trained}
        for p in block.parameters():
            p.requires_grad_(id(p) in chosen)

        def loss_of(i: int) -> torch.Tensor:
            with autocast(c.precision):
                out = block_output(block, hidden[i], kwargs)
            return F.mse_loss(out.float(), targets[i].float())

        def held_out() -> float:
            with torch.no_grad():
                return sum(loss_of(i).item() for i in (val or train)) / len(val or train)

        groups = [{"params": ps, "lr": lr} for ps, lr in ((offsets, c.lr), (multipliers, c.scale_lr),
                                                          (floats, c.float_lr)) if ps]
        steps = c.epochs * len(train)
        engine = Engine(block, groups, OptimConfig(steps=steps, lr=c.lr), desc=f"blockwise {prefix.rstrip('.')}",
                        progress=False)
        gen = torch.Generator().manual_seed(0)
        order: list[int] = []

        def next_window(step: int, micro: int) -> torch.Tensor:
            if not order:  # a fresh shuffle of the training windows every epoch
                order.extend(train[j] for j in torch.randperm(len(train), generator=gen).tolist())
            return loss_of(order.pop())

        initial = [p.detach().clone() for p in trained]
        first = best = held_out()
        best_state, best_epoch, history = None, 0, [first]
        try:
            with torch.enable_grad(), contextlib.closing(engine.run(next_window)) as run:
                for step, _, _ in run:
                    if step % len(train) == 0:
                        loss = held_out()
                        history.append(loss)
                        if loss < best:
                            best, best_epoch = loss, step // len(train)
                            best_state = [p.detach().clone() for p in trained]
        finally:
            for p, flag in flags.items():
                p.requires_grad_(flag)
        with torch.no_grad():
            for p, b in zip(trained, best_state or [], strict=False):
                p.copy_(b)
            if best_state is None:  # no epoch beat the start: keep the start quantizer's result
                for p, b in zip(trained, initial, strict=True):
                    p.copy_(b)
        figures = {"start": first, "best": best, "best_epoch": best_epoch, "held_out": history,
                   "seconds": time.perf_counter() - begin}
        log.info("blockwise %s: held-out mse %.4g -> %.4g (epoch %d)", prefix.rstrip("."), first, best, best_epoch)
        return figures

    def finish(self, model: nn.Module) -> None:
        """Record every block's figures in ``state_of(model).history["blockwise"]``."""
        state_of(model).history["blockwise"] = dict(self.report)

    def apply_rest(self, model: nn.Module, calib=None) -> None:
        self.start.apply_rest(model, calib)
        self.finish(model)

    def outside_blocks(self, model: nn.Module) -> bool:
        return self.start.outside_blocks(model)
