"""``lowbit bench``: decode/prefill speed, resident memory and the memory-bandwidth roofline, FP32 vs packed.

One run measures everything side by side (issue 4): the parent loads the float model, quantizes it with each
recipe and saves each result to a temporary checkpoint; then every model is measured in a fresh child process,
``runs`` times in round robin (``fp32``, each recipe, ``fp32`` again, ...), so each peak RSS is that model's own,
no model's allocations linger in the next one's figures, and drift of the machine spreads over all models. Each
speed is reported as the median of the runs with its min and max; ratios are of medians. In the child: load,
settle (``gc`` + ``malloc_trim``), reset the peak-RSS mark, then

* decode: greedy batch-1 generation of ``decode_tokens`` new tokens (after a warm-up) -> tokens/s;
* batched decode: the same prompt ``b`` times for each ``b`` of ``batches``, ``batch_tokens`` new tokens ->
  tokens/s of all sequences together (best of ``repeats``: a single 32-token batch took 1-2 s, and the first one
  in a process ran 10-20% below the next ones on this VM, FP32's and the packed models' alike);
* prefill: one forward over a ``prefill_tokens``-token prompt (WikiText-2 valid text), last position's logits
  only, as ``generate`` does -> prompt tokens/s (best of ``repeats``);
* ``peak_rss_mb``: the process's peak resident memory during both (model weights included), and
  ``model_peak_mb``: that peak less the process's code and libraries (python, torch, transformers, the
  tokenizer: 400-450 MB, which no model size changes), estimated as RSS after loading and reading every tensor
  once minus the model's tensor bytes. The second is what a smaller model saves; the first is what ``top``
  shows.

The parent also measures this machine's memory bandwidth (a large tensor copy) before each round and after the
last -- on a shared VM it drifts by half within minutes -- and reports each model's roofline bound ``bandwidth /
bytes read per token`` against the highest of those measurements (the strictest bound: the machine showed it could
deliver that) and the share of it decode reached; ``bandwidth_gbs_range`` holds the lowest and highest. With
``contention``, each model's batch-1 decode is measured once more beside one CPU-bound process (a busy Python
loop), as a shared machine runs it: ``contended_pct`` is that speed as a share of the quiet median.

``model`` may be ``random:llama-1b`` (:mod:`lowbit.random_models`): decode speed does not depend on weight values.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from .bench_report import batch_key, markdown_table, plot_bench
from .data import DATA_ENV
from .errors import LowbitError
from .eval.speed import decode_speed
from .kernels import kernel_summary, prepare, reset_counts
from .memory import peak_rss_mb, release_free_memory, reset_peak, rss_mb
from .models import DEFAULT_MODEL, resolve_source
from .protocol import CALIB_WINDOWS

FP32 = "fp32"


@dataclass(frozen=True)
class BenchConfig:
    decode_tokens: int = 128  # new tokens, greedy, batch 1
    prefill_tokens: int = 512  # prompt length of the prefill measurement
    repeats: int = 2  # prefill and batched-decode timings per child (best kept)
    threads: int = 0  # torch intra-op threads in the children (0: torch's default)
    batches: tuple[int, ...] = (4, 16)  # batch sizes of the batched decode (batch 1 is the decode above)
    batch_tokens: int = 32  # new tokens per sequence of the batched decode
    runs: int = 3  # fresh processes per model (median, min and max reported)
    contention: bool = True  # one more decode per model beside a CPU-bound process
    compile: bool = False  # batch-1 decode through the compiled step (lowbit.nn.compile); the rest stays eager
    native: bool = False  # the packed checkpoints' decode (batch 1 and batches) through lowbit.native where it
    # applies (FP32: transformers)


def spread_keys(config: BenchConfig) -> list[str]:
    """The speeds measured in every run, reported as median [min, max]."""
    return ["decode_tok_s", "prefill_tok_s", *map(batch_key, config.batches)]


def memory_bandwidth_gbs(mbytes: int = 512, repeats: int = 5) -> float:
    """This machine's memory bandwidth in GB/s (1e9 bytes): best of ``repeats`` copies of a ``mbytes`` MiB fp32
    tensor, counting the bytes read plus the bytes written."""
    n = mbytes * 2**20 // 4
    src, dst = torch.ones(n), torch.empty(n)
    dst.copy_(src)  # touch the pages first
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * n * 4 / best / 1e9


def tensor_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers (tied or shared tensors once)."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        key = (t.data_ptr(), t.numel())
        if key not in seen and t.device.type != "meta":
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def touch_tensors(model: nn.Module) -> None:
    """Read every tensor once. Checkpoints load memory-mapped, so a table the first forward has not read yet
    (the LM head) is not resident; after this, RSS minus the tensor bytes is the process's code and libraries."""
    for t in [*model.parameters(), *model.buffers()]:
        if t.numel() and t.device.type == "cpu":
            t.detach().reshape(-1).view(torch.uint8).max()


