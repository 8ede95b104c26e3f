"""RILQ (methods.md §5): adapters trained against the float model's own outputs, a loss on the whole model.

``L = λ_m · MSE(h_student, h_teacher) + λ_gt · CE(head(h_student), next token)`` where ``h`` is the final hidden
state after the last norm (``model.get_decoder()(ids).last_hidden_state``). Teacher states are computed once
from the float model, before any step of the recipe quantizes it (:meth:`RILQ.prepare`), and kept in bf16 on the
CPU (640 windows × 256 tokens × 576 = 189 MB for SmolLM2), so the float model never sits beside the student. A
checkpoint that is already quantized gets its teacher from the manifest's source model, loaded, run and freed
before training. The student is the real packed model (gradients flow through the packed base) with LoRA
(Gaussian init, ``B = 0``, so training starts at the base) or LoRMA adapters on every decoder layer.

Calibration: WikiText-2 valid windows (or the recipe's calibration text; ``data`` "self": text the float model
samples itself, "mixed": half each); the first ``val_ratio`` of them validate. Adam; early stopping on the
validation loss (every ``eval_every`` optimizer steps, ``patience`` evaluations without improvement); the best
adapters are restored. Adapters a previous step attached under the same name (``[loftq(...), rilq]``: LoftQ's SVD
of the residual) are trained from where they are instead of new Gaussian ones. Beyond the paper, ``scales`` also
trains the packed base's scales of every weight with row-wise scales (uniform channel- or group-wise, LowRA's
block absmax): ``"channel"`` (or ``True``) one multiplier per output row (:func:`lowbit.adapters.train_channel_scales`,
nearly free), ``"group"`` one per quantization group (:func:`lowbit.adapters.train_group_scales`: capacity that
does not depend on the rank, one more GEMM per layer in the backward, folded into the packed scales when training
ends); either is stored folded into the packed fp16 scales (LowRA: its absmax), so it adds no bits.

Beyond the paper, the same trainer refines the packed model without adapters (``rank=0``): ``lambda_kl`` adds
the KL divergence from the float model's next-token distribution (the teacher's logits are the cached final
states through the model's own head, so no full-vocabulary logits are stored), ``scales="group"`` trains every
group scale (presets ``refine-kl``, ``best-w4``) and ``codes=True`` the packed codes themselves through the
straight-through estimator, packed again at the end (quantization-aware training; preset ``qat-kl``).

Under ``accelerate launch`` (``lowbit compensate --processes N``, :mod:`lowbit.train.distributed`) each process
trains its contiguous shard of every batch and the gradients are averaged: the same steps as one process. The
teacher pass and the validation run whole on every process (so each takes the same early-stopping decision).

The defaults differ from the paper's (320 × 512 tokens, lr 1e-4 constant, 10,000 micro-steps on a GPU) to fit
2 CPU cores: 640 windows of 256 tokens (128 of them validate), 400 steps of one batch of 4 windows, lr 5e-4 for
new Gaussian adapters and 2e-3 for LoftQ-initialised ones (:meth:`RILQConfig.learning_rate`) with a cosine decay,
validation every 80 steps, matmuls (teacher and student, the packed base included) in bf16 where the CPU has
native bf16. SmolLM2-135M over RTN w2g64: 972 s of training, 1,062 s for the whole LoftQ + RILQ recipe, ppl 60.39;
over lowra-gptq-b2.0 ranks 4–64 give 30.79–32.64 (benchmarks/rilq.py; BENCHMARKS.md has the experiments).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..adapters import (
    AdapterConfig,
    LoRAConfig,
    LoRMAConfig,
    adapter_dtype,
    attach,
    find_qlinears,
    freeze,
    has_row_scales,
    parameters,
    remove,
    store_adapters,
    train_channel_scales,
    train_group_scales,
)
from ..config import StepConfig
from ..device import CPU
from ..errors import LowbitError
from ..memory import release_free_memory
from ..models import DECODER, set_module
from ..nn.qlinear import QLinear
from ..nn.relaxed import RelaxedLinear
from ..quantizers.base import Step
from ..registry import register
from ..state import state_of
from ..train.distributed import broadcast_, check_batch, processes, shard
from ..train.engine import Engine, OptimConfig
from ..train.trainer import autocast, check_precision

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RILQConfig(StepConfig):
    step = "rilq"
    rank: int = 16  # adapters' rank; 0: no adapters, only the packed scales (end-to-end refinement, needs scales)
    alpha: float = 16.0
    adapter: str = "lora"  # lora | lorma (rri, pre mode)
    name: str = "default"  # adapter name: fine-tuning continues the same adapters
    lr: float | None = None  # None: 5e-4 for new (Gaussian) adapters, 2e-3 to continue LoftQ's (see learning_rate)
    schedule: str = "cosine"  # cosine (decay to 0 over max_steps) | constant (the paper's)
    samples: int = 640  # calibration windows (train + validation); the paper uses 320 of 512 tokens
    seq_len: int = 256
    val_ratio: float = 0.2
    # beyond the paper: what the windows hold. recipe: the recipe's calibration (WikiText-2 valid, --calib-file or
    # --calib-self); self: text the float model samples itself, whatever the recipe calibrates on; mixed: half each,
    # shuffled together (training and validation both see both)
    data: str = "recipe"
    micro_batch: int = 4  # windows per forward pass (one batch, no padding: 35% faster than one at a time)
    grad_accum: int = 1  # micro-batches per optimizer step (an optimizer step sees micro_batch × grad_accum windows)
    max_steps: int = 400  # optimizer steps
    eval_every: int = 80  # optimizer steps between validations (the paper: 25; 128 windows cost ~20 s here)
    patience: int = 4  # validations without improvement before stopping
    lambda_model: float = 0.5
    lambda_gt: float = 0.5
    # beyond the paper: KL(teacher ‖ student) of the next-token distributions, the teacher's logits being the
    # model's own output head on the teacher's final states (distillation of the float model's predictions)
    lambda_kl: float = 0.0
    seed: int = 42
    scales: bool | str = False  # beyond the paper: also train the packed scales: False | "channel" (True) | "group"
    # beyond the paper: quantization-aware training of the packed codes themselves (rank 0 only): every target
    # layer's weight becomes s·(round(q + v) − z) with offsets v trained through the straight-through estimator
    # (:class:`lowbit.nn.relaxed.RelaxedLinear`), packed again when training ends; with scales "group" its group
    # scales train too. Needs uniform integer weights.
    codes: bool = False
    gradient_checkpointing: bool = False  # 256-token windows of a small model: memory is not the limit, time is
    precision: str = "auto"  # matmul precision of the student: auto (bf16 where the CPU/GPU has it) | bf16 | fp32
    adapter_dtype: str = "bfloat16"  # stored: bf16 (half fp32's bits) | float32 | int8 | int4 (LoRA); trained in fp32
    targets: tuple[str, ...] = (DECODER,)
    ignore: tuple[str, ...] = ()

    def __post_init__(self):
        super().__post_init__()
        if self.adapter not in ("lora", "lorma"):
            raise LowbitError(f"RILQ adapter must be lora or lorma, got {self.adapter!r}")
        for name in ("rank", "samples", "seq_len", "micro_batch", "grad_accum", "max_steps", "eval_every", "patience"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if name == "rank" else 1):
                raise LowbitError(f"RILQ {name} must be a {'non-negative' if name == 'rank' else 'positive'} "
                                  f"integer, got {value!r}")
        if not 0 < self.val_ratio < 1 or round(self.samples * self.val_ratio) < 1 or \
                self.samples - round(self.samples * self.val_ratio) < 1:
            raise LowbitError(f"val_ratio {self.val_ratio} must leave at least one validation and one training "
                              f"window out of samples={self.samples}")
        lambdas = (self.lambda_model, self.lambda_gt, self.lambda_kl)
        if any(not isinstance(v, int | float) or v < 0 for v in lambdas) or sum(lambdas) == 0:
            raise LowbitError("lambda_model, lambda_gt and lambda_kl must be >= 0 and not all 0")
        check_precision(self.precision)
        adapter_dtype(self.adapter_dtype)
        if self.lr is not None and not (isinstance(self.lr, int | float) and 0 < self.lr < float("inf")):
            raise LowbitError(f"RILQ lr must be a positive finite number (or None for the default), got {self.lr!r}")
        if self.scales not in (False, True, "none", "channel", "group"):
            raise LowbitError(f"RILQ scales must be false, channel or group, got {self.scales!r}")
        if self.data not in ("recipe", "self", "mixed"):
            raise LowbitError(f"RILQ data must be recipe, self or mixed, got {self.data!r}")
        if self.schedule not in ("constant", "cosine"):
            raise LowbitError(f"RILQ schedule must be constant or cosine, got {self.schedule!r}")
        if self.rank == 0 and self.scales in (False, "none") and not self.codes:
            raise LowbitError("RILQ rank 0 trains no adapters: set scales to channel or group, or codes to true "
                              "(what it trains then)")
        if self.codes and (self.rank or self.scales in (True, "channel")):
            raise LowbitError("RILQ codes (quantization-aware training) needs rank 0 and scales false or group")
        if self.rank:
            self.adapter_config()

    def learning_rate(self, continuing: bool) -> float:
        """Adam's peak lr: ``lr`` if given, else 2e-3 when training adapters a previous step initialised (LoftQ's
        SVD, alpha = 2r: measured best there) and 5e-4 for new Gaussian ones. With ``s = alpha / r`` and
        ``A ~ N(0, 1/r)`` a step of B moves the output by about ``alpha · lr · r^-1.5``, so low ranks take the
        largest steps: over lowra-gptq-b2.0, rank 4 gives 38.53 at 2e-3 and 32.64 at 5e-4, rank 16 31.85 and
        30.88 (BENCHMARKS.md)."""
        if self.lr is not None:
            return float(self.lr)
        return 2e-3 if continuing else 5e-4

    def adapter_config(self) -> AdapterConfig:
        if self.adapter == "lora":
            return LoRAConfig(rank=self.rank, alpha=self.alpha, targets=self.targets, ignore=self.ignore,
                                 init="gaussian")
        return LoRMAConfig(rank=self.rank, alpha=self.alpha, targets=self.targets, ignore=self.ignore)


@torch.inference_mode()
def final_hidden_states(model: nn.Module, windows: torch.Tensor, desc: str = "teacher",
                        precision: str = "fp32") -> torch.Tensor:
    """``(n, L, d)`` bf16: the decoder's output after its last norm, one window at a time, matmuls in
    ``precision`` (the paper's teacher is the bf16 model; on SmolLM2 bf16 differs from fp32 by 0.9% relative,
    2.8e-4 MSE, and runs 2.5x faster on a CPU with AVX512-BF16)."""
    backbone = model.get_decoder()
    with autocast(precision, windows.device):
        out = [backbone(input_ids=w[None]).last_hidden_state[0].to(torch.bfloat16)
               for w in tqdm(windows, desc=desc, unit="window", leave=False)]
    return torch.stack(out)


def rotated_states(states: torch.Tensor, gain: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Final states ``(n, L, d)`` of the float model (after its last norm, gain ``(d,)`` applied) as the rotated
    model computes them: the rotate step folded the gain into the head and turned the stream by ``rotation (d,
    d + r)``, so they are ``(states / gain) @ rotation`` (0 where a gain is 0: the head reads nothing there).
    Same dtype as ``states``."""
    inverse = torch.where(gain == 0, torch.zeros_like(gain), 1 / gain)
    return torch.stack([((s.double() * inverse) @ rotation).to(states.dtype) for s in states])  # window by window


