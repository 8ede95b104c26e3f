"""Commands that train or transform adapters: finetune, merge, compensate, export."""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer

from ..errors import LowbitError
from .common import app, emit, err_console, fail, setup_logging


@app.command()
def finetune(
    path: str = typer.Argument(..., help="lowbit checkpoint (the packed base), or a model name with --recipe."),
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
    recipe: str = typer.Option("", help="Quantize PATH (a float model) with this recipe first."),
    steps: int = typer.Option(200, help="Optimizer steps."),
    batch: int = typer.Option(4, help="Sequences per micro-batch."),
    seq_len: int = typer.Option(256, help="Tokens per sequence."),
    grad_accum: int = typer.Option(1, help="Micro-batches per optimizer step."),
    lr: float = typer.Option(2e-4, help="Peak learning rate (warmup 3%, cosine decay)."),
    seed: int = typer.Option(0, help="Seed of the data order and the adapter init."),
    precision: str = typer.Option("auto", help="Matmul precision: auto (bf16 where the CPU/GPU has native bf16), "
                                             "bf16 or fp32. Weights and optimizer state stay fp32."),
    data: Path = typer.Option(None, help="Training text file or .jsonl with prompt/response (default: WikiText-2 "
                                         "valid)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run from OUT.trainer/."),
    checkpoint_every: int = typer.Option(25, help="Steps between resumable training-state saves."),
    windows: int = typer.Option(0, help="WikiText-2 test windows to evaluate after training (0 = skip)."),
    force: bool = typer.Option(False, "--force", help="Replace the output folder if it exists."),
    as_json: bool = typer.Option(False, "--json"),
    verbose: bool = typer.Option(False, "-v", "--verbose"),
):
    """Fine-tune adapters over the packed, frozen base; the result is a checkpoint eval/generate/bench accept.

    A checkpoint that already holds adapters (lowbit compensate, an earlier finetune) continues training them.
    The resumable training state lives in OUT.trainer/ (beside OUT) until the checkpoint is saved."""
    setup_logging(verbose)
    import shutil

    import torch

    from .. import adapters as ad
    from .. import io
    from ..api import quantize as apply_recipe
    from ..calibration import Calibration
    from ..eval.perplexity import perplexity
    from ..io import load_model
    from ..train import TrainConfig, load_data, plot_losses, train, write_log

    state_dir = out.parent / f"{out.name}.trainer"
    try:
        if out.exists() and not force:
            raise LowbitError(f"output folder {out} already exists; choose another folder or pass --force")
        if windows < 0:
            raise LowbitError(f"--windows must be 0 (skip) or positive, got {windows}")
        if adapter not in ("lora", "lorma", "none"):
            raise LowbitError(f"--adapter must be lora, lorma or none, got {adapter!r}")
        if adapter == "none" and not train_outliers:
            raise LowbitError("--adapter none trains nothing: add --train-outliers (QUAD's PEFT) or pick an adapter")
        config = TrainConfig(steps=steps, batch=batch, grad_accum=grad_accum, lr=lr, seed=seed,
                             checkpoint_every=checkpoint_every, precision=precision)
        patterns = tuple(t.strip() for t in targets.split(",") if t.strip())
        adapter_config = None
        if adapter == "lora":
            adapter_config = ad.LoRAConfig(rank=rank, alpha=alpha, targets=patterns)
        elif adapter == "lorma":
            adapter_config = ad.LoRMAConfig(rank=rank, alpha=alpha, targets=patterns, variant=lorma_variant,
                                            mode=lorma_mode)
        model, tok = load_model(path)
        if tok is None:
            raise LowbitError(f"{path} has no tokenizer files; re-save it with a tokenizer")
        if recipe:
            apply_recipe(model, recipe, Calibration(tokenizer=tok))
        train_data = load_data(tok, data, seq_len)
        torch.manual_seed(seed)
        existing = ad.manifest_entry(model)
        if existing:  # e.g. a RILQ or LoftQ checkpoint: its adapters are the initialisation, train them on
            err_console.print(f"[dim]continuing the adapters already in {path}: {', '.join(existing)} "
                              "(--adapter/--rank/--alpha/--targets are not used)[/]")
            first = next(iter(existing.values()))["config"]
            adapter, rank = first["step"], first["rank"]
        elif adapter_config is not None:
            ad.attach(model, adapter_config)
        ad.freeze(model)
        outlier_weights = ad.train_outliers(model) if train_outliers else 0
        if outlier_weights:
            err_console.print(f"[dim]training {outlier_weights:,} outlier weights and channel scales (QUAD PEFT)[/]")
        result = train(model, train_data, config, state_dir=state_dir, resume=resume)
        payload = {"source": path, "out": str(out), "adapter": adapter, "rank": rank,
                   "outlier_weights": outlier_weights, **result.to_dict(),
                   "data": train_data.source, "examples": len(train_data)}
        curves = {k: payload.pop(k) for k in ("losses", "step_tokens_per_second")}
        model.eval()
        if windows:
            ppl = perplexity(model, tok, windows=windows)
            payload.update(ppl=ppl.ppl, windows=ppl.windows)
        io.save(model, out, tokenizer=tok, force=force, extra={"finetune": {k: v for k, v in payload.items()
                                                                            if k != "config"}})
        write_log(out / "train_log.json", {**payload, **curves})
        plot_losses({adapter: result.losses}, out / "loss.png", title=f"{adapter} r{rank} over {path}")
        shutil.rmtree(state_dir, ignore_errors=True)  # the checkpoint is saved: nothing left to resume
    except LowbitError as e:
        fail(str(e))
    emit(payload, as_json, f"lowbit finetune: {path}")


