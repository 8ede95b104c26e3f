"""``api.finetune`` (adapters over the packed base) and ``api.compensate`` (RILQ or LoftQ on a checkpoint)."""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..adapters import (
    AdapterConfig,
    LoRAConfig,
    LoRMAConfig,
    adapter_dtype,
    attach,
    check_storage,
    freeze,
    manifest_entry,
    store_adapters,
    train_outliers,
)
from ..calibration import Calibration
from ..compensate import LoftQConfig, RILQConfig
from ..data import check_data
from ..device import process_device, resolve_device
from ..errors import LowbitError
from ..eval.perplexity import perplexity
from ..fileio import atomic_write, check_output, json_text
from ..io import save
from ..memory import peak_rss_mb, reset_peak
from ..models import DECODER, check_seq_len, check_source
from ..protocol import EVAL_WINDOWS
from ..recipe import Recipe, apply_recipe
from ..state import state_of
from ..train import TrainConfig, load_data, plot_losses, write_log
from ..train.distributed import barrier, broadcast_, finish, fsdp_shard, gather_trained, processes
from ..train.trainer import lm_loss
from .common import Evaluated, Result, check_out, check_windows

log = logging.getLogger(__name__)
ADAPTERS = ("lora", "lorma", "none")


@dataclass(frozen=True)
class FinetuneConfig:
    """``lowbit finetune``: train adapters (and with ``train_outliers`` QUAD's float columns and channel scales)
    over the packed, frozen base of ``model`` (a checkpoint; a float model with ``recipe``). A checkpoint that
    already holds adapters continues training them. The resumable state lives in ``OUT.trainer/``. Started by
    ``accelerate launch`` (``lowbit finetune --processes N``) each process trains its shard of every batch and
    only the main one writes (:mod:`lowbit.train.distributed`)."""

    model: str
    out: Path
    adapter: str = "lora"  # lora | lorma | none (with train_outliers)
    rank: int = 16
    alpha: float = 0.0  # 0 = 2 x rank
    targets: tuple[str, ...] = (DECODER,)
    lorma_variant: str = "rri"
    lorma_mode: str = "pre"
    train_outliers: bool = False
    adapter_dtype: str = "bfloat16"  # stored: bf16 (half fp32's bits) | float32 | int8 | int4 (LoRA); trained in fp32
    recipe: str = ""  # quantize a float model with this recipe first
    train: TrainConfig = field(default_factory=lambda: TrainConfig(checkpoint_every=25))
    seq_len: int = 256
    data: Path | None = None  # text file or .jsonl prompt/response pairs; None = WikiText-2 valid
    resume: bool = False
    windows: int | None = 0  # test windows evaluated after training; 0 = skip, None = all
    force: bool = False
    device: str = "auto"  # auto | cpu | cuda[:N] (lowbit.device.resolve_device)
    stop_after: int = 0  # leave after this many steps, the state kept for --resume (0 = to the end)
    fsdp: bool = False  # launched as several processes: FSDP shards the float parameters (train.distributed)

    def adapter_config(self) -> AdapterConfig | None:
        if self.adapter == "lora":
            return LoRAConfig(rank=self.rank, alpha=self.alpha, targets=self.targets)
        if self.adapter == "lorma":
            return LoRMAConfig(rank=self.rank, alpha=self.alpha, targets=self.targets, variant=self.lorma_variant,
                                  mode=self.lorma_mode)
        return None


@dataclass
class FinetuneResult(Result, Evaluated):
    omit_none = True
    source: str
    out: str
    adapter: str
    rank: int
    outlier_weights: int
    first_loss: float
    final_loss: float
    steps: int
    tokens: int
    seconds: float
    tokens_per_second: float
    peak_rss_mb: float
    config: dict
    data: str
    examples: int
    losses: list[float] = field(default_factory=list, repr=False)
    step_tokens_per_second: list[float] = field(default_factory=list, repr=False)
    processes: int = 1
    stopped_at: int | None = None  # a --stop-after run: the step whose state OUT.trainer/ holds (no checkpoint)


def base_identity(model, recipe=None) -> str:
    """What a resumed run must find again: the checkpoint's manifest hash (it covers every file's SHA-256), or a
    float source's path, plus the recipe applied on load."""
    manifest = state_of(model).manifest or {}
    identity = manifest.get("manifest_sha256") or f"float:{state_of(model).source}"
    return f"{identity}+{recipe}" if recipe else identity


