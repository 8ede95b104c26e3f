"""The two kernels of a batched decode step, side by side with what they replace (issue 25, third pass).

    python benchmarks/batch_kernels.py [--threads 2] [--json OUT.json]

1. The float LM head (SmolLM2's tied 49,152 x 576 table) at 1-1024 rows: ``F.linear`` (MKL's sgemm) against
   :func:`lowbit.kernels.linear` (lowbit's fp32 GEMV for one row, oneDNN's fp32 GEMM for more), with the largest
   difference between the two relative to the largest logit.
2. The small-batch integer GEMM (``qgemm_i8``) over the seven Linears of one SmolLM2 decoder block, times 30
   blocks: milliseconds per decode step at 1, 4 and 16 rows, for int4 g128 and int2 g64 codes.

Each figure is the best of 5 repeats of 10-40 calls, so a busy machine inflates them less than a mean would;
run it alone all the same.
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import torch
import torch.nn.functional as F

SMOLLM2_BLOCK = [(576, 576, 2), (576, 192, 2), (576, 1536, 2), (1536, 576, 1)]  # (in, out, count): q/o, k/v, ...


def best_ms(fn, calls: int = 10, repeats: int = 5) -> float:
    fn()
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls * 1e3)
    return best


def head(rows_list=(1, 4, 16, 64, 1024)) -> list[dict]:
    from lowbit import kernels

    w = torch.randn(49152, 576) * 0.05
    out = []
    with torch.inference_mode():
        for rows in rows_list:
            x = torch.randn(rows, 576)
            ref, fast = F.linear(x, w), kernels.linear(x, w)
            out.append({"rows": rows, "f_linear_ms": best_ms(functools.partial(F.linear, x, w)),
                        "lowbit_ms": best_ms(functools.partial(kernels.linear, x, w)),
                        "max_rel_diff": float((fast - ref).abs().max() / ref.abs().max())})
    return out


def small_batch(bits: int, group_size: int, rows_list=(1, 4, 16)) -> list[dict]:
    from lowbit.kernels.cpu import extension

    ext = extension()
    torch.manual_seed(0)
    layers = []
    for k, n, count in SMOLLM2_BLOCK:
        groups = -(-k // group_size)
        layers.append((k, count, torch.randint(0, 256, (n, k * bits // 8), dtype=torch.uint8),
                       (torch.rand(n, groups) * 0.01).half(),
                       torch.randint(0, 2**bits, (n, groups), dtype=torch.uint8)))
    out = []
    for rows in rows_list:
        total = 0.0
        for k, count, codes, scales, zeros in layers:
            x = torch.randn(rows, k)
            call = functools.partial(ext.qgemm_i8, x, codes, scales, zeros, bits, group_size, 0)
            total += count * best_ms(call, calls=40)
        out.append({"rows": rows, "ms_per_step": 30 * total})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    result = {"threads": args.threads, "head": head(),
              "qgemm_i8": {"int4-g128": small_batch(4, 128), "int2-g64": small_batch(2, 64)}}
    print("LM head 49152 x 576 (ms): rows | F.linear | lowbit | max rel diff")
    for r in result["head"]:
        print(f"  {r['rows']:5d} | {r['f_linear_ms']:7.2f} | {r['lowbit_ms']:7.2f} | {r['max_rel_diff']:.1e}")
    for name, rows in result["qgemm_i8"].items():
        print(f"qgemm_i8 {name}, 30 SmolLM2 blocks (ms/step): "
              + ", ".join(f"{r['rows']} rows {r['ms_per_step']:.2f}" for r in rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