def weight_bytes_per_token(model: nn.Module, half_head: bool = False) -> int:
    """Bytes of weights one decode step reads: every parameter and buffer once (:func:`tensor_bytes`), except
    the input embedding table, of which one row is read (when it is tied to the output head, the head reads
    all of it and it counts in full). Float or packed tables alike. ``half_head``: the float head is read as
    fp16 (the native step's copy), half its fp32 bytes."""
    embed = model.get_input_embeddings()
    head = model.get_output_embeddings()
    table = {t.data_ptr() for t in [*embed.parameters(), *embed.buffers()]}
    shared = head is not None and any(t.data_ptr() in table for t in [*head.parameters(), *head.buffers()])
    total = tensor_bytes(model)
    if not shared:
        rows = getattr(embed, "num_embeddings", 1)
        total -= tensor_bytes(embed) * (rows - 1) // rows
    if half_head:
        total -= tensor_bytes(head) // 2
    return total


def prompt_ids(tokenizer, n: int) -> torch.Tensor:
    """``(1, n)`` token ids of WikiText-2 valid text (never the test split)."""
    from .data import wikitext2_text

    ids = tokenizer(wikitext2_text("valid")[: 20 * n], return_tensors="pt").input_ids[:, :n]
    if ids.shape[1] < n:
        raise LowbitError(f"the prefill prompt needs {n} tokens; WikiText-2 valid gave {ids.shape[1]}")
    return ids


@torch.inference_mode()
def prefill_speed(model: nn.Module, ids: torch.Tensor, repeats: int = 2) -> float:
    """Prompt tokens per second of one forward over ``ids (1, n)`` (last logits only); best of ``repeats``."""
    model(ids[:, :16], logits_to_keep=1)  # warm-up
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        model(ids, logits_to_keep=1)
        best = min(best, time.perf_counter() - start)
    return ids.shape[1] / best


def measure_model(source: str, config: BenchConfig, decode_only: bool = False) -> dict:
    """Load ``source`` (a model name/path for FP32 or a lowbit checkpoint) and measure it; runs in a child.
    ``decode_only``: just the batch-1 decode (the contended run)."""
    from .io import MANIFEST, load, load_model
    from .native import native_decoder

    if config.threads:
        torch.set_num_threads(config.threads)
    packed = (Path(source) / MANIFEST).is_file()
    model, tok = load(source) if packed else load_model(source)
    model.eval()
    prepare()
    touch_tensors(model)
    release_free_memory()
    reset_peak()
    rss_model = rss_mb()
    if not decode_only:
        runs = {b: [decode_speed(model, tok, new_tokens=config.batch_tokens, batch=b,
                                 native=config.native and packed) for _ in range(config.repeats)]
                for b in config.batches}
        batched = {batch_key(b): max(s.tok_s for s in speeds) for b, speeds in runs.items()}
        batch_engines = sorted({s.engine for speeds in runs.values() for s in speeds})
        ids = prompt_ids(tok, config.prefill_tokens)
        reset_counts()
        prefill = prefill_speed(model, ids, config.repeats)
        prefill_kernel = kernel_summary()
    if config.compile:  # compiled once by a warm-up of the same length, which the timing leaves out
        from .nn.compile import compile_decode

        compile_decode(model)
    warmup = config.decode_tokens if config.compile else 8
    speed = decode_speed(model, tok, new_tokens=config.decode_tokens, warmup_tokens=warmup,
                         native=config.native and packed)
    if decode_only:
        return {"decode_tok_s": speed.tok_s}
    peak = peak_rss_mb()
    half_head = speed.engine == "native" and native_decoder(model).head_dtype in (torch.float16, torch.bfloat16)
    libraries_mb = rss_model - tensor_bytes(model) / 2**20
    return {"decode_tok_s": speed.tok_s, "prefill_tok_s": prefill, **batched, "peak_rss_mb": peak,
            "model_peak_mb": peak - libraries_mb, "libraries_mb": libraries_mb, "kernel": speed.kernel,
            "prefill_kernel": prefill_kernel, "compiled": config.compile, "decode_engine": speed.engine,
            "batch_engine": "+".join(batch_engines),
            "bytes_per_token": weight_bytes_per_token(model, half_head), "threads": torch.get_num_threads()}


