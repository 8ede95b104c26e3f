"""Commands that train or transform adapters: finetune, merge, compensate, export. Each parses its flags into
an API config, calls one :mod:`lowbit.api` function and prints its result."""

from __future__ import annotations

from pathlib import Path

import typer

from ..device import DEVICE_HELP
from ..protocol import EVAL_WINDOWS
from .common import (
    DATA_OPTION,
    FORCE_OPTION,
    JSON_OPTION,
    OUT_OPTION,
    VERBOSE_OPTION,
    app,
    emit,
    fail,
    parse_windows,
    relaunch,
    run_job,
)

SKIP_HELP = "WikiText-2 test windows to evaluate after: N (the first N), all, or 0 (skip)."


@app.command()
def finetune(
    model: str = typer.Argument(..., help="lowbit checkpoint (the packed base), or a float model with --recipe."),
    out: Path = typer.Option(..., help="Output checkpoint folder: base + adapters (must not exist unless --force)."),
    adapter: str = typer.Option("lora", help="lora, lorma, or none (with --train-outliers)."),
    train_outliers: bool = typer.Option(False, "--train-outliers", help="Also train the full-precision outlier "
                                        "columns and per-channel weight scales of a QUAD model (methods.md §7.4), "
                                        "with or without adapters."),
    rank: int = typer.Option(16, help="Adapter rank."),
    alpha: float = typer.Option(0.0, help="Adapter alpha (0 = 2 x rank)."),
    targets: str = typer.Option("@decoder", help="Comma-separated layer patterns to adapt."),
    lorma_variant: str = typer.Option("rri", help="LoRMA: rri (I + sBA) or shift (s·π(BA))."),
    lorma_mode: str = typer.Option("pre", help="LoRMA: pre (output side) or post (input side)."),
    recipe: str = typer.Option("", help="Quantize MODEL (a float model) with this recipe first."),
    steps: int = typer.Option(200, help="Optimizer steps."),
    batch: int = typer.Option(4, help="Sequences per micro-batch."),
    seq_len: int = typer.Option(256, help="Tokens per sequence."),
    grad_accum: int = typer.Option(1, help="Micro-batches per optimizer step."),
    lr: float = typer.Option(2e-4, help="Peak learning rate (warmup 3%, cosine decay)."),
    seed: int = typer.Option(0, help="Seed of the data order and the adapter init."),
    precision: str = typer.Option("auto", help="Matmul precision: auto (bf16 where the CPU/GPU has native bf16), "
                                             "bf16 or fp32. Weights and optimizer state stay fp32."),
    data: Path = typer.Option(None, help="Training text file or .jsonl with prompt/response (default: WikiText-2 "
                                         "valid), or a data folder to take WikiText-2 valid from."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run from OUT.trainer/."),
    checkpoint_every: int = typer.Option(25, help="Steps between resumable training-state saves."),
    windows: str = typer.Option("0", help=SKIP_HELP),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    stop_after: int = typer.Option(0, help="Leave after this many optimizer steps, the training state kept in "
                                           "OUT.trainer/ for --resume (a time-limited job); 0 = train to the end."),
    processes: int = typer.Option(1, help="Data-parallel processes, started through accelerate launch (gloo on "
                                          "CPUs, NCCL on GPUs): each trains its share of every --batch, which must "
                                          "divide evenly; --resume works with any count."),
    fsdp: bool = typer.Option(False, "--fsdp", help="With --processes N: shard the float parameters (embeddings, "
                                                    "norms, head, adapters) over the processes with FSDP instead "
                                                    "of a whole copy in each."),
    force: bool = FORCE_OPTION,
    as_json: bool = JSON_OPTION,
    verbose: bool = VERBOSE_OPTION,
):
    """Fine-tune adapters over the packed, frozen base; the result is a checkpoint eval/generate/bench accept.

    A checkpoint that already holds adapters (lowbit compensate, an earlier finetune) continues training them.
    The resumable training state lives in OUT.trainer/ (beside OUT) until the checkpoint is saved."""
    from ..api import FinetuneConfig, finetune
    from ..device import launched
    from ..train import TrainConfig
    from ..train.distributed import main_process
    folder = data if data is not None and data.is_dir() else None  # a data folder, not a training file
    if processes < 1:
        fail(f"--processes must be >= 1, got {processes}")
    if fsdp and processes == 1 and not launched():
        fail("--fsdp shards over several processes: add --processes N (N >= 2)")
    if processes > 1 and not launched():
        if batch % processes:
            fail(f"--batch {batch} does not split over --processes {processes}: pick a batch that is a multiple "
                 "of it")
        relaunch(processes)

    def job():
        train = TrainConfig(steps=steps, batch=batch, grad_accum=grad_accum, lr=lr, seed=seed,
                            checkpoint_every=checkpoint_every, precision=precision)
        config = FinetuneConfig(
            model=model, out=out, adapter=adapter, rank=rank, alpha=alpha,
            targets=tuple(t.strip() for t in targets.split(",") if t.strip()), lorma_variant=lorma_variant,
            lorma_mode=lorma_mode, train_outliers=train_outliers, recipe=recipe, train=train, seq_len=seq_len,
            data=None if folder is not None else data, resume=resume,
            windows=parse_windows(windows), force=force, device=device,
            stop_after=stop_after, fsdp=fsdp)
        return finetune(config)

    result = run_job(verbose, job, folder)
    if main_process():
        emit(result.to_dict(), as_json, f"lowbit finetune: {model}")


@app.command()
def merge(
    model: str = typer.Argument(..., help="lowbit checkpoint with adapters (from lowbit finetune)."),
    out: Path = OUT_OPTION,
    requantize: bool = typer.Option(False, help="Quantize the merged layers again with their own grid (a lowbit "
                                                "checkpoint) instead of writing a float model."),
    windows: str = typer.Option("0", help="WikiText-2 test windows to evaluate before and after: N, all, or 0 "
                                          "(skip)."),
    force: bool = FORCE_OPTION,
    data: Path | None = DATA_OPTION,
    as_json: bool = JSON_OPTION,
    verbose: bool = VERBOSE_OPTION,
):
    """Merge adapters into the dequantized base: a float transformers model, or (--requantize) a packed one."""
    from ..api import MergeConfig, merge

    result = run_job(verbose, lambda: merge(MergeConfig(
        model=model, out=out, requantize=requantize, windows=parse_windows(windows), force=force)), data)
    emit(result.to_dict(), as_json, f"lowbit merge: {model}")


@app.command()
def compensate(
    model: str = typer.Argument(..., help="lowbit checkpoint to compensate (its manifest names the float source)."),
    method: str = typer.Option("rilq", help="rilq (model-level loss, trains adapters) or loftq (residual SVD)."),
    rank: int = typer.Option(16, help="Adapter rank."),
    out: Path = OUT_OPTION,
    windows: str = typer.Option(str(EVAL_WINDOWS), help=SKIP_HELP),
    max_steps: int = typer.Option(0, help="RILQ: optimizer steps (0 = the default)."),
    processes: int = typer.Option(1, help="RILQ: data-parallel processes, started through accelerate launch; "
                                          "each trains its share of every batch (4 windows: 1, 2 or 4)."),
    precision: str = typer.Option("auto", help="RILQ's matmul precision (teacher and student): auto (bf16 where "
                                             "native), bf16 or fp32."),
    device: str = typer.Option("auto", help="Where RILQ trains: " + DEVICE_HELP),
    force: bool = FORCE_OPTION,
    data: Path | None = DATA_OPTION,
    as_json: bool = JSON_OPTION,
    verbose: bool = VERBOSE_OPTION,
):
    """Win back 2-bit quality with adapters: RILQ trains them against the float model, LoftQ fits the residual."""
    from ..api import CompensateConfig, compensate
    from ..device import launched
    from ..train.distributed import main_process

    if processes < 1:
        fail(f"--processes must be >= 1, got {processes}")
    if processes > 1 and not launched():
        if method != "rilq":
            fail(f"--processes splits RILQ's training; --method {method} does not train: drop --processes")
        relaunch(processes)

    result = run_job(verbose, lambda: compensate(CompensateConfig(
        model=model, out=out, method=method, rank=rank, max_steps=max_steps, windows=parse_windows(windows),
        force=force, precision=precision, device=device)), data)
    if main_process():
        emit(result.to_dict(), as_json, f"lowbit compensate: {model}")


@app.command("export")
def export_adapters(
    model: str = typer.Argument(..., help="lowbit checkpoint (with adapters for peft and native)."),
    out: Path = OUT_OPTION,
    fmt: str = typer.Option("peft", "--to", "--format",
                            help="peft (LoRA: PEFT adapter files + the dequantized base), native (any adapter: "
                                 "factors + merged float model), compressed-tensors (the packed model for vLLM "
                                 "and transformers; --out is a folder) or gguf (llama.cpp, Ollama; --out is a "
                                 ".gguf file)."),
    requantize: bool = typer.Option(False, "--requantize", help="compressed-tensors: round grids it cannot store "
                                    "(NF, FP, IQ4_NL, LowRA) into the nearest int grid; the perplexity change is "
                                    "measured on --windows."),
    windows: str = typer.Option(str(EVAL_WINDOWS), help=SKIP_HELP),
    force: bool = FORCE_OPTION,
    as_json: bool = JSON_OPTION,
    verbose: bool = VERBOSE_OPTION,
    data: Path | None = DATA_OPTION,
):
    """Export adapters (PEFT's layout for LoRA, lowbit's own plus a merged float model for any adapter), or the
    packed model in the layout a serving engine loads (compressed-tensors, gguf)."""
    from ..api import ExportConfig, export

    result = run_job(verbose, lambda: export(ExportConfig(model=model, out=out, layout=fmt, force=force,
                                                          requantize=requantize, windows=parse_windows(windows))),
                     data)
    emit(result.to_dict(), as_json, f"lowbit export: {model}")
