"""QAT against PTQ + LoRA at the same step budget (issue 23), over one packed 2-bit base of SmolLM2-135M.

    python benchmarks/qat_vs_lora.py [--base gptq-w2g64] [--steps 100] [--qat-lr 5e-3] [--lora-lr 5e-4]
                                     [--threads 2] [--windows 16] [--out benchmarks/results/qat]

The base is quantized once (``lowbit quantize --recipe BASE --no-eval``, calibration WikiText-2 valid), then two
runs of the one model-level trainer (:class:`lowbit.compensate.rilq.RILQConfig`), each in a fresh process
(``benchmarks/rilq.py run --base OUT/base``), with the same data, loss and schedule: next-token cross-entropy
on 256-token windows of WikiText-2 valid (``samples`` 320, 32 of them held out), batches of 4, ``--steps`` Adam
steps with a cosine decay, the held-out loss every ``steps / 5`` steps, the best state kept.

- ``ptq+lora``: LoRA r16 (alpha 16, Gaussian A, B = 0) on every decoder Linear over the frozen packed base,
  stored in bf16 (its bits count them).
- ``qat``: no adapters; the packed codes themselves train through the straight-through estimator
  (``codes=True``: offsets in grid steps, rounded in the forward) with every group scale (``scales="group"``),
  packed again at the end: the same bits as the base.

A run whose result is already in OUT is read back, not rerun (``--force`` reruns). Writes OUT/qat-vs-lora.png
(held-out cross-entropy against step, both runs) and prints one JSON object (each run's perplexity on WikiText-2
test, first ``--windows`` windows of 2048, bits/weight with adapters, seconds, peak RSS).
Both are trained on WikiText-2 valid, so their perplexities include domain adaptation.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
COMMON = {"lambda_model": 0.0, "lambda_gt": 1.0, "samples": 320, "val_ratio": 0.1, "seq_len": 256,
          "micro_batch": 4, "patience": 1000}


def train(base: Path, name: str, rank: int, settings: dict, args) -> dict:
    """One run in a fresh process; a run whose result is already in OUT is read back (``--force`` reruns it)."""
    result = args.out / f"{name}.json"
    if result.is_file() and not args.force:
        return json.loads(result.read_text())
    cmd = [sys.executable, str(HERE / "rilq.py"), "run", "--base", str(base), "--method", "rilq", "--rank",
           str(rank), "--threads", str(args.threads), "--windows", str(args.windows), "--name", name, "--out",
           str(args.out)]
    for key, value in settings.items():
        cmd += ["--set", f"{key}={value}"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads(result.read_text())


def plot(runs: dict[str, dict], path: Path, base: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in runs.items():
        history = r["rilq"]
        ax.plot(history["step"], history["val_ce"], marker="o",
                label=f"{name}: ppl {r['ppl']:.2f}, {r['bits_per_weight_with_adapters']:.2f} bits/weight")
    ax.set_xlabel("optimizer step (batch 4 × 256 tokens)")
    ax.set_ylabel("held-out cross-entropy (WikiText-2 valid)")
    ax.set_title(f"QAT vs PTQ + LoRA over {base}, equal steps (SmolLM2-135M)", fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", default="gptq-w2g64")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--qat-lr", type=float, default=5e-3)
    p.add_argument("--lora-lr", type=float, default=5e-4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--out", type=Path, default=HERE / "results" / "qat")
    p.add_argument("--force", action="store_true", help="rerun the runs whose results are already in OUT")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    base = args.out / "base"
    if not (base / "lowbit.json").is_file():
        subprocess.run([sys.executable, "-m", "lowbit", "quantize", "smollm2-135m", "--recipe", args.base,
                        "--no-eval", "--out", str(base), "--force"], check=True, stdout=subprocess.DEVNULL)
    schedule = {**COMMON, "max_steps": args.steps, "eval_every": max(1, args.steps // 5)}
    runs = {"ptq+lora": train(base, "ptq-lora", 16, {**schedule, "lr": args.lora_lr}, args),
            "qat": train(base, "qat", 0, {**schedule, "codes": "true", "scales": "group", "lr": args.qat_lr}, args)}
    plot(runs, args.out / "qat-vs-lora.png", args.base)
    print(json.dumps({"base": args.base, "steps": args.steps, "png": str(args.out / "qat-vs-lora.png"),
                      **{name: {k: r[k] for k in ("ppl", "windows", "bits_per_weight_with_adapters", "seconds",
                                                  "peak_rss_mb")} | {"best_val_ce": min(r["rilq"]["val_ce"])}
                         for name, r in runs.items()}}, indent=1))


if __name__ == "__main__":
    main()
