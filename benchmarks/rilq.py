"""Error-compensation benchmark (issue 6): RILQ and LoftQ on SmolLM2-135M at 2 bits.

    python benchmarks/rilq.py run [--base rtn-w2g64] [--method rilq|loftq] [--rank 16] [--set KEY=VALUE ...]
                                  [--threads 2] [--windows 16] [--name NAME] [--out DIR]
    python benchmarks/rilq.py ranks [--ranks 4,8,16,32,64] [--methods rilq,loftq] [--threads 1] [--jobs 2] [--out DIR]
    python benchmarks/rilq.py plot [--out DIR]

``run``: one fresh process: load the float model, quantize it with ``--base`` (a preset name) followed by the
compensation step (RILQ: :class:`lowbit.compensate.rilq.RILQConfig` with ``--rank`` and any ``--set`` overrides,
e.g. ``--set lr=1e-3 --set max_steps=120``; LoftQ: the same quantizer inside :class:`LoftQConfig`), then
WikiText-2 test perplexity over ``--windows`` windows of 2048 (``--save DIR`` also saves the trained model). The
result (ppl, seconds for the step, peak RSS, RILQ's loss curve) goes to OUT/NAME.json (OUT =
benchmarks/results/rilq). ``--base none`` with ``--method rilq`` measures only the base; ``--base DIR`` (a saved
lowbit checkpoint, e.g. from ``lowbit quantize --no-eval``) trains RILQ over it without quantizing again.

``ranks``: ``run`` at every rank for every method, ``--jobs`` processes at a time with ``--threads`` each, then
``plot`` (give each base its own ``--out``). ``plot``: ranks.png (perplexity vs rank, one line per method and
setting) from the rank runs in OUT, and the spread of each method ((worst - best) / best) printed as JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from lowbit.state import state_of

OUT = Path("benchmarks/results/rilq")


def _value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def run(base: str, method: str, rank: int, overrides: dict, threads: int, windows: int,
        save: Path | None = None) -> dict:
    import time

    import torch

    if threads:
        torch.set_num_threads(threads)
    import lowbit
    from lowbit import memory
    from lowbit.compensate.loftq import LoftQConfig
    from lowbit.compensate.rilq import RILQConfig
    from lowbit.recipe import Recipe
    from lowbit.summary import bits_summary

    if Path(base).is_dir():  # a saved lowbit checkpoint: compensate it as `lowbit compensate` does
        if method != "rilq":
            raise SystemExit(f"--base {base} is a checkpoint: only --method rilq trains over a saved base")
        model, tok = lowbit.io.load(base)
        base_steps = []
    else:
        model, tok = lowbit.load_model("smollm2-135m")
        base_steps = [] if base == "none" else Recipe.parse(base).steps
    if method == "loftq":
        if len(base_steps) != 1:
            raise SystemExit(f"LoftQ wraps one quantizer step; {base} has {len(base_steps)}")
        steps = [LoftQConfig(quantizer=base_steps[0].to_dict(), rank=rank)]  # --set overrides are RILQ's
    elif method == "rilq":
        steps = base_steps + [RILQConfig(rank=rank, **overrides)]
    elif method == "loftq+rilq":  # RILQ trains the adapters LoftQ initialised (alpha 2r, as the presets)
        steps = [LoftQConfig(quantizer=base_steps[0].to_dict(), rank=rank),
                 RILQConfig(rank=rank, **overrides)]
    else:
        steps = base_steps
    start = time.perf_counter()
    lowbit.quantize(model, Recipe(steps), calib=lowbit.Calibration(tokenizer=tok))
    seconds = time.perf_counter() - start
    peak = memory.peak_rss_mb()
    model.eval()
    if save is not None:  # the trained model as a checkpoint (for lowbit eval --tasks)
        lowbit.save(model, save, tokenizer=tok, force=True)
    ppl = lowbit.perplexity(model, tok, windows=windows, progress=False).ppl
    bits = bits_summary(model)
    out = {"base": base, "method": method, "rank": rank, "overrides": overrides, "ppl": ppl, "windows": windows,
           "seconds": seconds, "peak_rss_mb": peak, "threads": threads or torch.get_num_threads(),
           "bits_per_weight": bits["bits_per_weight"], "adapter_bytes": bits["adapter_bytes"],
           "bits_per_weight_with_adapters": bits["bits_per_weight_with_adapters"]}
    history = state_of(model).history.get("rilq")
    if history is not None:
        out["rilq"] = {k: history[k] for k in ("step", "train", "val", "val_mse", "val_ce", "val_kl", "best_val",
                                                 "steps", "seconds", "stopped_early")}
    return out


def _child_args(args, method: str, rank: int, name: str) -> list[str]:
    cmd = [sys.executable, __file__, "run", "--base", args.base, "--method", method, "--rank", str(rank),
           "--threads", str(args.threads), "--windows", str(args.windows), "--name", name, "--out", str(args.out)]
    for item in args.set or []:
        cmd += ["--set", item]
    return cmd


def plot(out: Path) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [json.loads(p.read_text()) for p in sorted(out.glob("rank-*.json"))]
    spread = {}
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in sorted({r["method"] for r in runs}):
        pts = sorted((r["rank"], r["ppl"]) for r in runs if r["method"] == method)
        ranks, ppls = zip(*pts, strict=True)
        best, worst = min(ppls), max(ppls)
        spread[method] = {"ranks": list(ranks), "ppl": list(ppls), "spread": (worst - best) / best}
        settings = sorted({f"{k}={v}" for r in runs if r["method"] == method for k, v in r["overrides"].items()})
        label = " ".join([*sorted({Path(r["base"]).name for r in runs if r["method"] == method}), method, *settings])
        ax.plot(ranks, ppls, marker="o", label=f"{label} (spread {100 * (worst - best) / best:.0f}%)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("adapter rank")
    ax.set_ylabel("WikiText-2 ppl (16 windows of 2048)")
    bases = sorted({Path(r["base"]).name for r in runs})
    ax.set_title(f"SmolLM2-135M, {' / '.join(bases)} + compensation")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "ranks.png", dpi=120)
    return spread


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("run", "ranks"):
        p = sub.add_parser(name)
        p.add_argument("--base", default="rtn-w2g64")
        p.add_argument("--set", action="append", help="KEY=VALUE override of the compensation config")
        p.add_argument("--threads", type=int, default=2 if name == "run" else 1)
        p.add_argument("--windows", type=int, default=16)
        p.add_argument("--out", type=Path, default=OUT)
    r = sub.choices["run"]
    r.add_argument("--method", default="rilq", choices=["rilq", "loftq", "loftq+rilq", "none"])
    r.add_argument("--rank", type=int, default=16)
    r.add_argument("--name", default=None)
    r.add_argument("--save", type=Path, default=None, help="also save the trained model as a checkpoint here")
    k = sub.choices["ranks"]
    k.add_argument("--ranks", default="4,8,16,32,64")
    k.add_argument("--methods", default="rilq,loftq")
    k.add_argument("--jobs", type=int, default=2)
    k.add_argument("--force", action="store_true", help="run again the ranks whose results are in OUT")
    sub.add_parser("plot").add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    if args.cmd == "plot":
        print(json.dumps(plot(args.out)))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    if args.cmd == "run":
        overrides = dict(item.split("=", 1) for item in args.set or [])
        result = run(args.base, args.method, args.rank, {k: _value(v) for k, v in overrides.items()}, args.threads,
                     args.windows, args.save)
        print(json.dumps(result), flush=True)  # first: a result is never lost to a file error
        name = args.name or f"{args.method}-{Path(args.base).name}-r{args.rank}"  # a checkpoint base: its folder
        (args.out / f"{name}.json").write_text(json.dumps(result, indent=1))
        return
    pending = [(m, int(rank)) for rank in args.ranks.split(",") for m in args.methods.split(",")
               if args.force or not (args.out / f"rank-{m}-r{rank}.json").is_file()]  # finished runs are kept
    running: list[subprocess.Popen] = []
    while pending or running:
        while pending and len(running) < args.jobs:
            method, rank = pending.pop(0)
            running.append(subprocess.Popen(_child_args(args, method, rank, f"rank-{method}-r{rank}"),
                                            stdout=subprocess.DEVNULL))
        time.sleep(2)
        for proc in [p for p in running if p.poll() is not None]:
            if proc.returncode:
                raise SystemExit(f"a rank run failed: {proc.args}")
            running.remove(proc)
    print(json.dumps(plot(args.out)))


if __name__ == "__main__":
    main()