@app.command()
def merge(
    path: str = typer.Argument(..., help="lowbit checkpoint with adapters (from lowbit finetune)."),
    out: Path = typer.Option(..., help="Output folder (must not exist unless --force)."),
    requantize: bool = typer.Option(False, help="Quantize the merged layers again with their own grid (a lowbit "
                                                "checkpoint) instead of writing a float model."),
    windows: int = typer.Option(0, help="WikiText-2 test windows to evaluate before and after (0 = skip)."),
    force: bool = typer.Option(False, "--force", help="Replace the output folder if it exists."),
    as_json: bool = typer.Option(False, "--json"),
    verbose: bool = typer.Option(False, "-v", "--verbose"),
):
    """Merge adapters into the dequantized base: a float transformers model, or (--requantize) a packed one."""
    setup_logging(verbose)
    from .. import export, io
    from ..adapters import adapted_layers
    from ..eval.perplexity import perplexity

    try:
        if windows < 0:
            raise LowbitError(f"--windows must be 0 (skip) or positive, got {windows}")
        model, tok = io.load(path)
        if not adapted_layers(model):
            raise LowbitError(f"{path} has no adapters to merge; fine-tune it first (lowbit finetune)")
        payload: dict = {"source": path, "out": str(out), "adapted_layers": len(adapted_layers(model))}
        if windows:
            payload["ppl_adapters"] = perplexity(model, tok, windows=windows).ppl
        if requantize:
            merged, errors = export.requantize(model)
            io.save(merged, out, tokenizer=tok, force=force)
            payload.update(kind="lowbit", requantize_rel_error_mean=sum(errors.values()) / len(errors),
                           requantize_rel_error_max=max(errors.values()))
        else:
            merged = export.merged_float_model(model)
            export.save_float(merged, out, tokenizer=tok, force=force)
            payload["kind"] = "float"
        if windows:
            payload["ppl_merged"] = perplexity(merged, tok, windows=windows).ppl
            payload["windows"] = windows
    except LowbitError as e:
        fail(str(e))
    emit(payload, as_json, f"lowbit merge: {path}")