def finetune(config: FinetuneConfig) -> FinetuneResult:
    import torch

    from ..io import load_model
    from ..train import train as train_loop  # read at call time, so a test can wrap lowbit.train.train

    out = Path(config.out)
    state_dir = out.parent / f"{out.name}.trainer"
    check_source(config.model)
    check_out(out, config.force, config.model, size_ratio=1.0)
    if not config.resume:  # a new run replaces the state a killed run left, but only a lowbit training state
        check_output(state_dir, force=True, what="training state folder")
    check_windows(config.windows)
    if config.stop_after < 0:
        raise LowbitError(f"--stop-after must be >= 0 (0 = train to the end), got {config.stop_after}")
    if config.adapter not in ADAPTERS:
        raise LowbitError(f"--adapter must be lora, lorma or none, got {config.adapter!r}")
    if config.adapter == "none" and not config.train_outliers:
        raise LowbitError("--adapter none trains nothing: add --train-outliers (QUAD's PEFT) or pick an adapter")
    adapter_dtype(config.adapter_dtype)
    adapter_config = config.adapter_config()
    check_data(test=config.windows != 0, valid=config.data is None)
    device = process_device(resolve_device(config.device))
    procs = processes(device)
    barrier(procs)  # every process has checked the output before the main one may write it
    model, tok = load_model(config.model)
    if tok is None:
        raise LowbitError(f"{config.model} has no tokenizer files; re-save it with a tokenizer")
    check_seq_len(model, config.seq_len)
    if config.recipe:
        apply_recipe(model, config.recipe, Calibration(tokenizer=tok))
    train_data = load_data(tok, config.data, config.seq_len)
    torch.manual_seed(config.train.seed)
    adapter, rank = config.adapter, config.rank
    existing = manifest_entry(model)
    if existing:  # e.g. a RILQ or LoftQ checkpoint: its adapters are the initialisation, train them on
        first = next(iter(existing.values()))["config"]
        adapter, rank = first["step"], first["rank"]
        log.warning("continuing the adapters already in %s: %s (adapter, rank, alpha and targets are not used)",
                    config.model, ", ".join(existing))
    elif adapter_config is not None:
        attach(model, adapter_config)
    if adapter != "none":  # checked before training, not when storing after it
        check_storage(adapter, config.adapter_dtype)
    freeze(model)
    outlier_weights = train_outliers(model) if config.train_outliers else 0
    if outlier_weights:
        log.warning("training %d outlier weights and channel scales (QUAD PEFT)", outlier_weights)
    if config.fsdp and procs.count > 1:  # a sharded copy trains; the trained tensors come back into model
        broadcast_([p for p in model.parameters() if p.requires_grad], procs)
        trainee = fsdp_shard(model, procs, device, loss=lm_loss)
    else:
        trainee = model.to(device)
    trained = train_loop(trainee, train_data, config.train, state_dir=state_dir, resume=config.resume,
                         base=base_identity(model, config.recipe), processes=procs, stop_after=config.stop_after)
    if trainee is not model:
        gather_trained(trainee, model)
        del trainee
    model.to("cpu")
    stats = trained.to_dict()
    result = FinetuneResult(source=str(config.model), out=str(out), adapter=adapter, rank=rank,
                            outlier_weights=outlier_weights, **stats, data=train_data.source,
                            examples=len(train_data), processes=procs.count,
                            stopped_at=None if trained.finished else trained.steps)
    if procs.main and trained.finished:
        _save_finetuned(model, tok, config, result, state_dir, adapter, rank)
    barrier(procs)
    finish(procs)
    return result


def _save_finetuned(model, tok, config: FinetuneConfig, result: FinetuneResult, state_dir: Path, adapter: str,
                    rank: int) -> None:
    """Evaluate (``config.windows``), save the checkpoint with its log and loss chart, drop the training state."""
    out = Path(config.out)
    model.eval()
    store_adapters(model, config.adapter_dtype)  # evaluated as the checkpoint stores them
    if config.windows != 0:
        ppl = perplexity(model, tok, windows=config.windows)
        result.ppl, result.windows = ppl.ppl, ppl.windows
    summary = {k: v for k, v in result.to_dict().items() if k != "config"}
    save(model, out, tokenizer=tok, force=config.force, extra={"finetune": summary})
    write_log(out / "train_log.json", {**result.to_dict(), "losses": result.losses,
                                       "step_tokens_per_second": result.step_tokens_per_second})
    plot_losses({adapter: result.losses}, out / "loss.png", title=f"{adapter} r{rank} over {config.model}")
    shutil.rmtree(state_dir, ignore_errors=True)  # the checkpoint is saved: nothing left to resume