@register("step", "rilq")
class RILQ(Step):
    Config = RILQConfig

    def __init__(self, config: RILQConfig):
        super().__init__(config)
        self.windows: torch.Tensor | None = None
        self.teacher: torch.Tensor | None = None
        self.teacher_map: tuple | None = None  # the model's residual_map when the teacher was taken

    def _windows(self, calib, model: nn.Module) -> torch.Tensor:
        """``(samples, seq_len)`` token ids from the source ``data`` names (``model``: the float model, which samples
        them itself for ``self`` / ``mixed`` and under ``--calib-self``)."""
        c = self.config
        if getattr(calib, "tokenizer", None) is None:
            raise LowbitError("RILQ needs calibration text: pass calib=lowbit.Calibration(tokenizer=tok) "
                              "(WikiText-2 valid by default)")
        share = {"recipe": 0.0, "self": 1.0, "mixed": 0.5}[c.data]  # mixed: the first val_ratio holds both
        return calib.draw(c.samples, c.seq_len, c.seed, model, own_share=share)

    def prepare(self, model: nn.Module, calib=None) -> None:
        """Cache the teacher's final hidden states from the float model, before any step quantizes it."""
        if any(isinstance(m, QLinear) for m in model.modules()):
            return  # already quantized: apply() loads the teacher from the source model
        self.windows = self._windows(calib, model)
        self.teacher = final_hidden_states(model, self.windows, precision=self.config.precision)
        self.teacher_map = state_of(model).residual_map  # a later rotate step changes the student's basis

    def _teacher_from_source(self, model: nn.Module, calib) -> None:
        from ..models import load_float_model as load_model

        source = state_of(model).source
        if not source:
            raise LowbitError("RILQ needs the float model's outputs: run it in the same recipe as the quantizer "
                              "(e.g. rtn-w2g64+rilq16) or on a checkpoint whose manifest names its source model")
        record = state_of(model).rotation
        if record and record.get("outliers"):
            raise LowbitError("RILQ on a QUAD checkpoint cannot rebuild its data-dependent rotation for the float "
                              "teacher: run rilq in the same recipe as the rotate step (quad-...+rilq16)")
        log.info("rilq: computing teacher outputs from %s", source)
        fp_model, _ = load_model(source)
        self.windows = self._windows(calib, fp_model)  # drawn before rotating: the same windows either way
        if record:  # the student was rotated: so is the teacher (QuaRot's rotation is the seed's), same function
            from ..transforms.rotate import RotateConfig, rotate_model

            rotate_model(fp_model, RotateConfig(rotation=record["rotation"], online=record["online"],
                                                seed=record["seed"]))
        self.teacher = final_hidden_states(fp_model, self.windows, precision=self.config.precision)
        self.teacher_map = state_of(model).residual_map
        del fp_model
        release_free_memory()

    def loss(self, model: nn.Module, index: list[int]) -> tuple[torch.Tensor, float, float, float]:
        """Combined loss of the windows ``index`` (one batch) and its three terms (MSE to the teacher's final
        states, next-token CE, KL from the teacher's next-token distribution; the KL is 0 and not computed when
        ``lambda_kl`` is 0), each a mean over the batch's tokens."""
        c = self.config
        ids = self.windows[index]
        head = model.get_output_embeddings()
        with autocast(c.precision, ids.device):
            h = model.get_decoder()(input_ids=ids).last_hidden_state
            logits = head(h[:, :-1])
        teacher = self.teacher[index]
        mse = F.mse_loss(h.float(), teacher.float())
        log_p = F.log_softmax(logits.flatten(0, 1).float(), dim=-1)
        ce = F.nll_loss(log_p, ids[:, 1:].flatten())
        kl = torch.zeros(())
        if c.lambda_kl:
            with torch.no_grad(), autocast(c.precision, ids.device):
                target = F.log_softmax(head(teacher[:, :-1].to(h.dtype)).flatten(0, 1).float(), dim=-1)
            kl = F.kl_div(log_p, target, log_target=True, reduction="batchmean")  # the mean over tokens
        return c.lambda_model * mse + c.lambda_gt * ce + c.lambda_kl * kl, mse.item(), ce.item(), kl.item()

    def validate(self, model: nn.Module, val: list[int]) -> tuple[float, float, float, float]:
        """Mean ``(loss, mse, ce, kl)`` over the validation windows (batches of ``micro_batch``, weighted by
        size)."""
        batches = [val[i:i + self.config.micro_batch] for i in range(0, len(val), self.config.micro_batch)]
        with torch.no_grad():
            terms = [(len(b), loss.item(), *parts) for b in batches for loss, *parts in [self.loss(model, b)]]
        return tuple(sum(n * t[k] for n, *t in terms) / len(val) for k in range(4))

    def _relax(self, model: nn.Module) -> dict[str, RelaxedLinear]:
        """QAT: every target layer replaced by a :class:`RelaxedLinear` of itself (starting equal to it)."""
        relaxed = {name: RelaxedLinear(layer) for name, layer in find_qlinears(model, self.config.targets,
                                                                              self.config.ignore)}
        for name, m in relaxed.items():
            set_module(model, name, m)
        return relaxed

    def apply(self, model: nn.Module, calib=None) -> nn.Module:
        c = self.config
        find_qlinears(model, c.targets, c.ignore)  # a clear error before the teacher pass if nothing to adapt
        if self.teacher is None:
            self._teacher_from_source(model, calib)
        elif state_of(model).residual_map is not self.teacher_map:  # rotated since the teacher pass
            self.teacher = rotated_states(self.teacher, *state_of(model).residual_map)
        device = getattr(calib, "device", None)
        if device is not None:  # a GPU (lowbit.device): the model trains there, then comes back to the CPU
            model.to(device)
            self.windows, self.teacher = self.windows.to(device), self.teacher.to(device)
        start = time.perf_counter()
        n_val = round(c.samples * c.val_ratio)
        val, train = list(range(n_val)), list(range(n_val, c.samples))
        continuing = bool(parameters(model, c.name))
        if continuing:  # e.g. [loftq(...), rilq]: RILQ trains the adapters the previous step initialised
            log.info("rilq: continuing the existing adapters %r", c.name)
        elif c.rank:
            torch.manual_seed(c.seed)  # the Gaussian init depends on the seed only, not on what ran before
            attach(model, c.adapter_config(), name=c.name)
        params = freeze(model, c.name)
        scales = {True: "channel", False: "none"}.get(c.scales, c.scales)
        relaxed = self._relax(model) if c.codes else {}
        for m in relaxed.values():  # QAT: the codes' offsets (and with scales "group" the multipliers) train
            m.multiplier.requires_grad_(scales == "group")  # no gradient for multipliers nothing optimizes
            params += [m.offset] + ([m.multiplier] if scales == "group" else [])
        if scales != "none" and not relaxed:
            layers = [m for _, m in find_qlinears(model, c.targets, c.ignore) if has_row_scales(m)]
            if not layers:
                raise LowbitError(f"scales={c.scales!r} needs weights with row-wise scales (uniform channel- or "
                                  "group-wise, or LowRA codebooks); this model has none")
            if scales == "group":
                train_group_scales(layers)
                params += [m.group_scale for m in layers]
            else:
                train_channel_scales(layers)
                params += [m.channel_scale for m in layers]
        initial = [p.detach().clone() for p in params]
        lr = c.learning_rate(continuing)
        # Adam without weight decay (AdamW with 0 decay is exactly Adam); no warmup, the schedule over max_steps
        procs = processes(device or CPU)  # under accelerate launch: each process trains its shard of every batch
        check_batch(c.micro_batch, procs)
        broadcast_(params, procs)
        engine = Engine(model, params, OptimConfig(steps=c.max_steps, lr=lr, schedule=c.schedule,
                                                   grad_accum=c.grad_accum),
                        gradient_checkpointing=c.gradient_checkpointing, desc=f"rilq r{c.rank}", processes=procs)
        gen = torch.Generator().manual_seed(c.seed)
        was_training = model.training
        model.train()
        v, v_mse, v_ce, v_kl = self.validate(model, val)
        history = {"step": [0], "train": [math.nan], "val": [v], "val_mse": [v_mse], "val_ce": [v_ce],
                   "val_kl": [v_kl], "mse": [], "ce": [], "kl": []}
        best, best_state, bad, step = history["val"][0], None, 0, 0
        order: list[int] = []

        def micro_loss(at: int, micro: int) -> torch.Tensor:
            batch = []
            while len(batch) < c.micro_batch:  # a fresh shuffle of the training windows every epoch
                if not order:
                    order.extend(train[j] for j in torch.randperm(len(train), generator=gen).tolist())
                batch.append(order.pop())
            loss, mse, ce, kl = self.loss(model, shard(torch.tensor(batch), procs).tolist())
            history["mse"].append(mse)
            history["ce"].append(ce)
            history["kl"].append(kl)
            return loss

        try:
            with contextlib.closing(engine.run(micro_loss)) as steps:
                for step, running, _ in steps:
                    engine.bar.set_postfix(loss=f"{running:.3f}", best_val=f"{best:.3f}")
                    if step % c.eval_every == 0 or step == c.max_steps:
                        v, v_mse, v_ce, v_kl = self.validate(model, val)
                        for key, value in (("step", step), ("train", running), ("val", v), ("val_mse", v_mse),
                                           ("val_ce", v_ce), ("val_kl", v_kl)):
                            history[key].append(value)
                        if v < best:
                            best, bad = v, 0
                            best_state = [p.detach().clone() for p in params]
                        else:
                            bad += 1
                    if bad >= c.patience:
                        break
        finally:
            model.train(was_training)
        with torch.no_grad():  # the best validated state; never beaten: the state it started from
            for p, b in zip(params, initial if best_state is None else best_state, strict=True):
                p.copy_(b)
            if best_state is None and not continuing and c.rank:  # untrained (no-op) adapters: drop them
                remove(model, c.name)
        for p in params:
            p.requires_grad_(False)
        store_adapters(model, c.adapter_dtype)  # what the checkpoint holds is what was evaluated
        for name, m in relaxed.items():  # QAT: packed again (codes round(q + v), scales s·m)
            set_module(model, name, m.packed())
        if scales == "group" and not relaxed:  # into the packed scales now: decode runs the packed kernels
            for m in layers:
                m.fold_trained_scales()
        state_of(model).history["rilq"] = {**history, "lr": lr, "best_val": best, "steps": step,
                                           "seconds": time.perf_counter() - start, "stopped_early": bad >= c.patience}
        log.info("rilq: %d steps, validation loss %.4f -> %.4f", step, history["val"][0], best)
        self.windows = self.teacher = None
        if device is not None:
            model.to("cpu")
        return model