def _child(source: str, config: BenchConfig, decode_only: bool = False) -> dict:
    """Measure ``source`` in a fresh process that runs in an empty folder, so a ``lowbit/`` (or any module) in the
    caller's current folder is never imported in its place; the source is an absolute path or a built-in name."""
    from .data import data_dir

    env = dict(os.environ)
    folder = data_dir()
    if folder is not None:  # found from the caller's folder (or --data): hand it over explicitly
        env.setdefault(DATA_ENV, str(folder))
    cmd = [sys.executable, "-c", CHILD, source, json.dumps(asdict(config))] + (["decode"] * decode_only)
    with tempfile.TemporaryDirectory(prefix="lowbit-bench-child-") as empty:
        done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=empty, env=env)
    if done.returncode != 0:
        raise LowbitError(f"measuring {source} failed (exit {done.returncode}); its error is printed above")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_bench(model: str, recipes: list[str], config: BenchConfig, calib_windows: int = CALIB_WINDOWS,
              log=lambda msg: None) -> dict[str, dict]:
    """Rows keyed by ``fp32`` and each recipe: decode/prefill tokens/s and their ratios to FP32, peak RSS,
    bytes per token, roofline bound and the share of it reached, which kernel ran, effective bits/weight."""
    import copy

    from .calibration import Calibration
    from .io import load_model, save
    from .recipe import Recipe
    from .recipe import apply_recipe as quantize
    from .summary import bits_summary

    for name in recipes:
        Recipe.parse(name)  # fail on a bad name before any work
    bandwidths: list[float] = []

    def measure_bandwidth() -> None:
        bandwidths.append(memory_bandwidth_gbs())
        log(f"memory bandwidth {bandwidths[-1]:.1f} GB/s")

    rows: dict[str, dict] = {FP32: {"bits_per_weight": 32.0}}
    with tempfile.TemporaryDirectory(prefix="lowbit-bench-") as tmp:
        kind, path = resolve_source(model)
        sources = {FP32: model if kind == "builtin" else str(path.resolve())}
        if recipes:
            fp_model, tok = load_model(model)
            for name in recipes:
                log(f"quantizing {name}")
                q = quantize(copy.deepcopy(fp_model), name, calib=Calibration(tokenizer=tok, n=calib_windows))
                rows[name] = {"bits_per_weight": bits_summary(q)["bits_per_weight"]}
                sources[name] = str(save(q, Path(tmp) / name.replace("/", "_"), tokenizer=tok))
                del q
            del fp_model
            release_free_memory()
        runs: dict[str, list[dict]] = {name: [] for name in sources}
        for r in range(config.runs):
            measure_bandwidth()
            for name, source in sources.items():
                log(f"measuring {name} (run {r + 1} of {config.runs})")
                runs[name].append(_child(source, config))
        measure_bandwidth()
        for name in sources:
            rows[name].update(summarize(runs[name], spread_keys(config)))
        if config.contention:
            for name, source in sources.items():
                log(f"measuring {name} beside a CPU-bound process")
                with busy_process():
                    contended = _child(source, config, decode_only=True)["decode_tok_s"]
                rows[name]["contended_decode_tok_s"] = contended
                rows[name]["contended_pct"] = 100 * contended / rows[name]["decode_tok_s"]
    base, bandwidth = rows[FP32], max(bandwidths)
    for row in rows.values():
        row["decode_ratio"] = row["decode_tok_s"] / base["decode_tok_s"]
        row["prefill_ratio"] = row["prefill_tok_s"] / base["prefill_tok_s"]
        for b in config.batches:
            row[f"decode_b{b}_ratio"] = row[batch_key(b)] / base[batch_key(b)]
        row["peak_rss_ratio"] = row["peak_rss_mb"] / base["peak_rss_mb"]
        row["model_peak_ratio"] = row["model_peak_mb"] / base["model_peak_mb"]
        row["bandwidth_gbs"] = bandwidth
        row["bandwidth_gbs_range"] = [min(bandwidths), bandwidth]
        row["roofline_tok_s"] = bandwidth * 1e9 / row["bytes_per_token"]
        row["roofline_pct"] = 100 * row["decode_tok_s"] / row["roofline_tok_s"]
    return rows


