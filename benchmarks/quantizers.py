"""Quantizer benchmark (issue 3): perplexity, bits, quantize time and calibration peak RSS per recipe.

Each recipe runs in its own process (so its peak RSS is its own): load SmolLM2 (FP32), reset the peak-RSS mark,
quantize (calibration: WikiText-2 valid, N random windows of 2048, seed 0), record seconds and peak RSS,
then evaluate WikiText-2 test perplexity (first W windows of 2048). Rows are merged by recipe into the JSON
file, and the bits-vs-perplexity PNG is redrawn from all rows.

    python benchmarks/quantizers.py --recipes fp32,rtn-w4g128,gptq-w4g128,lowra-b2.0
    python benchmarks/quantizers.py --recipes gptq-w4g128 --calib-windows 32 --tag n32
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path("benchmarks/results/quantizers.json")
PLOT = Path("benchmarks/results/bits_vs_ppl.png")


def run_one(recipe: str, windows: int, calib_windows: int, model: str) -> dict:
    """Runs in the child process."""
    import transformers.models.llama.modeling_llama  # noqa: F401  (the model code's share of RSS is not weights)

    import lowbit
    from lowbit import memory
    from lowbit.summary import bits_summary

    rss_libraries = memory.rss_mb()  # python + torch + transformers + the model code, before any weight
    fp_model, tok = lowbit.load_model(model)
    fp_mb = sum(p.numel() * p.element_size() for p in fp_model.parameters()) / 2**20
    row = {"recipe": recipe, "fp_model_mb": fp_mb, "calib_windows": calib_windows, "rss_libraries_mb": rss_libraries}
    memory.release_free_memory()  # the GGUF conversion's garbage is not part of quantization's peak
    row["rss_before_quantize_mb"] = memory.rss_mb()
    memory.reset_peak()
    start = time.perf_counter()
    if recipe != "fp32":
        lowbit.quantize(fp_model, recipe, calib=lowbit.Calibration(tokenizer=tok, n=calib_windows))
    row["quantize_seconds"] = time.perf_counter() - start
    row["quantize_peak_rss_mb"] = memory.peak_rss_mb()
    row["quantize_extra_rss_mb"] = row["quantize_peak_rss_mb"] - row["rss_before_quantize_mb"]
    s = bits_summary(fp_model)
    row["code_bits"] = s["code_bits"] or 32.0
    row["bits_per_weight"] = s["bits_per_weight"] or 32.0
    r = lowbit.perplexity(fp_model, tok, windows=windows or None)
    row.update(ppl=r.ppl, windows=r.windows)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--recipes", default="fp32,rtn-w4g128,gptq-w4g128,rtn-w3g128,gptq-w3g128,rtn-w2g64,gptq-w2g64,"
                                         "lowra-b3.0,lowra-b2.5,lowra-b2.25,lowra-b2.0,lowra-b1.5,lowra-b1.15,"
                                         "lowra-gptq-b2.0,lowra-gptq-b1.5,lowra-gptq-b1.15")
    ap.add_argument("--windows", type=int, default=16, help="first N test windows of 2048; 0 = all")
    ap.add_argument("--calib-windows", type=int, default=16)
    ap.add_argument("--tag", default="", help="suffix for the row names (e.g. n32)")
    ap.add_argument("--json-out", default=str(RESULTS))
    ap.add_argument("--png-out", default=str(PLOT))
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.windows, args.calib_windows, args.model)))
        return

    from lowbit.fileio import atomic_write
    from lowbit.report import plot_bits_vs_ppl

    out = Path(args.json_out)
    rows = {r["name"]: r for r in json.loads(out.read_text())["rows"]} if out.is_file() else {}
    for recipe in [r for r in args.recipes.split(",") if r]:
        cmd = [sys.executable, __file__, "--one", recipe, "--windows", str(args.windows), "--calib-windows",
               str(args.calib_windows), "--model", args.model]
        done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
        row = json.loads(done.stdout.strip().splitlines()[-1])
        row["name"] = recipe + (f"@{args.tag}" if args.tag else "")
        row["command"] = " ".join(["python", "benchmarks/quantizers.py", *sys.argv[1:]])
        rows[row["name"]] = row
        print(json.dumps(row), file=sys.stderr, flush=True)
        atomic_write(out, json.dumps({"rows": list(rows.values())}, indent=1))
    plot_rows = [r for r in rows.values() if "@" not in r["name"]]
    plot_bits_vs_ppl(plot_rows, args.png_out)

    print("| recipe | calib N | ppl | code bits | bits/weight | quantize s | quantize peak RSS MB | peak / FP32 size "
          "| added by quantizing MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows.values():
        print(f"| {r['name']} | {r['calib_windows'] if r['recipe'] != 'fp32' else '—'} | {r['ppl']:,.2f} | "
              f"{r['code_bits']:.3f} | {r['bits_per_weight']:.3f} | {r['quantize_seconds']:.0f} | "
              f"{r['quantize_peak_rss_mb']:.0f} | {r['quantize_peak_rss_mb'] / r['fp_model_mb']:.2f}× | "
              f"{r.get('quantize_extra_rss_mb', float('nan')):.0f} |")


if __name__ == "__main__":
    main()
