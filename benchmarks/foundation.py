"""Foundation benchmark: FP32 vs RTN/NF4/FP4 on SmolLM2-135M, all in one run.

For each recipe: WikiText-2 test perplexity (first N windows of 2048), effective bits/weight of the quantized
layers, checkpoint size on disk, quantize seconds, and greedy batch-1 decode tokens/s (128 new tokens) with
the ratio to FP32 measured in the same process. Prints a markdown table (stdout) and writes JSON.

    python benchmarks/foundation.py --windows 16
    python benchmarks/foundation.py --windows 0 --recipes rtn-w4g128,rtn-w4g64,rtn-w3g64 --no-speed   # all 148
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

import lowbit
from lowbit.eval.speed import decode_speed
from lowbit.io import read_manifest

DEFAULT_RECIPES = ("rtn-w8g64,rtn-w4g128,rtn-w4g64,rtn-w3g128,rtn-w3g64,rtn-w2g128,rtn-w2g64,nf4-g64,fp4-g64")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--recipes", default=DEFAULT_RECIPES)
    ap.add_argument("--windows", type=int, default=16, help="first N windows of 2048; 0 = all")
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--no-speed", action="store_true", help="skip decode timing")
    ap.add_argument("--json-out", default="benchmarks/results/foundation.json")
    args = ap.parse_args()

    fp_model, tok = lowbit.load_model(args.model)
    rows = []

    def measure(name: str, model, quantize_seconds=None):
        start = time.perf_counter()
        ppl = lowbit.perplexity(model, tok, windows=args.windows or None)
        eval_seconds = time.perf_counter() - start
        row = {"recipe": name, "ppl": ppl.ppl, "windows": ppl.windows, "eval_seconds": eval_seconds,
               "quantize_seconds": quantize_seconds}
        tmp = Path(tempfile.mkdtemp(prefix="lowbit-bench-"))
        try:
            lowbit.save(model, tmp / "ckpt", tokenizer=tok)
            summary = read_manifest(tmp / "ckpt")["summary"]
            row.update(bits_per_weight=summary["bits_per_weight"] or 32.0, size_mb=summary["size_bytes"] / 1e6,
                       packed_file_mb=summary["packed_file_bytes"] / 1e6)
        finally:
            shutil.rmtree(tmp)
        if not args.no_speed:
            speed = decode_speed(model, tok, new_tokens=args.decode_tokens)
            row.update(decode_tok_s=speed.tok_s, kernel=speed.kernel)
        print(json.dumps(row), file=sys.stderr, flush=True)
        rows.append(row)

    measure("fp32", fp_model)
    for name in [r for r in args.recipes.split(",") if r]:
        model = copy.deepcopy(fp_model)
        start = time.perf_counter()
        lowbit.quantize(model, name)
        measure(name, model, time.perf_counter() - start)
        del model

    fp = rows[0]
    for row in rows:
        if "decode_tok_s" in row:
            row["decode_ratio"] = row["decode_tok_s"] / fp["decode_tok_s"]
        row["ppl_ratio"] = row["ppl"] / fp["ppl"]
    meta = {"command": " ".join(sys.argv), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "machine": platform.processor() or platform.machine(), "date": time.strftime("%Y-%m-%d")}
    out = Path(args.json_out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))

    n = fp["windows"]
    print(f"WikiText-2 test, windows of 2048, first {n} windows; decode: greedy, batch 1, "
          f"{args.decode_tokens} new tokens; {meta['threads']} threads\n")
    print("| recipe | ppl | ppl / FP32 | bits/weight | MB on disk | quantize s | decode tok/s | decode / FP32 "
          "| kernel |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        q = f"{r['quantize_seconds']:.1f}" if r["quantize_seconds"] is not None else "—"
        d = f"{r['decode_tok_s']:.1f}" if "decode_tok_s" in r else "—"
        dr = f"{r['decode_ratio']:.2f}×" if "decode_ratio" in r else "—"
        print(f"| {r['recipe']} | {r['ppl']:,.2f} | {r['ppl_ratio']:.3f} | {r['bits_per_weight']:.3f} | "
              f"{r['size_mb']:.1f} | {q} | {d} | {dr} | {r.get('kernel', '—')} |")


if __name__ == "__main__":
    main()
