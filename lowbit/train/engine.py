"""The one training engine: AdamW with a transformers schedule, gradient accumulation, clipping, activation
checkpointing, train mode and a progress bar. Fine-tuning (:func:`lowbit.train.train`), RILQ and QUAD's PEFT
all run their optimizer steps here; each supplies the loss of a micro-batch and reacts after every optimizer
step (checkpointing its state, validating, stopping early).

    engine = Engine(model, params, OptimConfig(steps=200, lr=2e-4, warmup=6), desc="finetune")
    for step, loss, seconds in engine.run(lambda step, micro: loss_of(step, micro)):
        ...   # leaving the loop early (early stopping) restores the model's mode all the same
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import LowbitError
from .distributed import Processes, average_, full, like

SCHEDULES = ("cosine", "linear", "constant")


@dataclass(frozen=True)
class OptimConfig:
    steps: int  # optimizer steps
    lr: float  # peak learning rate
    warmup: int = 0  # linear warmup from 0 over this many steps
    schedule: str = "cosine"  # after the warmup: cosine (to 0), linear (to 0) or constant
    weight_decay: float = 0.0  # AdamW's decoupled decay (0: AdamW is exactly Adam)
    max_grad_norm: float = 0.0  # clip the global gradient norm (0 = no clipping)
    grad_accum: int = 1  # micro-batches per optimizer step

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise LowbitError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")


def make_scheduler(optimizer: torch.optim.Optimizer, config: OptimConfig):
    """Linear warmup over ``config.warmup`` steps, then ``config.schedule`` (transformers' schedulers)."""
    import transformers

    if config.schedule == "constant":
        return transformers.get_constant_schedule_with_warmup(optimizer, config.warmup)
    make = (transformers.get_cosine_schedule_with_warmup if config.schedule == "cosine" else
            transformers.get_linear_schedule_with_warmup)
    return make(optimizer, config.warmup, config.steps)


def set_checkpointing(model: nn.Module, on: bool) -> None:
    """Recompute each decoder block's activations in the backward (transformers' activation checkpointing)."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        return
    kwargs = {"use_reentrant": False}
    if on and hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x's name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()


def checkpointing_on(model: nn.Module) -> bool:
    """Whether activation checkpointing is on already (so the engine leaves it on afterwards)."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):  # transformers 5.x, 4.x
        value = getattr(model, name, None)
        if value is not None:
            return bool(value)
    return False


class Engine:
    """Optimizer steps over ``params`` of ``model`` (see the module docstring)."""

    def __init__(self, model: nn.Module, params: list[nn.Parameter] | list[dict], config: OptimConfig,
                 gradient_checkpointing: bool = False, desc: str = "train", progress: bool = True,
                 processes: Processes = Processes()):
        """``params``: the trained parameters, or AdamW parameter groups (``{"params": [...], "lr": ...}``; a
        group's own ``lr`` is its peak, scheduled like ``config.lr``). ``processes``: data-parallel processes
        (:mod:`.distributed`) whose gradients and losses are averaged before each optimizer step; each process's
        ``micro_loss`` is then its shard's share of the global loss."""
        self.model, self.config = model, config
        self.params = [p for group in params for p in group["params"]] if params and isinstance(params[0], dict) \
            else params
        self.gradient_checkpointing = gradient_checkpointing
        self.optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        self.scheduler = make_scheduler(self.optimizer, config)
        self.desc, self.progress, self.processes = desc, progress and processes.main, processes
        self.bar = None

    def state_dict(self) -> dict:
        """Optimizer and scheduler state, sharded tensors gathered whole (FSDP: every process must call this)."""
        optimizer = self.optimizer.state_dict()
        optimizer["state"] = {i: {k: full(v) for k, v in s.items()} for i, s in optimizer["state"].items()}
        return {"optimizer": optimizer, "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """The state :meth:`state_dict` gave, each tensor laid out as its parameter is (sharded or whole)."""
        optimizer = dict(state["optimizer"])
        optimizer["state"] = {i: {k: like(v, self.params[int(i)]) if torch.is_tensor(v) and v.dim() else v
                                  for k, v in s.items()} for i, s in optimizer["state"].items()}
        self.optimizer.load_state_dict(optimizer)
        self.scheduler.load_state_dict(state["scheduler"])

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def run(self, micro_loss: Callable[[int, int], torch.Tensor], start: int = 0
            ) -> Iterator[tuple[int, float, float]]:
        """Optimizer steps ``start + 1 .. config.steps``; ``micro_loss(step, micro)`` is the loss of micro-batch
        ``micro`` of 0-based step ``step``. Yields ``(step, mean loss over its micro-batches, seconds)`` after each
        step (averaged over the processes). The model trains in train mode (with activation checkpointing if
        asked) and gets its mode back when the loop ends or is left."""
        c, model = self.config, self.model
        was_training, was_checkpointing = model.training, checkpointing_on(model)
        model.train()
        if self.gradient_checkpointing and not was_checkpointing:
            set_checkpointing(model, True)
        self.bar = tqdm(total=c.steps, initial=start, desc=self.desc, unit="step", disable=not self.progress,
                        leave=False)
        try:
            for step in range(start, c.steps):
                begin = time.perf_counter()
                running = 0.0
                for micro in range(c.grad_accum):
                    loss = micro_loss(step, micro)
                    (loss / c.grad_accum).backward()
                    running += loss.item() / c.grad_accum
                if self.processes.count > 1:
                    mean = torch.tensor([running], device=self.params[0].device)
                    average_([p.grad for p in self.params if p.grad is not None] + [mean], self.processes)
                    running = float(mean)
                if c.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(self.params, c.max_grad_norm)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.bar.update(1)
                yield step + 1, running, time.perf_counter() - begin
        finally:
            self.bar.close()
            if self.gradient_checkpointing and not was_checkpointing:
                set_checkpointing(model, False)
            model.train(was_training)