@app.command()
def compensate(
    path: str = typer.Argument(..., help="lowbit checkpoint to compensate (its manifest names the float source)."),
    method: str = typer.Option("rilq", help="rilq (model-level loss, trains adapters) or loftq (residual SVD)."),
    rank: int = typer.Option(16, help="Adapter rank."),
    out: Path = typer.Option(..., help="Output checkpoint folder (must not exist unless --force)."),
    windows: int = typer.Option(16, help="WikiText-2 test windows to evaluate after (0 = skip)."),
    max_steps: int = typer.Option(0, help="RILQ: optimizer steps (0 = the default)."),
    force: bool = typer.Option(False, "--force", help="Replace the output folder if it exists."),
    as_json: bool = typer.Option(False, "--json"),
    verbose: bool = typer.Option(False, "-v", "--verbose"),
):
    """Win back 2-bit quality with adapters: RILQ trains them against the float model, LoftQ fits the residual."""
    setup_logging(verbose)
    from .. import io
    from ..api import quantize as apply_recipe
    from ..calibration import Calibration
    from ..compensate import LoftQConfig, RILQConfig
    from .. import memory
    from ..eval.perplexity import perplexity
    from ..io import load_model
    from ..recipe import Recipe

    try:
        if method not in ("rilq", "loftq"):
            raise LowbitError(f"--method must be rilq or loftq, got {method!r}")
        if windows < 0 or max_steps < 0:
            raise LowbitError("--windows and --max-steps must be >= 0")
        if out.exists() and not force:
            raise LowbitError(f"output folder {out} already exists; choose another folder or pass --force")
        memory.reset_peak()
        start = time.perf_counter()
        model, tok = io.load(path)
        if tok is None:
            raise LowbitError(f"{path} has no tokenizer files; re-save it with a tokenizer")
        payload: dict = {"source": path, "method": method, "rank": rank}
        if method == "rilq":
            config = RILQConfig(rank=rank, **({"max_steps": max_steps} if max_steps else {}))
            steps = [*model.lowbit_recipe.steps] if getattr(model, "lowbit_recipe", None) else []
            apply_recipe(model, Recipe([config], name="rilq"), Calibration(tokenizer=tok))
            recipe = Recipe([*steps, config], name=f"{getattr(model.lowbit_recipe, 'name', 'custom')}+rilq{rank}")
            history = model.lowbit_rilq
            curve = out.parent / f"{out.name}.rilq.json"
            from ..report import write_text_atomic

            write_text_atomic(curve, json.dumps(history, indent=1))
            payload.update(loss_curve=str(curve), rilq_steps=history["steps"], best_val_loss=history["best_val"])
        else:
            recipe_steps = getattr(getattr(model, "lowbit_recipe", None), "steps", [])
            if len(recipe_steps) != 1:
                raise LowbitError(f"{path} was not made by a single quantizer step; LoftQ re-quantizes from the "
                                  "float source with that step")
            config = LoftQConfig(quantizer=recipe_steps[0].to_dict(), rank=rank)
            source = model.lowbit_source
            del model
            model, _ = load_model(source)
            recipe = Recipe([config], name=f"loftq-r{rank}")
            apply_recipe(model, recipe)
        model.lowbit_recipe = recipe
        payload["seconds"] = time.perf_counter() - start
        payload["peak_rss_mb"] = memory.peak_rss_mb()
        if windows:
            result = perplexity(model, tok, windows=windows)
            payload.update(ppl=result.ppl, windows=result.windows)
        io.save(model, out, tokenizer=tok, force=force, extra={k: payload[k] for k in ("ppl", "windows")
                                                                if k in payload})
        payload["out"] = str(out)
    except LowbitError as e:
        fail(str(e))
    emit(payload, as_json, f"lowbit compensate: {path}")


@app.command("export")
def export_adapters(
    path: str = typer.Argument(..., help="lowbit checkpoint with adapters (from lowbit finetune)."),
    out: Path = typer.Option(..., help="Output folder (must not exist unless --force)."),
    fmt: str = typer.Option("peft", "--format", help="peft (LoRA: PEFT adapter files + the dequantized base) or "
                                                     "native (any adapter: factors + merged float model)."),
    force: bool = typer.Option(False, "--force", help="Replace the output folder if it exists."),
    as_json: bool = typer.Option(False, "--json"),
    verbose: bool = typer.Option(False, "-v", "--verbose"),
):
    """Export adapters: PEFT's layout for LoRA, lowbit's own (plus a merged float model) for any adapter."""
    setup_logging(verbose)
    from .. import export, io

    try:
        if fmt not in ("peft", "native"):
            raise LowbitError(f"--format must be peft or native, got {fmt!r}")
        model, tok = io.load(path)
        writer = export.export_peft if fmt == "peft" else export.export_native
        writer(model, out, tokenizer=tok, force=force)
    except LowbitError as e:
        fail(str(e))
    files = sorted(str(p.relative_to(out)) for p in Path(out).rglob("*") if p.is_file())
    emit({"source": path, "out": str(out), "format": fmt, "files": files}, as_json, f"lowbit export: {path}")
