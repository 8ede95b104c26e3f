"""How quantize time and memory, load time and decode speed grow with model size, and a quantize under a memory
limit smaller than the model.

    python benchmarks/scale_ladder.py ladder [--sizes 0.1b 1b 3b 8b] [--gptq-sizes 0.1b] [--calib-windows 16]
    python benchmarks/scale_ladder.py limit --size 1.6b --limit-mb 1500 [--recipes rtn-w4g128 gptq-w4g128]
    python benchmarks/scale_ladder.py depth --blocks 12 48 [--limit-mb 0]

Models are LLaMA-shaped with random bf16 weights (normal, std 0.02; norms 1) written to disk as HF folders of
safetensors shards, tensor by tensor (the writer never holds a model): 0.1b is SmolLM2-135M's shape, 1b and 3b
Llama-3.2's, 8b Llama-3.1's, 1.6b a TinyLlama-wide model of 34 blocks with SmolLM2's vocabulary (3.4 GB in
bf16). All use SmolLM2's tokenizer (its ids fit every vocabulary). The ladder ends with a projection to
Llama-70B's shape from linear fits of the measured rows (:func:`project`). Every measured command runs in a
fresh process, alone; peak RSS is the child's whole life (``wait4``; this process stays small, since a child's
peak starts from its parent's at the fork). ``limit`` and ``depth`` run the child in a cgroup-v1 memory group
with that limit (swap off; page cache counts but is reclaimed) where the machine allows it, else under a
watchdog that kills it when its RSS crosses the limit; a killed run is reported as such.

Prints one JSON object; ``--out`` also writes it to a file.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from lowbit.models import builtin_tokenizer
from lowbit.random_models import SHAPES, config_for, write_random_model

LLAMA_70B = (8192, 28672, 80, 64, 8, 128256, False)  # the projection's target (Llama-3.1-70B's shape)
CGROUP = Path("/sys/fs/cgroup/memory")


def shape_params(shape: tuple) -> dict:
    """Parameters of a LLaMA shape: in all, per decoder block, in the input embeddings."""
    hidden, inter, layers, heads, kv, vocab, tied = shape
    kv_width = kv * (hidden // heads)
    block = 2 * hidden * hidden + 2 * hidden * kv_width + 3 * hidden * inter + 2 * hidden
    return {"total": layers * block + vocab * hidden * (1 if tied else 2) + hidden, "block": block,
            "embedding": vocab * hidden}


def fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares ``y = a + b·x``: ``(a, b)``."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx if sxx else 0.0
    return my - b * mx, b


def project(rows: dict) -> dict:
    """Each measured quantity fitted linearly against what it should grow with, and read at Llama-70B's shape:
    quantize and load seconds against all parameters, peak RSS of the streamed quantize against the largest
    part held at once (a block in fp32, or the embedding table in bf16 when the head is copied tensor by tensor),
    seconds per decoded token against the checkpoint's bytes."""
    target = shape_params(LLAMA_70B)
    sizes = [s for s in rows if "json" not in rows[s] and rows[s].get("rtn-w4g128", {}).get("exit") == 0]
    out = {"target": "llama-70b shape", "target_params": target["total"], "from_sizes": sizes}

    def part(size_or_shape):
        p = shape_params(SHAPES[size_or_shape] if isinstance(size_or_shape, str) else size_or_shape)
        return max(4 * p["block"], 2 * p["embedding"])

    series = {
        "rtn_quantize_seconds": ([shape_params(SHAPES[s])["total"] for s in sizes],
                                 [rows[s]["rtn-w4g128"]["quantize_seconds"] for s in sizes], target["total"]),
        "rtn_peak_rss_mb": ([part(s) for s in sizes], [rows[s]["rtn-w4g128"]["peak_rss_mb"] for s in sizes],
                            part(LLAMA_70B)),
        "load_seconds": ([shape_params(SHAPES[s])["total"] for s in sizes],
                         [rows[s]["load_decode"]["load_seconds"] for s in sizes], target["total"]),
        "seconds_per_token": ([rows[s]["rtn-w4g128"]["size_mb"] for s in sizes],
                              [1 / rows[s]["load_decode"]["decode_tok_s"] for s in sizes], None),
    }
    for name, (xs, ys, at) in series.items():
        if len(xs) < 2:
            continue
        a, b = fit(xs, ys)
        if at is None:  # decode: against checkpoint MB, extrapolated by the 8b row's MB per parameter
            last = sizes[-1]
            at = rows[last]["rtn-w4g128"]["size_mb"] * target["total"] / shape_params(SHAPES[last])["total"]
        out[name] = {"intercept": round(a, 4), "slope": b, "at_target": round(a + b * at, 2)}
    if "seconds_per_token" in out:
        out["decode_tok_s_at_target"] = round(1 / out["seconds_per_token"]["at_target"], 3)
    return out


