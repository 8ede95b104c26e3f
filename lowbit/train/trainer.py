"""Fine-tune the trainable parameters (adapters) of a model: AdamW, warmup + cosine, gradient accumulation,
activation checkpointing, chunked LM loss, seeded, resumable.

Works on any causal LM whose trainable parameters are the ones to train: a packed lowbit model with adapters
(:func:`lowbit.adapters.freeze` makes only those trainable) or, as the benchmark's baseline, a PEFT-wrapped float
model. Batches are a pure function of (seed, step): example ``p`` of the stream is ``perm_e[p mod n]`` with
``perm_e`` the seeded permutation of epoch ``e = p // n``; so a resumed run sees exactly the batches an
uninterrupted one would. Under ``accelerate launch`` (:mod:`.distributed`) each process computes its contiguous
shard of every global micro-batch, its loss divided by the global batch's label count, and the engine averages
the gradients: the same optimizer steps as one process, within float rounding; the state (written by the main
process only) resumes with any process count. The training state (trainable tensors, optimizer, scheduler, RNG,
losses, step timings) is written every ``checkpoint_every`` steps to ``state_dir`` (:mod:`.state`: safetensors +
JSON, no pickle, replaced atomically).
Activation checkpointing is transformers' non-reentrant one on the decoder blocks, so the frozen embedding needs
no ``enable_input_require_grads``; a model that had it on keeps it on afterwards, one that had it off gets it off.
The JSON log and loss PNG are written by the caller (``lowbit finetune``; :mod:`lowbit.train.report`).

The LM loss is computed from the decoder's last hidden state in chunks of ``loss_chunk`` positions, each chunk's
logits recomputed in the backward: the full ``(tokens, vocab)`` logits (200 MB for 4 × 256 tokens and a 49k
vocabulary, plus as much again for their gradient) never exist at once. Same value as transformers' loss: the
mean next-token cross-entropy over the positions whose label is not -100.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import LowbitError
from ..kernels import native_bf16
from ..memory import peak_rss_mb, release_free_memory, reset_peak
from ..protocol import LOGITS_CHUNK
from .data import IGNORE, TrainData
from .distributed import Processes, broadcast_, check_batch, full, like, shard
from .engine import SCHEDULES, Engine, OptimConfig
from .state import JSON, load_state, save_state

log = logging.getLogger(__name__)
PRECISIONS = ("auto", "bf16", "fp32")


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise LowbitError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")


def autocast(precision: str, device: torch.device | str = "cpu"):
    """The context that runs matmuls in ``precision``: ``bf16`` = ``torch.autocast`` to bfloat16 (parameters,
    gradients and optimizer state stay fp32); ``fp32`` = nothing; ``auto`` = bf16 where :func:`native_bf16`.
    On a CPU with AVX512-BF16 a bf16 matmul runs about 4x faster than fp32 (benchmarks/rilq.py)."""
    check_precision(precision)
    device = torch.device(device)
    if precision == "fp32" or (precision == "auto" and not native_bf16(device)):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 200  # optimizer steps
    batch: int = 4  # examples per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 2e-4  # QLoRA's (methods.md §3.4); the peak of the schedule
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03  # share of steps with a linear warmup from 0 (QLoRA's 3 %)
    warmup_steps: int | None = None  # warmup length in steps; overrides warmup_ratio when set
    schedule: str = "cosine"  # after the warmup: cosine (decay to 0), linear (to 0) or constant (QLoRA's script)
    max_grad_norm: float = 0.3  # QLoRA's clipping (0 = none)
    seed: int = 0
    gradient_checkpointing: bool = True  # recompute decoder blocks in the backward
    loss_chunk: int = LOGITS_CHUNK  # positions per chunk of the LM loss (0 = all at once)
    checkpoint_every: int = 50  # optimizer steps between training-state checkpoints (needs a state_dir)
    log_every: int = 0  # optimizer steps between INFO log lines (step, loss, lr, tokens/s); 0 = none
    precision: str = "auto"  # matmul precision: auto (bf16 where native) | bf16 | fp32 (see autocast())

    def __post_init__(self):
        for name in ("steps", "batch", "grad_accum", "checkpoint_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise LowbitError(f"{name} must be a positive integer, got {value!r}")
        if not 0 < self.lr < math.inf:
            raise LowbitError(f"lr must be a positive finite number, got {self.lr!r}")
        if not 0 <= self.warmup_ratio < 1:
            raise LowbitError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        if self.loss_chunk < 0:
            raise LowbitError(f"loss_chunk must be >= 0, got {self.loss_chunk!r}")
        if self.warmup_steps is not None and not 0 <= self.warmup_steps < self.steps:
            raise LowbitError(f"warmup_steps must be in [0, steps={self.steps}), got {self.warmup_steps!r}")
        if self.schedule not in SCHEDULES:
            raise LowbitError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.log_every < 0 or self.max_grad_norm < 0 or self.weight_decay < 0:
            raise LowbitError("log_every, max_grad_norm and weight_decay must be >= 0")
        check_precision(self.precision)

    @property
    def warmup(self) -> int:
        """Warmup length in optimizer steps."""
        return self.warmup_steps if self.warmup_steps is not None else math.ceil(self.warmup_ratio * self.steps)

    def optim(self) -> OptimConfig:
        """What the engine needs of this config."""
        return OptimConfig(steps=self.steps, lr=self.lr, warmup=self.warmup, schedule=self.schedule,
                           weight_decay=self.weight_decay, max_grad_norm=self.max_grad_norm, grad_accum=self.grad_accum)


@dataclass
class TrainResult:
    losses: list[float]  # per optimizer step (mean over its micro-batches)
    steps: int
    tokens: int  # input tokens processed
    seconds: float  # training wall time (a resumed run: all segments)
    peak_rss_mb: float  # of this segment
    config: dict = field(default_factory=dict)
    step_seconds: list[float] = field(default_factory=list)  # wall time of each optimizer step
    finished: bool = True  # False: stopped early by stop_after, the resumable state left in state_dir

    @property
    def tokens_per_step(self) -> int:
        """Input tokens per optimizer step (batch x grad_accum x seq_len, padding included)."""
        return self.tokens // self.steps if self.steps else 0

    @property
    def first_loss(self) -> float:
        return self.losses[0]

    @property
    def final_loss(self) -> float:
        """Mean of the last 10 steps' losses (one step's loss is one batch's, noisy)."""
        tail = self.losses[-10:]
        return sum(tail) / len(tail)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    def to_dict(self) -> dict:
        return {"first_loss": self.first_loss, "final_loss": self.final_loss, "steps": self.steps,
                "tokens": self.tokens, "seconds": self.seconds, "tokens_per_second": self.tokens_per_second,
                "peak_rss_mb": self.peak_rss_mb, "losses": self.losses, "config": self.config,
                "step_tokens_per_second": [self.tokens_per_step / s if s else 0.0 for s in self.step_seconds]}


