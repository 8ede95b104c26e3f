"""Weights and activations at 4 bits (issue 7): SmolLM2-135M, WikiText-2 test perplexity and effective bits.

    python benchmarks/w4a4.py [--presets fp32,rtn-w4a4,quarot-rtn-w4a4,quarot-w4a4,quad-w4a4,quad-w4a4a8]
                              [--peft quad-w4a4a8] [--peft-steps 100] [--peft-lr 1e-4] [--tasks piqa,arc_easy]
                              [--limit 500] [--threads 2] [--windows 16] [--out DIR]

Each preset runs in a fresh process: load the float model, ``lowbit.quantize`` with the preset (calibration:
WikiText-2 valid), perplexity over ``--windows`` windows of 2048, effective weight bits of the decoder Linears
(packed codes, scales and QUAD's float outlier columns) and the activation bits (readers / writers).
``--peft P``: preset P, then QUAD's PEFT: only the full-precision outlier columns and the per-channel scales of
the packed weights train (``--peft-steps`` steps, batch 4 x 256 tokens of WikiText-2 valid, AdamW, warmup +
cosine), perplexity after. ``--tasks``: zero-shot
accuracy (``lowbit.eval.tasks``, first ``--limit`` examples of each) for every run. Results: OUT/results.json
(OUT = benchmarks/results/w4a4) and one JSON line per run on stdout.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

OUT = Path("benchmarks/results/w4a4")


def child(preset: str, threads: int, windows: int, peft_steps: int, peft_lr: float, tasks: str, limit: int) -> dict:
    import time

    import torch

    torch.set_num_threads(threads)
    import lowbit
    from lowbit.nn.qlinear import QLinear
    from lowbit.summary import bits_summary

    model, tok = lowbit.load_model("smollm2-135m")
    out: dict = {"preset": preset, "windows": windows, "threads": threads}
    start = time.perf_counter()
    if preset != "fp32":
        lowbit.quantize(model, preset, calib=lowbit.Calibration(tokenizer=tok))
        summary = bits_summary(model)
        layers = [m for m in model.modules() if isinstance(m, QLinear)]
        acts = sorted({(m.spec.act.bits if m.spec is not None and m.spec.act is not None else 16) for m in layers})
        out.update(weight_bits=summary["bits_per_weight"], outlier_bytes=summary["outlier_bytes"],
                   act_bits=acts, quantize_seconds=time.perf_counter() - start)
    if peft_steps:
        from lowbit.adapters import train_outliers
        from lowbit.train import TrainConfig, load_data, train

        out["ppl_before_peft"] = lowbit.perplexity(model, tok, windows=windows, progress=False).ppl
        n = train_outliers(model)
        result = train(model, load_data(tok, None, 256), TrainConfig(steps=peft_steps, batch=4, lr=peft_lr),
                       progress=False)
        out.update(peft_params=n, peft_steps=peft_steps, peft_lr=peft_lr, peft_seconds=result.seconds,
                   peft_losses=result.losses)
        model.eval()
    out["ppl"] = lowbit.perplexity(model, tok, windows=windows, progress=False).ppl
    if tasks:
        from lowbit.eval.tasks import evaluate_tasks

        out["tasks"] = evaluate_tasks(model, tok, tasks.split(","), limit=limit or None, progress=False)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="fp32,rtn-w4a4,quarot-rtn-w4a4,quarot-w4a4,quad-w4a4,quad-w4a4a8")
    ap.add_argument("--peft", default="quad-w4a4a8", help="preset to fine-tune the outliers of ('' = none)")
    ap.add_argument("--peft-steps", type=int, default=100)
    ap.add_argument("--peft-lr", type=float, default=1e-4)
    ap.add_argument("--tasks", default="")
    ap.add_argument("--limit", type=int, default=500)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        preset, steps = args.child
        print(json.dumps(child(preset, args.threads, args.windows, int(steps), args.peft_lr, args.tasks,
                               args.limit)))
        return
    runs = [(p, 0) for p in args.presets.split(",") if p] + ([(args.peft, args.peft_steps)] if args.peft else [])
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "results.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    for preset, steps in runs:
        cmd = [sys.executable, __file__, "--child", preset, str(steps), "--threads", str(args.threads),
               "--windows", str(args.windows), "--peft-lr", str(args.peft_lr), "--tasks", args.tasks,
               "--limit", str(args.limit)]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
        if proc.returncode:
            raise SystemExit(f"run {preset} failed")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        results[preset + (f"+peft{steps}" if steps else "")] = result
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1))
        tmp.replace(path)
        print(json.dumps({k: v for k, v in result.items() if k != "peft_losses"}), flush=True)


if __name__ == "__main__":
    main()
