"""Commands on models and checkpoints: quantize, eval, generate, info, recipes, report, bench. Each parses its
flags into an API config, calls one :mod:`lowbit.api` function and prints its result."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from ..device import DEVICE_HELP
from ..errors import LowbitError
from ..models import DEFAULT_MODEL
from ..presets import DEFAULT_PRESET
from ..protocol import CALIB_SEQ_LEN, CALIB_WINDOWS, EVAL_SEQ_LEN, EVAL_WINDOWS
from .common import (
    DATA_OPTION,
    FORCE_OPTION,
    JSON_OPTION,
    MODEL_HELP,
    OUT_OPTION,
    VERBOSE_OPTION,
    WINDOWS_HELP,
    app,
    emit,
    err_console,
    model_source,
    parse_windows,
    print_out,
    run_job,
)


@app.command()
def quantize(
    model: str | None = typer.Argument(None, help=f"{MODEL_HELP} Default: {DEFAULT_MODEL}.", show_default=False),
    recipe: str = typer.Option(DEFAULT_PRESET, help="Preset name (join with +) or path to a recipe YAML file."),
    out: Path = OUT_OPTION,
    windows: str = typer.Option(str(EVAL_WINDOWS), help=WINDOWS_HELP),
    no_eval: bool = typer.Option(False, "--no-eval", help="Skip both perplexity evaluations (same as --windows 0)."),
    force: bool = FORCE_OPTION,
    number_format: str | None = typer.Option(None, "--number-format", help="Override: int | nf | fp4 | fp8."),
    bits: int | None = typer.Option(None, help="Override: code bits, 1-8."),
    group_size: int | None = typer.Option(None, help="Override: input columns per scale (multiple of 8)."),
    granularity: str | None = typer.Option(None, help="Override: tensor | channel | group."),
    symmetric: bool | None = typer.Option(None, "--symmetric/--asymmetric", help="Override: int grid type."),
    budget: float | None = typer.Option(None, help="Override (lowra): average code bits, e.g. 1.5."),
    calib_windows: int = typer.Option(CALIB_WINDOWS, help="Calibration windows (steps that need data, e.g. gptq)."),
    calib_seq_len: int = typer.Option(CALIB_SEQ_LEN, help="Calibration window length in tokens."),
    calib_precision: str = typer.Option("auto", help="GPTQ's calibration forward passes: auto (bf16 where the "
                                        "CPU/GPU multiplies bf16 natively), bf16 or fp32 (Hessians are fp32)."),
    calib_file: Path | None = typer.Option(None, help="Calibration text or .jsonl file (default: WikiText-2 valid)."),
    calib_self: bool = typer.Option(False, "--calib-self", help="Data-free calibration: text the float model "
                                    "samples itself (64 sequences of 512 tokens per 16 x 2048 windows; RILQ and "
                                    "QUAD sample theirs too)."),
    stream: bool | None = typer.Option(None, "--stream/--no-stream", help="Read the model from its safetensors "
                                       "shards one decoder block at a time (default: when the fp32 model needs "
                                       "over half the memory available)."),
    target: str | None = typer.Option(None, help="Round straight into an export's grid (its format and group "
                                      "size replace the recipe's): gguf:q4_0, gguf:q4_1, gguf:q8_0, "
                                      "gguf:iq4_nl, gguf:q6_k, compressed-tensors:w4a16, "
                                      "compressed-tensors:w4a16-asym, compressed-tensors:w8a16."),
    device: str = typer.Option("auto", help="Where block-wise calibration (GPTQ, LowRA-GPTQ, block-wise training) "
                                            "computes, one block at a time; the model stays in CPU memory: "
                                            + DEVICE_HELP),
    model_option: str | None = typer.Option(None, "--model", hidden=True, help="Old spelling of MODEL."),
    data: Path | None = DATA_OPTION,
    as_json: bool = JSON_OPTION,
    verbose: bool = VERBOSE_OPTION,
):
    """Quantize a model with a recipe, evaluate FP and quantized perplexity, and save a checkpoint."""
    from ..api import CalibrationConfig, QuantizeConfig, quantize


    def job():
        config = QuantizeConfig(
            out=out, model=model_source(model, model_option, DEFAULT_MODEL), recipe=recipe, force=force,
            windows=0 if no_eval else parse_windows(windows),
            overrides=dict(format=number_format, bits=bits, group_size=group_size, granularity=granularity,
                           symmetric=symmetric, budget=budget),
            calibration=CalibrationConfig(windows=calib_windows, seq_len=calib_seq_len, file=calib_file,
                                          self_generated=calib_self, precision=calib_precision), stream=stream,
            target=target,
            device=device)
        return quantize(config)

    result = run_job(verbose, job, data)
    emit(result.to_dict(), as_json, f"lowbit quantize: {result.recipe}")


KV_CACHE_HELP = ("Keys and values cached as float (the model's own cache), int8 or int4 (per token and head, "
                 "Hadamard-rotated keys), int8-norot or int4-norot (keys not rotated).")


@app.command("eval")
def evaluate(
    model: str = typer.Argument(..., help=MODEL_HELP),
    windows: str = typer.Option(str(EVAL_WINDOWS), help="WikiText-2 test windows to evaluate: N (the first N) or all."),
    seq_len: int = typer.Option(EVAL_SEQ_LEN, help="Window length in tokens."),
    tasks: str = typer.Option("", help="Comma-separated zero-shot tasks (piqa, arc_easy, boolq): report their "
                                       "acc and acc_norm instead of perplexity."),
    limit: int | None = typer.Option(None, help="With --tasks: only the first N examples of each."),
    batch_tokens: int = typer.Option(0, help="With --tasks: batch examples up to this many padded tokens per "
                                             "forward (e.g. 4096; faster; 0 = one example per forward, the "
                                             "recorded protocol: batching moves some log-likelihoods slightly)."),
    kv_cache: str = typer.Option("float", "--kv-cache", help=KV_CACHE_HELP),
    data: Path | None = DATA_OPTION,
    as_json: bool = JSON_OPTION,
    verbose: bool = VERBOSE_OPTION,
):
    """WikiText-2 test perplexity of a checkpoint or model, or zero-shot task accuracy with --tasks."""
    from ..api import EvalConfig, evaluate


    def job():
        names = tuple(tasks.split(",")) if tasks else ()  # blanks reach the API, which names the problem
        return evaluate(EvalConfig(model=model, windows=parse_windows(windows), seq_len=seq_len,
                                             tasks=names, limit=limit, kv_cache=kv_cache,
                                             batch_tokens=batch_tokens))

    result = run_job(verbose, job, data)
    if result.tasks is None or as_json:
        emit(result.to_dict(), as_json, f"lowbit eval: {model}")
        return
    table = Table("task", "acc", "acc_norm", "n", title=escape(f"lowbit eval: {model}"))
    for name, r in result.tasks.items():
        table.add_row(name, f"{r['acc']:.4f}", f"{r['acc_norm']:.4f}", str(r["n"]))
    print_out(table)
    err_console.print(f"{result.seconds:.1f} s")


@app.command()
def generate(
    model: str = typer.Argument(..., help=MODEL_HELP),
    prompt: list[str] = typer.Option(..., help="Text to continue (or the user turn with --chat); repeat it "
                                     "(--prompt A --prompt B) to generate several as one batch."),
    max_new_tokens: int = typer.Option(64, help="Tokens to generate (for each prompt)."),
    chat: bool = typer.Option(True, "--chat/--raw", help="Wrap the prompt in the model's chat template."),
    kv_cache: str = typer.Option("float", "--kv-cache", help=KV_CACHE_HELP),
    engine: str = typer.Option("auto", help="native (lowbit's C++ decode step, LLaMA-style models; a batch of up "
                               "to 16 where every packed layer has the int8 batch kernel), transformers, or auto: "
                               "native where it applies."),
    as_json: bool = JSON_OPTION,
    verbose: bool = VERBOSE_OPTION,
):
    """Greedy generation from a checkpoint or model."""
    from ..api import GenerateConfig, generate

    result = run_job(verbose, lambda: generate(GenerateConfig(
        model=model, prompt=prompt[0] if len(prompt) == 1 else list(prompt), max_new_tokens=max_new_tokens, chat=chat,
        kv_cache=kv_cache, engine=engine)))
    if as_json:
        emit(result.to_dict(), True, "")
        return
    one = isinstance(result.prompt, str)
    for shown, text in zip([result.prompt] if one else result.prompt, [result.text] if one else result.text,
                           strict=True):
        print_out(f"[bold]{escape(shown)}[/]", highlight=False)
        print_out(escape(text), highlight=False)
    err_console.print(f"{result.new_tokens} tokens in {result.seconds:.1f} s ({result.tok_s:.1f} tok/s, "
                      f"{result.engine}" + (f", batch of {result.batch})" if result.batch > 1 else ")"))


@app.command()
def info(
    model: Path = typer.Argument(..., help="lowbit checkpoint folder."),
    layers: bool = typer.Option(False, "--layers", help="Also list every quantized layer."),
    as_json: bool = JSON_OPTION,
):
    """What a checkpoint holds: recipe, bits per weight, sizes, versions."""
    from ..api import info

    payload = run_job(False, lambda: info(model, layers=layers or as_json))
    if as_json:
        emit(payload, True, "")
        return
    flat = {k: v for k, v in payload.items() if k not in ("layers", "recipe", "versions", "eval", "expert_tokens")}
    flat["recipe"] = (payload["recipe"] or {}).get("name")
    emit(flat, False, f"lowbit info: {model}")
    if layers:
        tokens = payload.get("expert_tokens") or {}
        table = Table("layer", "format", "granularity", "group", "shape", "bits/weight",
                      *(["calibration tokens"] if tokens else []))
        for name, e in payload["layers"].items():
            table.add_row(name, e["fmt"], str(e.get("granularity", "")), str(e.get("group_size", "")),
                          "x".join(map(str, e["shape"])), f"{e['bits_per_weight']:.4f}",
                          *([str(tokens.get(name, ""))] if tokens else []))
        print_out(table)


@app.command()
def recipes(as_json: bool = JSON_OPTION):
    """List the named presets."""
    from ..api import recipes
    from ..config import StepConfig
    from ..presets import BEST

    presets = recipes()
    if as_json:
        emit(presets, True, "")
        return
    table = Table("preset", "steps", "holds and costs")
    for name, steps in presets.items():
        about = BEST[name][1] if name in BEST else ""
        table.add_row(name, "; ".join(StepConfig.from_dict(s).describe() for s in steps), about)
    print_out(table)


@app.command()
def report(
    results: Path = typer.Argument(Path("benchmarks/results/quantizers.json"),
                                   help="Benchmark results JSON (rows with recipe, ppl, bits_per_weight)."),
    out: Path = typer.Option(Path("benchmarks/results/bits_vs_ppl.png"), help="PNG to write."),
    x: str = typer.Option("bits_per_weight", help="x axis: bits_per_weight (effective) or code_bits."),
    train_logs: str = typer.Option("", help="Comma-separated train_log.json files of lowbit finetune: overlay their "
                                            "loss curves (e.g. LoRA vs LoRMA) instead."),
    as_json: bool = JSON_OPTION,
):
    """Draw the bits-vs-perplexity curve of every method in a results file, or overlay fine-tuning loss curves."""
    from ..api import report

    logs = tuple(Path(t.strip()) for t in train_logs.split(",") if t.strip())
    payload = run_job(False, lambda: report(results, out, x=x, train_logs=logs))
    emit(payload, as_json, "lowbit report")


def parse_batches(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(b) for b in text.split(",") if b.strip())
    except ValueError:
        raise LowbitError(f"--batches takes comma-separated whole numbers such as 4,16, got {text!r}") from None


@app.command()
def bench(
    model: str | None = typer.Argument(None, help=f"Model source (the FP32 reference). Default: {DEFAULT_MODEL}.",
                                       show_default=False),
    recipes: str = typer.Option("rtn-w4g128,rtn-w2g64,lowra-b2.0", help="Comma-separated recipes to compare."),
    decode_tokens: int = typer.Option(128, help="New tokens per decode measurement (greedy, batch 1)."),
    prefill_tokens: int = typer.Option(512, help="Prompt tokens of the prefill measurement."),
    batches: str = typer.Option("4,16", help="Batch sizes of the batched decode (comma-separated; '' for none)."),
    batch_tokens: int = typer.Option(32, help="New tokens per sequence of the batched decode."),
    runs: int = typer.Option(3, help="Fresh processes per model; medians and min-max are reported."),
    contention: bool = typer.Option(True, help="Also decode beside one CPU-bound process (share of quiet speed)."),
    compile_decode: bool = typer.Option(False, "--compile", help="Batch-1 decode through torch.compile with the "
                                        "static KV cache (every model, FP32 too; compile time not counted)."),
    native: bool = typer.Option(False, "--native", help="Decode the packed checkpoints (batch 1 and batches) through "
                                "lowbit's native step where it applies (one C++ call per token, LLaMA-style models); "
                                "FP32 stays transformers'."),
    calib_windows: int = typer.Option(CALIB_WINDOWS, help="Calibration windows for recipes that need calibration."),
    out: Path = typer.Option(Path("lowbit-bench"), help="Folder for bench.md, bench.json and bench.png."),
    model_option: str | None = typer.Option(None, "--model", hidden=True, help="Old spelling of MODEL."),
    as_json: bool = JSON_OPTION,
    verbose: bool = VERBOSE_OPTION,
):
    """Decode and prefill speed, peak memory and the bandwidth roofline of FP32 and each recipe, in one run."""
    from ..api import BenchConfig, BenchJob, bench


    def job():
        bench_job = BenchJob(model=model_source(model, model_option, DEFAULT_MODEL),
                                 recipes=tuple(r.strip() for r in recipes.split(",") if r.strip()),
                                 measure=BenchConfig(decode_tokens=decode_tokens, prefill_tokens=prefill_tokens,
                                                     batches=parse_batches(batches), batch_tokens=batch_tokens,
                                                     runs=runs, contention=contention, compile=compile_decode,
                                                     native=native),
                                 calib_windows=calib_windows, out=out)
        return bench(bench_job, log=lambda m: err_console.print(f"[dim]{escape(m)}[/]"))

    result = run_job(verbose, job)
    if as_json:
        emit(result.to_dict(), True, "")
    else:
        print_out(result.table)
        err_console.print(f"wrote {out}/bench.md, bench.json, bench.png")
