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
from ..nn.qlinear import packable_weight
from ..nn.relaxed import RelaxedLinear
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
            model, prefix, collect), desc=f"blockwise {self.start.fmt.name}", device=calib.device)
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
