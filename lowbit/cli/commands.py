"""Commands on models and checkpoints: quantize, eval, generate, info, recipes, report, bench."""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from ..errors import LowbitError
from . import common  # its out_console is read at call time (tests replace it)
from .common import (
    WINDOWS_HELP,
    app,
    emit,
    err_console,
    fail,
    recipe_with_overrides,
    setup_logging,
    window_count,
)


@app.command()
def quantize(
    model: str = typer.Option("smollm2-135m", help="Built-in name, HF model folder or .gguf file."),
    recipe: str = typer.Option("rtn-w4g128", help="Preset name or path to a recipe YAML file."),
    out: Path = typer.Option(..., help="Output checkpoint folder (must not exist unless --force)."),
    windows: int = typer.Option(16, help=WINDOWS_HELP),
    no_eval: bool = typer.Option(False, "--no-eval", help="Skip both perplexity evaluations."),
    force: bool = typer.Option(False, help="Replace the output folder if it exists."),
    fmt: str | None = typer.Option(None, "--format", help="Override: int | nf | fp4 | fp8."),
    bits: int | None = typer.Option(None, help="Override: code bits, 1-8."),
    group_size: int | None = typer.Option(None, help="Override: input columns per scale (multiple of 8)."),
    granularity: str | None = typer.Option(None, help="Override: tensor | channel | group."),
    symmetric: bool | None = typer.Option(None, "--symmetric/--asymmetric", help="Override: int grid type."),
    budget: float | None = typer.Option(None, help="Override (lowra): average code bits, e.g. 1.5."),
    calib_windows: int = typer.Option(16, help="Calibration windows (steps that need data, e.g. gptq)."),
    calib_seq_len: int = typer.Option(2048, help="Calibration window length in tokens."),
    calib_file: Path | None = typer.Option(None, help="Calibration text or .jsonl file (default: WikiText-2 valid)."),
    calib_self: bool = typer.Option(False, "--calib-self", help="Data-free calibration: text the float model "
                                    "samples itself (64 sequences of 512 tokens per 16 x 2048 windows)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
    verbose: bool = typer.Option(False, "-v", "--verbose"),
):
    """Quantize a model with a recipe, evaluate FP and quantized perplexity, and save a checkpoint."""
    setup_logging(verbose)
    from .. import api, io
    from ..calibration import Calibration, read_calibration_text
    from .. import memory
    from ..eval.perplexity import perplexity
    from ..io import load_model
    from ..models import resolve_source
    from ..registry import get

    try:
        n = window_count(windows)
        the_recipe = recipe_with_overrides(recipe, fmt, bits, group_size, granularity, symmetric, budget)
        resolve_source(model)
        if calib_windows < 1 or calib_seq_len < 2:
            raise LowbitError("--calib-windows must be >= 1 and --calib-seq-len >= 2")
        if calib_self and calib_file is not None:
            raise LowbitError("--calib-self and --calib-file both set: calibrate on one of them")
        own_data = [s.step for s in the_recipe.steps if get("step", s.step).own_windows]
        if calib_self and own_data:
            raise LowbitError(f"--calib-self applies to gptq and lowra-gptq; step {own_data[0]!r} of this recipe "
                              "does not use it yet; drop --calib-self or pass --calib-file")
        calib_text = read_calibration_text(calib_file) if calib_file is not None else None
        if out.exists() and not force:
            raise LowbitError(f"output folder {out} already exists; choose another --out or pass --force")
        fp_model, tokenizer = load_model(model)
        calib = Calibration(tokenizer=tokenizer, n=calib_windows, seq_len=calib_seq_len, text=calib_text,
                            self_generated=calib_self)
        if any(get("step", s.step).needs_calibration for s in the_recipe.steps):
            calib.get_windows(fp_model)  # a file too short for one window fails here, before any evaluation
        fp = None if no_eval else perplexity(fp_model, tokenizer, windows=n)
        fp_bytes = sum(p.numel() * p.element_size() for p in fp_model.parameters())
        memory.release_free_memory()
        memory.reset_peak()
        qmodel = api.quantize(fp_model, the_recipe, calib=calib)
        quantize_peak = memory.peak_rss_mb()
        q = None if no_eval else perplexity(qmodel, tokenizer, windows=n)
        extra = {"eval": {"fp_ppl": fp.ppl, "ppl": q.ppl, **q.to_dict()}} if q else {}
        io.save(qmodel, out, tokenizer=tokenizer, force=force, extra=extra)
        manifest = io.read_manifest(out)
    except LowbitError as e:
        fail(str(e))
    summary = manifest["summary"]
    payload = {
        "model": model, "recipe": the_recipe.name, "out": str(out),
        "fp_ppl": fp.ppl if fp else None, "ppl": q.ppl if q else None,
        "windows": q.windows if q else 0, "eval": q.label() if q else "skipped",
        "bits_per_weight": summary["bits_per_weight"], "code_bits": summary["code_bits"],
        "size_bytes": summary["size_bytes"], "size_mb": summary["size_bytes"] / 1e6,
        "packed_bytes": summary["packed_file_bytes"], "quantize_seconds": manifest["quantize_seconds"],
        "quantize_peak_rss_mb": quantize_peak, "fp_model_mb": fp_bytes / 2**20,
    }
    emit(payload, as_json, f"lowbit quantize: {the_recipe.name}")


@app.command("eval")
def evaluate(
    path: str = typer.Argument(..., help="lowbit checkpoint folder (or any model source load_model accepts)."),
    windows: int = typer.Option(16, help=WINDOWS_HELP),
    seq_len: int = typer.Option(2048, help="Window length in tokens."),
    tasks: str = typer.Option("", help="Comma-separated zero-shot tasks (piqa, arc_easy, boolq): report their "
                                       "acc and acc_norm instead of perplexity."),
    limit: int | None = typer.Option(None, help="With --tasks: only the first N examples of each task."),
    as_json: bool = typer.Option(False, "--json"),
    verbose: bool = typer.Option(False, "-v", "--verbose"),
):
    """WikiText-2 test perplexity of a checkpoint or model, or zero-shot task accuracy with --tasks."""
    setup_logging(verbose)
    from ..eval.perplexity import perplexity
    from ..io import load_model

    if tasks or limit is not None:
        _evaluate_tasks(path, tasks, limit, as_json)
        return
    try:
        n = window_count(windows)
        model, tokenizer = load_model(path)
        if tokenizer is None:
            raise LowbitError(f"{path} has no tokenizer files; re-save it with a tokenizer")
        start = time.perf_counter()
        result = perplexity(model, tokenizer, windows=n, seq_len=seq_len)
    except LowbitError as e:
        fail(str(e))
    emit({**result.to_dict(), "eval": result.label(), "seconds": time.perf_counter() - start}, as_json,
          f"lowbit eval: {path}")


def _evaluate_tasks(path: str, tasks: str, limit: int | None, as_json: bool) -> None:
    """``lowbit eval --tasks``: names, limit and data files are checked before the model loads; with --json the
    one object holds only the task keys, ``{"piqa": {"acc", "acc_norm", "n"}, ...}``."""
    from ..eval.tasks import evaluate_tasks, load_task, resolve_tasks
    from ..io import load_model

    try:
        if not tasks:
            raise LowbitError("--limit applies only with --tasks (e.g. --tasks piqa,arc_easy,boolq)")
        if limit is not None and limit < 1:
            raise LowbitError(f"--limit must be a positive number of examples, got {limit}")
        names = resolve_tasks(tasks.split(","))
        for name in names:
            load_task(name, limit)  # a missing or malformed file fails here, before the model loads
        model, tokenizer = load_model(path)
        if tokenizer is None:
            raise LowbitError(f"{path} has no tokenizer files; re-save it with a tokenizer")
        start = time.perf_counter()
        results = evaluate_tasks(model, tokenizer, names, limit=limit)
    except LowbitError as e:
        fail(str(e))
    seconds = time.perf_counter() - start
    if as_json:
        emit(results, True, "")
        return
    table = Table("task", "acc", "acc_norm", "n", title=escape(f"lowbit eval: {path}"))
    for name, r in results.items():
        table.add_row(name, f"{r['acc']:.4f}", f"{r['acc_norm']:.4f}", str(r["n"]))
    common.out_console.print(table)
    err_console.print(f"{seconds:.1f} s")


@app.command()
def generate(
    path: str = typer.Argument(..., help="lowbit checkpoint folder (or any model source)."),
    prompt: str = typer.Option(..., help="Text to continue (or the user turn with --chat)."),
    max_new_tokens: int = typer.Option(64, help="Tokens to generate."),
    chat: bool = typer.Option(True, "--chat/--raw", help="Wrap the prompt in the model's chat template."),
    as_json: bool = typer.Option(False, "--json"),
    verbose: bool = typer.Option(False, "-v", "--verbose"),
):
    """Greedy generation from a checkpoint."""
    setup_logging(verbose)
    import torch

    from ..io import load_model

    try:
        if max_new_tokens < 1:
            raise LowbitError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
        model, tok = load_model(path)
        if tok is None:
            raise LowbitError(f"{path} has no tokenizer files; re-save it with a tokenizer")
    except LowbitError as e:
        fail(str(e))
    if chat and getattr(tok, "chat_template", None):
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tok(prompt, return_tensors="pt").input_ids
    from .. import kernels

    kernels.prepare()  # a first-time kernel build is not generation time
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    seconds = time.perf_counter() - start
    new = out[0, ids.shape[1]:]
    text = tok.decode(new, skip_special_tokens=True)
    if as_json:
        emit({"prompt": prompt, "text": text, "new_tokens": int(new.numel()), "seconds": seconds,
               "tok_s": new.numel() / seconds}, True, "")
    else:
        common.out_console.print(f"[bold]{escape(prompt)}[/]", highlight=False)
        common.out_console.print(escape(text), highlight=False)
        err_console.print(f"{new.numel()} tokens in {seconds:.1f} s ({new.numel() / seconds:.1f} tok/s)")


@app.command()
def info(
    path: Path = typer.Argument(..., help="lowbit checkpoint folder."),
    layers: bool = typer.Option(False, "--layers", help="Also list every quantized layer."),
    as_json: bool = typer.Option(False, "--json"),
):
    """What a checkpoint holds: recipe, bits per weight, sizes, versions."""
    from ..io import read_manifest

    try:
        m = read_manifest(path)
    except LowbitError as e:
        fail(str(e))
    s = m["summary"]
    payload = {
        "path": str(path), "recipe": m["recipe"], "bits_per_weight": s["bits_per_weight"],
        "code_bits": s["code_bits"], "quantized_layers": s["quantized_layers"],
        "quantized_weights": s["quantized_weights"], "packed_bytes": s["packed_bytes"],
        "packed_file_bytes": s["packed_file_bytes"],
        "packed_file_bits_per_weight": s["packed_file_bytes"] * 8 / s["quantized_weights"]
        if s["quantized_weights"] else None,
        "size_bytes": s["size_bytes"], "versions": m["versions"], "eval": m.get("extra", {}).get("eval"),
    }
    if layers or as_json:
        payload["layers"] = m["layers"]
    if as_json:
        emit(payload, True, "")
        return
    recipe = m["recipe"] or {}
    flat = {k: v for k, v in payload.items() if k not in ("layers", "recipe", "versions", "eval")}
    flat["recipe"] = recipe.get("name")
    emit(flat, False, f"lowbit info: {path}")
    if layers:
        table = Table("layer", "format", "granularity", "group", "shape", "bits/weight")
        for name, e in m["layers"].items():
            table.add_row(name, e["fmt"], e["granularity"], str(e["group_size"]), "x".join(map(str, e["shape"])),
                          f"{e['bits_per_weight']:.4f}")
        common.out_console.print(table)


@app.command()
def recipes(as_json: bool = typer.Option(False, "--json")):
    """List the named presets."""
    from ..presets import PRESETS
    from ..recipe import Recipe

    if as_json:
        emit({name: Recipe.from_name(name).to_dict()["steps"] for name in PRESETS}, True, "")
        return
    table = Table("preset", "steps")
    for name, steps in PRESETS.items():
        table.add_row(name, "; ".join(s.describe() for s in steps))
    common.out_console.print(table)


@app.command()
def report(
    results: Path = typer.Argument(Path("benchmarks/results/quantizers.json"),
                                   help="Benchmark results JSON (rows with recipe, ppl, bits_per_weight)."),
    out: Path = typer.Option(Path("benchmarks/results/bits_vs_ppl.png"), help="PNG to write."),
    x: str = typer.Option("bits_per_weight", help="x axis: bits_per_weight (effective) or code_bits."),
    train_logs: str = typer.Option("", help="Comma-separated train_log.json files of lowbit finetune: overlay their "
                                            "loss curves (e.g. LoRA vs LoRMA) instead."),
    as_json: bool = typer.Option(False, "--json"),
):
    """Draw the bits-vs-perplexity curve of every method in a results file, or overlay fine-tuning loss curves."""
    from ..report import load_rows, method_of, plot_bits_vs_ppl

    if train_logs:
        from ..train import plot_losses

        try:
            curves = {}
            for item in (t.strip() for t in train_logs.split(",") if t.strip()):
                log_path = Path(item)
                try:
                    log_data = json.loads(log_path.read_text())
                except (OSError, json.JSONDecodeError) as e:
                    raise LowbitError(f"cannot read {log_path} as a train_log.json of lowbit finetune ({e})") from e
                if not isinstance(log_data, dict) or not isinstance(log_data.get("losses"), list):
                    raise LowbitError(f"{log_path} has no 'losses' list: not a train_log.json of lowbit finetune")
                label = f"{log_data.get('adapter', '?')} r{log_data.get('rank', '?')} ({log_path.parent.name})"
                curves[label] = log_data["losses"]
            path = plot_losses(curves, out)
        except LowbitError as e:
            fail(str(e))
        emit({"png": str(path), "curves": list(curves)}, as_json, "lowbit report")
        return
    try:
        if x not in ("bits_per_weight", "code_bits"):
            raise LowbitError(f"--x must be bits_per_weight or code_bits, got {x!r}")
        rows = load_rows(results)
        path = plot_bits_vs_ppl(rows, out, x=x)
    except LowbitError as e:
        fail(str(e))
    emit({"png": str(path), "rows": len(rows), "methods": sorted({method_of(r["recipe"]) for r in rows})}, as_json,
          "lowbit report")


@app.command()
def bench(
    model: str = typer.Option("smollm2-135m", help="Model name or path (the FP32 reference)."),
    recipes: str = typer.Option("rtn-w4g128,rtn-w2g64,lowra-b2.0", help="Comma-separated recipes to compare."),
    decode_tokens: int = typer.Option(128, help="New tokens per decode measurement (greedy, batch 1)."),
    prefill_tokens: int = typer.Option(512, help="Prompt tokens of the prefill measurement."),
    calib_windows: int = typer.Option(16, help="Calibration windows for recipes that need calibration."),
    out: Path = typer.Option(Path("lowbit-bench"), help="Folder for bench.md, bench.json and bench.png."),
    as_json: bool = typer.Option(False, "--json"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
):
    """Decode and prefill speed, peak memory and the bandwidth roofline of FP32 and each recipe, in one run."""
    from ..bench import BenchConfig, markdown_table, plot_bench, run_bench
    from ..report import write_text_atomic

    setup_logging(verbose)
    names = [r.strip() for r in recipes.split(",") if r.strip()]
    try:
        if decode_tokens < 1 or prefill_tokens < 1:
            raise LowbitError("--decode-tokens and --prefill-tokens must be positive")
        config = BenchConfig(decode_tokens=decode_tokens, prefill_tokens=prefill_tokens)
        rows = run_bench(model, names, config, calib_windows, log=lambda m: err_console.print(f"[dim]{m}[/]"))
    except LowbitError as e:
        fail(str(e))
    table = markdown_table(rows)
    write_text_atomic(out / "bench.md", table)
    write_text_atomic(out / "bench.json", json.dumps(rows, indent=1))
    plot_bench(rows, out / "bench.png")
    if as_json:
        emit(rows, True, "")
    else:
        common.out_console.print(table)
        err_console.print(f"wrote {out}/bench.md, bench.json, bench.png")