def model_folder(size: str, blocks: int | None = None) -> Path:
    """The random model's folder, written once by a child process (a child's peak RSS starts from its parent's
    at the fork, so this process never holds anything big)."""
    folder = WORK / (f"llama-{size}" + (f"-{blocks}blocks" if blocks else ""))
    if not (folder / "config.json").is_file():
        subprocess.run([sys.executable, __file__, "write", "--size", size, "--blocks", str(blocks or 0)], check=True)
    return folder


class Limit:
    """Run a child under a memory limit: a cgroup-v1 memory group where possible, else an RSS watchdog."""

    def __init__(self, limit_mb: int):
        self.limit_mb = limit_mb
        self.group = None
        if limit_mb and CGROUP.is_dir() and os.access(CGROUP, os.W_OK):
            self.group = CGROUP / f"lowbit-bench-{os.getpid()}"
            self.group.mkdir(exist_ok=True)
            (self.group / "memory.limit_in_bytes").write_text(str(limit_mb << 20))
            swap = self.group / "memory.memsw.limit_in_bytes"
            if swap.exists():
                swap.write_text(str(limit_mb << 20))

    @property
    def kind(self) -> str:
        if not self.limit_mb:
            return "none"
        return "cgroup-v1 memory.limit_in_bytes" if self.group else "RSS watchdog"

    def run(self, cmd: list[str]) -> dict:
        """``cmd``'s stdout JSON (if any), exit code, wall seconds, peak RSS (MiB) and, in a cgroup, the group's
        peak usage (page cache included) and whether the kernel's OOM killer fired."""
        if self.group:
            (self.group / "memory.max_usage_in_bytes").write_text("0")
            cmd = ["sh", "-c", f'echo $$ > {self.group}/cgroup.procs && exec "$@"', "sh", *cmd]
        start = time.perf_counter()
        with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
            child = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
            killed, anon = [], [0]
            threading.Thread(target=self._watch, args=(child.pid, killed, anon), daemon=True).start()
            _, status, usage = os.wait4(child.pid, 0)
            seconds = time.perf_counter() - start
            code = os.waitstatus_to_exitcode(status)
            out.seek(0)
            err.seek(0)
            text, tail = out.read(), err.read().strip()[-400:]
        result = {"exit": code, "seconds": round(seconds, 1), "peak_rss_mb": round(usage.ru_maxrss / 1024),
                  "peak_anon_mb": anon[0], "killed": code == -9 or bool(killed)}
        if self.group:
            result["cgroup_peak_mb"] = round(int((self.group / "memory.max_usage_in_bytes").read_text()) / 2**20)
        try:
            result["json"] = json.loads(text)
        except ValueError:
            result["stderr"] = tail
        return result

    def _watch(self, pid: int, killed: list, anon: list) -> None:
        """Sample the child every 20 ms: the peak of its anonymous memory (what it allocated, not the pages of
        files it maps, which RSS also counts) and, without a cgroup, kill it when its RSS crosses the limit."""
        status = Path(f"/proc/{pid}/status")
        while True:
            try:
                fields = dict(line.split(":", 1) for line in status.read_text().splitlines())
                rss = int(fields["VmRSS"].split()[0]) / 1024
                anon[0] = max(anon[0], int(fields["RssAnon"].split()[0]) // 1024)
            except (OSError, KeyError, ValueError):
                return
            if self.limit_mb and not self.group and rss > self.limit_mb:
                killed.append(rss)
                os.kill(pid, 9)
                return
            time.sleep(0.02)

    def close(self) -> None:
        if self.group:
            self.group.rmdir()


def lowbit_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "lowbit", *args]


LOAD_AND_DECODE = """
import json, sys, time, torch
import lowbit
t = time.perf_counter()
model, tok = lowbit.load(sys.argv[1])
load = time.perf_counter() - t
import re
from pathlib import Path
status = dict(re.findall(r"(\\w+):\\s+(\\d+) kB", Path("/proc/self/status").read_text()))
after_load = {k: int(status[k]) // 1024 for k in ("VmRSS", "RssAnon", "RssFile")}
ids = tok("The history of", return_tensors="pt").input_ids
with torch.inference_mode():
    model.generate(ids, max_new_tokens=2, do_sample=False)
    t = time.perf_counter()
    out = model.generate(ids, max_new_tokens=int(sys.argv[2]), min_new_tokens=int(sys.argv[2]), do_sample=False)
    dt = time.perf_counter() - t
print(json.dumps({"load_seconds": load, "after_load_mb": after_load,
                  "decode_tok_s": (out.shape[1] - ids.shape[1]) / dt}))
"""


