"""Closer to the accuracy limit (issue 23): each recipe quantized, its perplexity and zero-shot accuracy, side by side.

    python benchmarks/accuracy_limit.py --recipes fp32,gptq-w4g128,best-w4 [--tasks piqa,arc_easy,boolq]
                                        [--limit N] [--windows 16] [--threads 2] [--work DIR] [--out FILE]

For every recipe, in a fresh process each: ``lowbit quantize smollm2-135m --recipe R --windows W --json --out
WORK/R`` (calibration: WikiText-2 valid, 16 × 2048; perplexity: WikiText-2 test, first W windows of 2048;
quantize seconds and peak RSS from its JSON), then ``lowbit eval WORK/R --tasks T --json`` (full sets unless
``--limit``; lm-eval's prompts and scoring, acc and acc_norm with their standard errors). ``fp32`` evaluates the
float model itself. A recipe whose checkpoint already exists in WORK is evaluated, not quantized again. Results:
one JSON object, also written to ``--out``; each recipe's row is appended to WORK/rows.jsonl as it finishes.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

from child import emit, parser, run_json, work_dir

LOWBIT = [sys.executable, "-m", "lowbit"]


def standard_error(acc: float, n: int) -> float:
    """Binomial standard error of an accuracy over ``n`` examples."""
    return math.sqrt(acc * (1 - acc) / n) if n else float("nan")


def evaluate_tasks(model: str, tasks: str, limit: int | None) -> dict:
    cmd = [*LOWBIT, "eval", model, "--tasks", tasks, "--json"] + (["--limit", str(limit)] if limit else [])
    result = run_json(cmd)  # {task: {"acc", "acc_norm", "n"}, ..., "seconds"}
    seconds = result.pop("seconds")
    out = {name: {**{k: r[k] for k in ("acc", "acc_norm", "n")},
                  "se": round(standard_error(r["acc_norm"], r["n"]), 4)} for name, r in result.items()}
    return {**out, "seconds": seconds}


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--recipes", default="fp32,gptq-w4g128,best-w4")
    p.add_argument("--tasks", default="piqa,arc_easy,boolq")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    work = work_dir(args.work, "lowbit-accuracy-")
    rows = []
    for recipe in args.recipes.split(","):
        row: dict = {"recipe": recipe}
        if recipe == "fp32":
            model = "smollm2-135m"
            row.update({k: v for k, v in run_json([*LOWBIT, "eval", model, "--windows", str(args.windows),
                                                   "--json"]).items() if k in ("ppl", "windows", "seconds")})
        else:
            model = str(work / recipe)
            if not (Path(model) / "lowbit.json").is_file():
                q = run_json([*LOWBIT, "quantize", "smollm2-135m", "--recipe", recipe, "--windows",
                              str(args.windows), "--json", "--out", model])
                row.update({k: q.get(k) for k in ("ppl", "fp_ppl", "windows", "bits_per_weight",
                                                   "bits_per_weight_with_adapters", "quantize_seconds",
                                                   "quantize_peak_rss_mb", "size_bytes")})
            else:
                e = run_json([*LOWBIT, "eval", model, "--windows", str(args.windows), "--json"])
                row.update({"ppl": e.get("ppl"), "windows": e.get("windows")})
        if args.tasks:
            row["tasks"] = evaluate_tasks(model, args.tasks, args.limit)
        rows.append(row)
        with open(work / "rows.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), file=sys.stderr, flush=True)
    emit({"model": "smollm2-135m", "windows": args.windows, "threads": args.threads, "limit": args.limit,
          "rows": rows}, args.out)


if __name__ == "__main__":
    main()
