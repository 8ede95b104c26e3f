"""One packed layer with many rows (prefill, batches): lowbit's ``auto`` kernel beside the dequantizing reference
and FP32 ``F.linear`` of a float weight of the same shape, in one process, rounds interleaved.

    python benchmarks/prefill_gemm.py [--rows 16,64,512] [--rounds 15] [--threads 2] [--json F]

Prints, per format, shape and row count, the median time of each path (min-max over the rounds) and the ratio
FP32 time / lowbit time (> 1: lowbit faster). The kernel that ``auto`` ran is printed beside it."""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from lowbit import kernels
from lowbit.formats import get_format
from lowbit.kernels import qmatmul_reference
from lowbit.quantizers.rtn import rtn_quantize

SHAPES = {"smollm2 q/o": (576, 576), "smollm2 k/v": (192, 576), "smollm2 gate/up": (1536, 576),
          "smollm2 down": (576, 1536), "1b gate/up": (8192, 2048), "1b down": (2048, 8192)}
FORMATS = {"int4 g128": (4, 128), "int2 g64": (2, 64)}


def timed(fn, rounds: int) -> list[float]:
    fn()
    out = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="16,64,512")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    results = []
    for fmt_name, (bits, group_size) in FORMATS.items():
        for shape_name, (out_f, in_f) in SHAPES.items():
            weight = torch.randn(out_f, in_f)
            qweight = rtn_quantize(weight, get_format("int", bits, False), "group", group_size)
            for rows in map(int, args.rows.split(",")):
                x = torch.randn(rows, in_f)
                kernels.reset_counts()
                with torch.no_grad():
                    kernels.qmatmul(x, qweight)
                kernel = kernels.kernel_summary().split(":")[0]
                paths = {"lowbit": lambda x=x, q=qweight: kernels.qmatmul(x, q),
                         "reference": lambda x=x, q=qweight: qmatmul_reference(x, q),
                         "fp32": lambda x=x, w=weight: torch.nn.functional.linear(x, w)}
                times = {name: [] for name in paths}
                with torch.no_grad():
                    for _ in range(args.rounds):  # interleaved: a noisy moment hits every path alike
                        for name, fn in paths.items():
                            times[name] += timed(fn, 1)
                row = {"format": fmt_name, "shape": shape_name, "rows": rows, "kernel": kernel,
                       **{f"{name}_ms": [1e3 * min(t), 1e3 * statistics.median(t), 1e3 * max(t)]
                          for name, t in times.items()}}
                row["fp32_over_lowbit"] = row["fp32_ms"][1] / row["lowbit_ms"][1]
                results.append(row)
                print(f"{fmt_name} {shape_name} {out_f}x{in_f} rows {rows}: lowbit ({kernel}) "
                      f"{row['lowbit_ms'][1]:.3f} ms [{row['lowbit_ms'][0]:.3f}-{row['lowbit_ms'][2]:.3f}], "
                      f"reference {row['reference_ms'][1]:.3f}, fp32 {row['fp32_ms'][1]:.3f} "
                      f"-> fp32 / lowbit {row['fp32_over_lowbit']:.2f}x", flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
