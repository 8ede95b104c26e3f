"""AutoRound side by side with lowbit (issue 23): the same float model, calibration text and perplexity protocol.

    bash benchmarks/autoround_env.sh                     # once: torch, auto-round and lowbit in their own env
    python benchmarks/autoround_side_by_side.py [--model smollm2-135m] [--schemes w4g128,w3g128,w2g64]
                                                [--settings light] [--lowbit gptq-w4g128,...] [--sym]
                                                [--windows 16] [--work DIR] [--out F.json]

Every AutoRound run is one fresh process in ``benchmarks/.venv-autoround`` (never a lowbit dependency): lowbit
loads the float model (for SmolLM2, the GGUF dequantized by transformers, as everywhere here), AutoRound's
SignRound quantizes every decoder Linear (``AutoRound(...).quantize()`` leaves each rounded weight in memory as
floats: checked to hold at most 2^bits values per group), then lowbit's WikiText-2 test perplexity over the
first ``--windows`` windows of 2048. AutoRound calibrates on lowbit's calibration source (random windows of
WikiText-2 *valid*, seed 0) instead of its default pile-10k download, so both tools see the same text.

``--settings``: AutoRound's own recipes (its CLI's ``RECIPES``) by name — ``default`` (200 steps of 8 × 2048
tokens per block, 128 samples), ``best`` (1000 steps, 512 samples), ``light`` (50 steps, lr 5e-3) — or
``custom:ITERS:NSAMPLES:SEQLEN:BATCH[:LR]`` (no LR: AutoRound's default, 1 / iters). Asymmetric groups (a zero
point per group, lowbit's int storage) unless ``--sym``. ``--lowbit`` recipes run in lowbit's env in the same
invocation (``lowbit quantize --recipe R --json``) so the comparison is one run. Prints one JSON object: per run
ppl, seconds, peak RSS, the decoder Linears' bits per weight (bits + (16 + bits) / group: an fp16 scale and a
``bits``-bit zero point per group).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from child import emit, parser, run_json, work_dir

HERE = Path(__file__).resolve().parent
AUTOROUND_PY = HERE / ".venv-autoround" / "bin" / "python"
LOWBIT = [sys.executable, "-m", "lowbit"]

RECIPES = {  # AutoRound's CLI recipes (auto_round/cli/main.py RECIPES, 0.16.1): iters, nsamples, seqlen, batch, lr
    "default": (200, 128, 2048, 8, None),
    "best": (1000, 512, 2048, 8, None),
    "light": (50, 128, 2048, 8, 5e-3),
}

AUTOROUND = """
import json, resource, sys, time, torch
torch.set_num_threads(int(sys.argv[8]))
import lowbit
from lowbit.calibration import calibration_windows
from auto_round import AutoRound
name, bits, group, iters, nsamples, seqlen, batch = sys.argv[1:8]
lr, sym, windows = sys.argv[9], sys.argv[10] == "sym", int(sys.argv[11])
bits, group, iters, nsamples, seqlen, batch = map(int, (bits, group, iters, nsamples, seqlen, batch))
model, tok = lowbit.load_model(name)
data = list(calibration_windows(tok, nsamples, seqlen, seed=0).unsqueeze(1))  # (1, seqlen) token ids each
start = time.perf_counter()
ar = AutoRound(model, tok, bits=bits, group_size=group, sym=sym, iters=iters, nsamples=nsamples, seqlen=seqlen,
               batch_size=min(batch, nsamples), dataset=data, device_map="cpu", seed=42,
               **({} if lr == "none" else {"lr": float(lr)}))
ar.quantize()  # SignRound; every decoder Linear's weight is left rounded in memory (as floats)
seconds = time.perf_counter() - start
linears = [m.weight.detach() for n, m in ar.model.named_modules()
           if isinstance(m, torch.nn.Linear) and n.startswith("model.layers.")]
levels = max(g.unique().numel() for w in linears for row in w[:16] for g in row.split(group))  # 16 rows each
assert levels <= 2 ** bits, f"a group holds {levels} values: the weights were not rounded to {bits} bits"
ppl = lowbit.perplexity(ar.model, tok, windows=windows, progress=False)
print(json.dumps({"ppl": round(ppl.ppl, 3), "eval": ppl.label(), "quantize_seconds": round(seconds, 1),
                  "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}))
"""


def setting(text: str) -> tuple[int, int, int, int, float | None]:
    if text in RECIPES:
        return RECIPES[text]
    parts = text.split(":")
    if parts[0] != "custom" or len(parts) not in (5, 6):
        raise SystemExit(f"--settings {text!r}: use {', '.join(RECIPES)} or custom:ITERS:NSAMPLES:SEQLEN:BATCH[:LR]")
    return (*map(int, parts[1:5]), float(parts[5]) if len(parts) == 6 else None)


def scheme(text: str) -> tuple[int, int]:
    """``w4g128`` -> (4, 128)."""
    try:
        bits, group = text.removeprefix("w").split("g")
        return int(bits), int(group)
    except ValueError:
        raise SystemExit(f"--schemes {text!r}: write each as wBITSgGROUP, e.g. w4g128") from None


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--schemes", default="w4g128,w3g128,w2g64")
    p.add_argument("--settings", default="light", help="comma-separated: default, best, light or custom:...")
    p.add_argument("--lowbit", default="", help="comma-separated lowbit recipes to run in the same invocation")
    p.add_argument("--sym", action="store_true", help="AutoRound's symmetric groups (no zero point)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    if not AUTOROUND_PY.exists():
        raise SystemExit(f"{AUTOROUND_PY} missing: run `bash benchmarks/autoround_env.sh` first")
    work = work_dir(args.work, "autoround-")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    runs = []
    for text in args.schemes.split(","):
        bits, group = scheme(text)
        for name in args.settings.split(","):
            iters, nsamples, seqlen, batch, lr = setting(name)
            r = run_json([AUTOROUND_PY, "-c", AUTOROUND, args.model, bits, group, iters, nsamples, seqlen,
                          batch, args.threads, "none" if lr is None else lr, "sym" if args.sym else "asym",
                          args.windows])
            runs.append({"tool": "autoround", "scheme": text, "setting": name, "iters": iters,
                         "nsamples": nsamples, "seqlen": seqlen, "batch": batch, "sym": args.sym,
                         "bits_per_weight_linears": round(bits + (16 + (0 if args.sym else bits)) / group, 3), **r})
            print(f"{runs[-1]}", file=sys.stderr)
    for recipe in filter(None, args.lowbit.split(",")):
        r = run_json([*LOWBIT, "quantize", args.model, "--recipe", recipe, "--windows", str(args.windows),
                      "--out", work / f"lowbit-{recipe}", "--force", "--json"])
        runs.append({"tool": "lowbit", "recipe": recipe, **r})
        print(f"{runs[-1]}", file=sys.stderr)
    emit({"model": args.model, "windows": args.windows, "threads": args.threads, "runs": runs}, args.out)


if __name__ == "__main__":
    main()