def batch_indices(n: int, batch: int, micro_step: int, seed: int) -> torch.Tensor:
    """Example indices of micro-batch ``micro_step`` (0-based) of the seeded, epoch-wise shuffled stream."""
    out = []
    for p in range(micro_step * batch, (micro_step + 1) * batch):
        epoch, i = divmod(p, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        out.append(int(perm[i]))
    return torch.tensor(out)


def _chunk_ce(head: nn.Module, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(h).float(), y, ignore_index=IGNORE, reduction="sum")


def label_count(labels: torch.Tensor) -> int:
    """Positions of ``labels (B, L)`` that carry a loss after the one-position shift."""
    return int((labels[:, 1:] != IGNORE).sum())


def lm_loss(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor, chunk: int = LOGITS_CHUNK,
            count: float | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy of ``input_ids (B, L)`` against ``labels (B, L)`` shifted by one, over the
    labels that are not -100; logits built ``chunk`` positions at a time (0 = all, via the model's own loss).
    ``count``: divide the summed cross-entropy by this instead (a data-parallel shard's share of a global
    batch)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    own = max(1, label_count(labels))
    if not chunk or decoder is None or head is None:
        loss = model(input_ids=input_ids, labels=labels, use_cache=False).loss
        return loss if count is None else loss * (own / count)
    h = decoder(input_ids=input_ids, use_cache=False).last_hidden_state[:, :-1]
    y = labels[:, 1:].reshape(-1)
    h = h.reshape(-1, h.shape[-1])
    count = own if count is None else count
    total = h.new_zeros((), dtype=torch.float32)
    for s in range(0, y.numel(), chunk):
        total = total + checkpoint(_chunk_ce, head, h[s:s + chunk], y[s:s + chunk], use_reentrant=False)
    return total / count


def train(model: nn.Module, data: TrainData, config: TrainConfig, state_dir: str | Path | None = None,
          resume: bool = False, progress: bool = True,
          on_step: Callable[[int, float], None] | None = None, base: str | None = None,
          processes: Processes = Processes(), stop_after: int = 0) -> TrainResult:
    """Train ``model``'s parameters that require grad on ``data`` for ``config.steps`` optimizer steps.

    ``state_dir``: where the resumable training state goes (every ``checkpoint_every`` steps and at the end).
    ``resume``: continue from the state in ``state_dir``, only onto the same ``base`` (an identity of the frozen
    model, e.g. its checkpoint's manifest hash), settings, data and trainable shapes (then the losses are those of
    an uninterrupted run). A non-finite loss or parameter stops the run with a :class:`LowbitError`; the state
    in ``state_dir`` is then still the last good one. ``on_step(step, loss)`` is called after every optimizer
    step (tests use it to stop). ``processes``: this process's place among data-parallel ones (the module
    docstring); the batch must split evenly over them. ``stop_after``: leave after this many optimizer steps of
    this call (a time-limited job), the state saved for ``resume`` (0 = run to the end)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise LowbitError("the model has no trainable parameters: attach adapters first (lowbit.adapters.attach)")
    params = [p for _, p in named]
    check_batch(config.batch, processes)
    broadcast_(params, processes)
    engine = Engine(model, params, config.optim(), gradient_checkpointing=config.gradient_checkpointing,
                    desc="finetune", progress=progress, processes=processes)
    state_dir = None if state_dir is None else Path(state_dir)
    losses: list[float] = []
    step_seconds: list[float] = []
    fingerprint = data.fingerprint()
    step, tokens, seconds = 0, 0, 0.0
    if resume:
        if state_dir is None:
            raise LowbitError("nothing to resume: no state_dir was given")
        state = load_state(state_dir)
        if state.get("base") != base:
            raise LowbitError(f"{state_dir} was written by a run over another base model ({state.get('base')!r}, not "
                              f"{base!r}); resume from the same model or start a new run without --resume")
        if state["config"] != asdict(config):
            raise LowbitError(f"{state_dir} was written by a run with other settings ({state['config']}); resume "
                              "with the same settings or start a new run")
        if state.get("data", fingerprint) != fingerprint:
            raise LowbitError(f"{state_dir} was written for other training data than {data.source} "
                              f"({state['data']} vs {fingerprint}); resume with the same --data and --seq-len or "
                              "start a new run")
        if [(n, list(t.shape)) for n, t in state["params"].items()] != [(n, list(p.shape)) for n, p in named]:
            raise LowbitError(f"{state_dir} holds other trainable parameters than this model (names or shapes: "
                              "another --rank, adapter or targets); resume with the same settings or start a new run")
        with torch.no_grad():
            for (_, p), t in zip(named, state["params"].values(), strict=True):
                p.copy_(like(t, p))
        engine.load_state_dict(state)
        torch.set_rng_state(state["rng"].to(torch.uint8))
        losses, step, tokens, seconds = state["losses"], state["step"], state["tokens"], state["seconds"]
        step_seconds = state.get("step_seconds", [])
        log.info("resumed at step %d of %d", step, config.steps)

    stop_at = step + stop_after if stop_after > 0 else config.steps

    def diverged(what: str) -> LowbitError:
        """The error that stops a diverged run, naming the state left in ``state_dir`` (written before it went bad,
        by this run or the one it continues)."""
        saved = load_state(state_dir)["step"] if state_dir is not None and (state_dir / JSON).is_file() else None
        kept = f", the last good state (step {saved}) is kept in {state_dir}" if saved else ", nothing saved"
        return LowbitError(f"{what} at step {step} (the run diverged; --lr {config.lr} is too high?): "
                           f"stopped{kept}; lower --lr or raise --warmup")

    def checkpoint_state():
        whole = {n: full(p.detach()) for n, p in named}  # (sharded ones gathered by every process)
        bad = next((n for n, t in whole.items() if not torch.isfinite(t).all()), None)
        if bad is not None:
            raise diverged(f"parameter {bad} became non-finite")
        if state_dir is not None:
            engine_state = engine.state_dict()
            if processes.main:
                save_state(state_dir, {"base": base, "config": asdict(config), "data": fingerprint, "step": step,
                                       "losses": losses, "tokens": tokens, "seconds": seconds,
                                       "step_seconds": step_seconds, "rng": torch.get_rng_state(),
                                       "params": {n: t.clone() for n, t in whole.items()}, **engine_state})

    def micro_loss(at: int, micro: int) -> torch.Tensor:
        nonlocal tokens
        idx = batch_indices(len(data), config.batch, at * config.grad_accum + micro, config.seed)
        tokens += data.input_ids[idx].numel()  # the global batch's
        share = max(1, label_count(data.labels[idx])) / processes.count
        idx = shard(idx, processes)
        ids, labels = data.input_ids[idx].to(device), data.labels[idx].to(device)
        with autocast(config.precision, device):
            loss = getattr(model, "lowbit_loss", None) or functools.partial(lm_loss, model)  # (FSDP: its forward)
            return loss(ids, labels, config.loss_chunk, count=share if processes.count > 1 else None)

    device = params[0].device
    release_free_memory()
    reset_peak()
    with contextlib.closing(engine.run(micro_loss, start=step)) as steps:
        for step, running, elapsed in steps:
            if not math.isfinite(running):
                raise diverged(f"the loss became {running}")
            seconds += elapsed
            losses.append(running)
            step_seconds.append(elapsed)
            engine.bar.set_postfix(loss=f"{running:.3f}", tok_s=f"{tokens / seconds:.0f}")
            if config.log_every and step % config.log_every == 0:
                log.info("step %d/%d loss %.4f lr %.3g %.0f tokens/s", step, config.steps, running, engine.lr,
                         tokens / seconds)
            if step % config.checkpoint_every == 0 or step in (config.steps, stop_at):
                checkpoint_state()
            if on_step is not None:
                on_step(step, running)
            if step == stop_at:
                break
    return TrainResult(losses=losses, steps=step, tokens=tokens, seconds=seconds, peak_rss_mb=peak_rss_mb(),
                       config=asdict(config), step_seconds=step_seconds, finished=step == config.steps)