@dataclass(frozen=True)
class CompensateConfig:
    """``lowbit compensate``: RILQ (adapters trained against the float source's outputs) or LoftQ (re-quantize
    the float source with the checkpoint's own single quantizer step, fitting the residual) on a checkpoint."""

    model: str
    out: Path
    method: str = "rilq"  # rilq | loftq
    rank: int = 16
    max_steps: int = 0  # RILQ optimizer steps; 0 = its default
    windows: int | None = EVAL_WINDOWS  # test windows evaluated after; 0 = skip, None = all
    force: bool = False
    precision: str = "auto"  # RILQ's matmuls: auto (bf16 where native) | bf16 | fp32
    device: str = "auto"  # RILQ trains on: auto | cpu | cuda[:N] (lowbit.device.resolve_device)


@dataclass
class CompensateResult(Result, Evaluated):
    omit_none = True
    source: str
    method: str
    rank: int
    out: str
    seconds: float = 0.0  # loading, compensating and the teacher pass; not the evaluation
    peak_rss_mb: float = 0.0
    loss_curve: str | None = None
    rilq_steps: int | None = None
    best_val_loss: float | None = None
    processes: int = 1


def compensate(config: CompensateConfig) -> CompensateResult:
    from ..io import load, load_model  # read at call time (tests watch what loads)

    if config.method not in ("rilq", "loftq"):
        raise LowbitError(f"--method must be rilq or loftq, got {config.method!r}")
    if config.max_steps < 0:
        raise LowbitError("--max-steps must be >= 0")
    check_windows(config.windows)
    check_source(config.model)
    check_out(config.out, config.force, config.model, size_ratio=1.0)
    out = Path(config.out)
    if config.method == "rilq":
        check_output(out.parent / f"{out.name}.rilq.json", what="RILQ loss curve", kind="file")
    check_data(test=config.windows != 0, valid=config.method == "rilq")
    device = process_device(resolve_device(config.device))
    procs = processes(device)  # RILQ under accelerate launch: every process trains its shard, the main one writes
    barrier(procs)
    reset_peak()
    start = time.perf_counter()
    model, tok = load(config.model)
    if tok is None:
        raise LowbitError(f"{config.model} has no tokenizer files; re-save it with a tokenizer")
    result = CompensateResult(source=str(config.model), method=config.method, rank=config.rank, out=str(out))
    previous = state_of(model).recipe
    if config.method == "rilq":
        rilq = RILQConfig(rank=config.rank, precision=config.precision,
                          **({"max_steps": config.max_steps} if config.max_steps else {}))
        apply_recipe(model, Recipe([rilq], name="rilq"),
                     Calibration(tokenizer=tok, device=None if device.type == "cpu" else device))
        recipe = Recipe([*(previous.steps if previous else []), rilq],
                        name=f"{getattr(previous, 'name', 'custom')}+rilq{config.rank}")
        history = state_of(model).history["rilq"]
        curve = out.parent / f"{out.name}.rilq.json"
        if procs.main:
            atomic_write(curve, json_text(history, indent=1))
        result = replace(result, loss_curve=str(curve), rilq_steps=history["steps"], best_val_loss=history["best_val"])
    else:
        steps = getattr(previous, "steps", [])
        if len(steps) != 1:
            raise LowbitError(f"{config.model} was not made by a single quantizer step; LoftQ re-quantizes from the "
                              "float source with that step")
        recipe = Recipe([LoftQConfig(quantizer=steps[0].to_dict(), rank=config.rank)], name=f"loftq-r{config.rank}")
        source = state_of(model).source
        del model
        model, _ = load_model(source)
        apply_recipe(model, recipe)
    state_of(model).recipe = recipe
    result = replace(result, seconds=time.perf_counter() - start, peak_rss_mb=peak_rss_mb(), processes=procs.count)
    if procs.main:
        if config.windows != 0:
            ppl = perplexity(model, tok, windows=config.windows)
            result = replace(result, ppl=ppl.ppl, windows=ppl.windows)
        save(model, out, tokenizer=tok, force=config.force,
             extra={k: v for k, v in (("ppl", result.ppl), ("windows", result.windows)) if v is not None})
    barrier(procs)
    finish(procs)
    return result
