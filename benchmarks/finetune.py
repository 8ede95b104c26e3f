"""Fine-tuning benchmark (issue 5): quality of LoRA / LoRMA over packed bases, and training speed and memory of
LoRA over the packed 2-bit base vs LoRA over the FP32 model (PEFT), each run in its own process.

    python benchmarks/finetune.py quality [--runs lora-w3,lorma-w3,lora-lowra1.5] [--steps 200] [--threads 1]
                                          [--jobs 2] [--windows 16] [--out DIR]
    python benchmarks/finetune.py speed [--steps 20] [--recipe rtn-w2g64+emb8] [--out DIR]

``quality``: SmolLM2-135M quantized with the run's recipe, WikiText-2 test perplexity (16 windows) before, then
``--steps`` steps of the adapter (r=16, batch 4 x 256 tokens of WikiText-2 valid, all decoder Linears, lr 2e-4,
warmup 3% + cosine), perplexity after. Runs go in fresh processes, ``--jobs`` at a time (``--threads`` each).
Results merge into OUT/quality.json (OUT = benchmarks/results/finetune); losses.png overlays the curves and the
step at which each run first reaches lora-w3's final loss (running mean of 10 steps) is reported. Runs
``loftq-init-w2`` and ``rilq-init-w2`` (issue 6) train the adapters their recipe initialised instead of new ones,
to compare with ``lora-w2`` (zero-init LoRA over the same RTN w2g64 base); ``rilq100-init-w2`` cuts RILQ to 100
steps (a run's recipe ``PRESET@KEY=VALUE,...`` overrides the preset's last step).

``speed``: in one run, one process after the other: LoRA r=16 (alpha 32) on every decoder Linear through PEFT
over the FP32 model, and lowbit LoRA r=16 over the packed ``--recipe`` base (rtn-w2g64 with the int8 embedding
table); same trainer, same data and batch 4 x 256; 2 warm-up steps, then ``--steps`` timed steps; training tokens/s
and peak RSS during the timed steps, with ratios (lowbit / FP32), into OUT/speed.json (``speed-mmapN.json`` with
``--mmap-threshold N``). Peak RSS on glibc is mostly heap growth from freed temporaries, not live tensors: with
``--mmap-threshold 65536`` (glibc's ``MALLOC_MMAP_THRESHOLD_`` for both children) blocks above 64 KiB are mapped
and unmapped one by one, so the peak is closer to what is live (and steps may be slower).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

OUT = Path("benchmarks/results/finetune")
RUNS = {  # name: (recipe, adapter)
    "lora-w3": ("rtn-w3g64", "lora"),
    "lorma-w3": ("rtn-w3g64", "lorma"),
    "lora-lowra1.5": ("lowra-b1.5", "lora"),
    "lora-w2": ("rtn-w2g64", "lora"),
    "lora-lowragptq1.5": ("lowra-gptq-b1.5", "lora"),  # calibrated LowRA: data-free lowra-b1.5 starts at ppl ~4e5
    # issue 6: the same LoRA r16 run over RTN w2g64 from three starts: zero-init (lora-w2), LoftQ, RILQ
    "loftq-init-w2": ("loftq-w2g64-r16", "continue"),
    "rilq-init-w2": ("rtn-w2g64-rilq16", "continue"),
    "rilq100-init-w2": ("rtn-w2g64-rilq16@max_steps=100", "continue"),  # RILQ cut to 100 steps (time)
}
PEFT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _setup(threads: int):
    import torch

    if threads:
        torch.set_num_threads(threads)


def _recipe(spec: str):
    """``PRESET`` or ``PRESET@KEY=VALUE,...`` (the overrides go to the preset's last step, e.g. RILQ's)."""
    import dataclasses

    from lowbit.recipe import Recipe

    name, _, overrides = spec.partition("@")
    recipe = Recipe.parse(name)
    if not overrides:
        return recipe
    values = {k: (int(v) if v.isdigit() else float(v)) for k, v in (kv.split("=") for kv in overrides.split(","))}
    return Recipe([*recipe.steps[:-1], dataclasses.replace(recipe.steps[-1], **values)], name=spec)


def quality_child(name: str, steps: int, threads: int, windows: int) -> dict:
    _setup(threads)
    import torch

    import lowbit
    from lowbit import adapters as ad
    from lowbit.train import TrainConfig, load_data, train

    recipe, adapter = RUNS[name]
    model, tok = lowbit.load_model("smollm2-135m")
    lowbit.quantize(model, _recipe(recipe), calib=lowbit.Calibration(tokenizer=tok))
    before = lowbit.perplexity(model, tok, windows=windows, progress=False).ppl
    torch.manual_seed(0)
    if adapter != "continue":  # "continue": train the adapters the recipe initialised (LoftQ, RILQ)
        ad.attach(model, ad.LoRAConfig(rank=16) if adapter == "lora" else ad.LoRMAConfig(rank=16))
    ad.freeze(model)
    result = train(model, load_data(tok, None, 256), TrainConfig(steps=steps, batch=4), progress=False)
    model.eval()
    after = lowbit.perplexity(model, tok, windows=windows, progress=False).ppl
    return {"run": name, "recipe": recipe, "adapter": adapter, "rank": 16, "ppl_before": before, "ppl_after": after,
            "windows": windows, "threads": threads, **result.to_dict()}


def speed_child(kind: str, steps: int, threads: int, recipe: str) -> dict:
    _setup(threads)
    import torch

    import lowbit
    from lowbit import adapters as ad
    from lowbit import memory
    from lowbit.train import TrainConfig, load_data, train

    model, tok = lowbit.load_model("smollm2-135m")
    if kind == "fp32-peft":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=PEFT_TARGETS))
    else:
        lowbit.quantize(model, recipe)
        torch.manual_seed(0)
        ad.attach(model, ad.LoRAConfig(rank=16))
        ad.freeze(model)
    data = load_data(tok, None, 256)
    memory.release_free_memory()
    train(model, data, TrainConfig(steps=2, batch=4), progress=False)  # warm-up: allocator, threads
    result = train(model, data, TrainConfig(steps=steps, batch=4, seed=1), progress=False)
    return {"kind": kind, "recipe": None if kind == "fp32-peft" else recipe,
            "tokens_per_second": result.tokens_per_second, "peak_rss_mb": result.peak_rss_mb,
            "steps": steps, "seconds": result.seconds, "rss_after_mb": memory.rss_mb(), "threads": threads}


def _spawn(args: list[str], env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, __file__, "child", *args], stdout=subprocess.PIPE, text=True,
                            env=None if env is None else {**os.environ, **env})


def _collect(proc: subprocess.Popen) -> dict:
    out, _ = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"a child failed (exit {proc.returncode}); its error is printed above")
    return json.loads(out.strip().splitlines()[-1])


def first_reach(losses: list[float], target: float, window: int = 10) -> int | None:
    """First step at which the running mean of the last ``window`` losses (fewer in a run shorter than that, as
    TrainResult.final_loss) is at or below ``target``."""
    window = max(1, min(window, len(losses)))
    for i in range(window, len(losses) + 1):
        if sum(losses[i - window:i]) / window <= target:
            return i
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="mode", required=True)
    q = sub.add_parser("quality")
    q.add_argument("--runs", default="lora-w3,lorma-w3,lora-lowra1.5")
    q.add_argument("--steps", type=int, default=200)
    q.add_argument("--threads", type=int, default=1)
    q.add_argument("--jobs", type=int, default=2, help="runs at a time")
    q.add_argument("--windows", type=int, default=16)
    q.add_argument("--out", type=Path, default=OUT)
    s = sub.add_parser("speed")
    s.add_argument("--steps", type=int, default=20)
    s.add_argument("--threads", type=int, default=0)
    s.add_argument("--recipe", default="rtn-w2g64+emb8")
    s.add_argument("--mmap-threshold", type=int, default=0, help="glibc MALLOC_MMAP_THRESHOLD_ for the children "
                                                                 "(bytes; 0 = glibc's dynamic default)")
    s.add_argument("--out", type=Path, default=OUT)
    c = sub.add_parser("child")
    c.add_argument("what")
    c.add_argument("name")
    c.add_argument("steps", type=int)
    c.add_argument("threads", type=int)
    c.add_argument("extra", nargs="?", default="16")  # quality: windows; speed: recipe
    args = ap.parse_args()

    if args.mode == "child":
        row = (quality_child(args.name, args.steps, args.threads, int(args.extra)) if args.what == "quality" else
               speed_child(args.name, args.steps, args.threads, args.extra))
        print(json.dumps(row))
        return

    from lowbit.fileio import atomic_write
    from lowbit.train import plot_losses

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    if args.mode == "speed":
        rows = {}
        for kind in ("fp32-peft", "lowbit-w2g64"):
            env = {"MALLOC_MMAP_THRESHOLD_": str(args.mmap_threshold)} if args.mmap_threshold else None
            rows[kind] = _collect(_spawn(["speed", kind, str(args.steps), str(args.threads), args.recipe], env))
            rows[kind]["mmap_threshold"] = args.mmap_threshold or None
            print(json.dumps(rows[kind]), file=sys.stderr)
        base, packed = rows["fp32-peft"], rows["lowbit-w2g64"]
        summary = {"rows": rows, "tokens_per_second_ratio": packed["tokens_per_second"] / base["tokens_per_second"],
                   "peak_rss_ratio": packed["peak_rss_mb"] / base["peak_rss_mb"]}
        name = f"speed-mmap{args.mmap_threshold}.json" if args.mmap_threshold else "speed.json"
        atomic_write(out / name, json.dumps(summary, indent=1))
        print(json.dumps(summary))
        return

    names = [n.strip() for n in args.runs.split(",") if n.strip()]
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        raise SystemExit(f"unknown run(s) {unknown}; known: {', '.join(RUNS)}")
    fresh = {}
    for start in range(0, len(names), max(1, args.jobs)):
        batch = names[start:start + max(1, args.jobs)]
        procs = {n: _spawn(["quality", n, str(args.steps), str(args.threads), str(args.windows)]) for n in batch}
        for name, proc in procs.items():
            fresh[name] = _collect(proc)
    path = out / "quality.json"
    results = {**(json.loads(path.read_text()) if path.is_file() else {}), **fresh}  # read late: runs take hours
    lora_final = results.get("lora-w3", {}).get("final_loss")
    for row in results.values():
        row["step_reaching_lora_w3_final_loss"] = None if lora_final is None else first_reach(row["losses"],
                                                                                               lora_final)
    atomic_write(path, json.dumps(results, indent=1))
    plot_losses({n: r["losses"] for n, r in results.items()}, out / "losses.png",
                title="adapter fine-tuning, r=16, batch 4 x 256 (SmolLM2-135M)")
    print(json.dumps({n: {k: r[k] for k in ("ppl_before", "ppl_after", "first_loss", "final_loss",
                                            "tokens_per_second", "step_reaching_lora_w3_final_loss")}
                      for n, r in results.items()}))


if __name__ == "__main__":
    main()