def summarize(runs: list[dict], keys: list[str]) -> dict:
    """One row from a model's runs: each of ``keys`` as the median with ``KEY_range = [min, max]``, every other
    number as its median, text from the last run."""
    row = dict(runs[-1])
    for key, value in runs[-1].items():
        if isinstance(value, (int, float)):
            values = [r[key] for r in runs]
            row[key] = statistics.median(values)
            if key in keys:
                row[f"{key}_range"] = [min(values), max(values)]
    row["runs"] = len(runs)
    return row


@contextlib.contextmanager
def busy_process():
    """One CPU-bound process (a Python busy loop) running for the duration of the block."""
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)  # let it start spinning
        yield proc
    finally:
        proc.kill()
        proc.wait()


@dataclass(frozen=True)
class BenchJob:
    """``lowbit bench``: FP32 ``model`` and each of ``recipes`` measured side by side; ``bench.md``, ``bench.json``
    and ``bench.png`` written to ``out``."""

    model: str = DEFAULT_MODEL
    recipes: tuple[str, ...] = ("rtn-w4g128", "rtn-w2g64", "lowra-b2.0")
    measure: BenchConfig = BenchConfig()
    calib_windows: int = CALIB_WINDOWS
    out: Path = Path("lowbit-bench")


@dataclass
class BenchResult:
    rows: dict[str, dict]
    table: str  # the markdown table of bench.md

    def to_dict(self) -> dict:
        return self.rows


def bench(job: BenchJob, log=lambda msg: None) -> BenchResult:
    """Run :func:`run_bench` and write its three files."""
    from .fileio import atomic_write, check_output, json_text
    from .models import check_source

    c = job.measure
    if min(c.decode_tokens, c.prefill_tokens, c.batch_tokens, c.runs, *c.batches) < 1:
        raise LowbitError("--decode-tokens, --prefill-tokens, --batch-tokens, --runs and --batches must be positive")
    check_source(job.model)
    check_output(job.out, kind="into")
    rows = run_bench(job.model, list(job.recipes), c, job.calib_windows, log=log)
    table = markdown_table(rows)
    atomic_write(Path(job.out) / "bench.md", table)
    atomic_write(Path(job.out) / "bench.json", json_text(rows, indent=1))
    plot_bench(rows, Path(job.out) / "bench.png")
    return BenchResult(rows, table)


CHILD = "import sys; from lowbit.bench import child_main; child_main(sys.argv[1:])"


def child_main(argv: list[str]) -> None:
    """The child: ``SOURCE CONFIG_JSON [decode]`` -> one JSON line on stdout."""
    import transformers

    transformers.logging.set_verbosity_error()
    config = json.loads(argv[1])
    config["batches"] = tuple(config["batches"])
    result = measure_model(argv[0], BenchConfig(**config), decode_only=argv[2:] == ["decode"])
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    child_main(sys.argv[1:])