def quantize_row(limit: Limit, folder: Path, recipe: str, out: Path, calib_windows: int) -> dict:
    r = limit.run(lowbit_cmd("quantize", str(folder), "--recipe", recipe, "--out", str(out), "--windows", "0",
                             "--stream", "--force", "--json", "--calib-windows", str(calib_windows)))
    row = {k: v for k, v in r.items() if k != "json"}
    if "json" in r:
        row.update(quantize_seconds=round(r["json"]["quantize_seconds"], 1),
                   bits_per_weight=round(r["json"]["bits_per_weight"], 3), size_mb=round(r["json"]["size_mb"]))
    return row


def ladder(args) -> dict:
    rows = {}
    none = Limit(0)
    for size in args.sizes:
        t = time.perf_counter()
        folder = model_folder(size)
        params = _params(folder)
        row = {"params": params, "bf16_gb": round(params * 2 / 1e9, 2), "write_seconds": round(time.perf_counter() - t)}
        for recipe in ["rtn-w4g128"] + (["gptq-w4g128"] if size in args.gptq_sizes else []):
            out = WORK / f"llama-{size}-{recipe}"
            row[recipe] = quantize_row(none, folder, recipe, out, args.calib_windows)
        out = WORK / f"llama-{size}-rtn-w4g128"
        r = none.run([sys.executable, "-c", LOAD_AND_DECODE, str(out), str(args.decode_tokens)])
        row["load_decode"] = {**r.get("json", {}), "peak_rss_mb": r["peak_rss_mb"], "exit": r["exit"]}
        rows[size] = row
        print(json.dumps({size: row}), file=sys.stderr, flush=True)
    return {"mode": "ladder", "calib_windows": args.calib_windows, "rows": rows, "projection": project(rows)}


def _params(folder: Path) -> int:
    """Parameters stored in an HF folder, from its safetensors headers (read as JSON: nothing heavy imported)."""
    total = 0
    for shard in folder.glob("*.safetensors"):
        with open(shard, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        for name, entry in header.items():
            if name != "__metadata__":
                n = 1
                for d in entry["shape"]:
                    n *= d
                total += n
    return total


def limited(args) -> dict:
    limit = Limit(args.limit_mb)
    try:
        folder = model_folder(args.size)
        params = _params(folder)
        rows = {recipe: quantize_row(limit, folder, recipe, WORK / f"llama-{args.size}-{recipe}", args.calib_windows)
                for recipe in args.recipes}
    finally:
        limit.close()
    return {"mode": "limit", "size": args.size, "params": params, "bf16_mb": round(params * 2 / 2**20),
            "limit_mb": args.limit_mb, "limit_kind": limit.kind, "calib_windows": args.calib_windows, "rows": rows}


def depth(args) -> dict:
    limit = Limit(args.limit_mb)
    rows = {}
    try:
        for blocks in args.blocks:
            folder = model_folder(args.size, blocks)
            rows[blocks] = quantize_row(limit, folder, "gptq-w4g128", WORK / f"llama-{args.size}-{blocks}-gptq",
                                        args.calib_windows)
    finally:
        limit.close()
    peaks = [r["peak_rss_mb"] for r in rows.values()]
    return {"mode": "depth", "size": args.size, "calib_windows": args.calib_windows, "limit_mb": args.limit_mb,
            "rows": rows, "peak_spread": round(max(peaks) / min(peaks) - 1, 4)}


WORK = Path(os.environ.get("LOWBIT_BENCH_WORK", Path(tempfile.gettempdir()) / "lowbit-ladder"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    p = sub.add_parser("ladder")
    p.add_argument("--sizes", nargs="+", default=["0.1b", "1b", "3b", "8b"], choices=list(SHAPES))
    p.add_argument("--gptq-sizes", nargs="*", default=["0.1b"], choices=list(SHAPES))
    p.add_argument("--decode-tokens", type=int, default=16)
    p = sub.add_parser("limit")
    p.add_argument("--size", default="1.6b", choices=list(SHAPES))
    p.add_argument("--limit-mb", type=int, default=1500)
    p.add_argument("--recipes", nargs="+", default=["rtn-w4g128", "gptq-w4g128"])
    p = sub.add_parser("write", help=argparse.SUPPRESS)
    p.add_argument("--size", choices=list(SHAPES))
    p.add_argument("--blocks", type=int, default=0)
    p = sub.add_parser("depth")
    p.add_argument("--size", default="0.1b", choices=list(SHAPES))
    p.add_argument("--blocks", type=int, nargs="+", default=[12, 48])
    p.add_argument("--limit-mb", type=int, default=0)
    for p in sub.choices.values():
        p.add_argument("--calib-windows", type=int, default=16)
        p.add_argument("--out", type=Path)
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    if args.mode == "write":
        name = f"llama-{args.size}" + (f"-{args.blocks}blocks" if args.blocks else "")
        write_random_model(WORK / name, config_for(args.size, args.blocks or None), builtin_tokenizer)
        return
    result = {"ladder": ladder, "limit": limited, "depth": depth}[args.mode](args)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
