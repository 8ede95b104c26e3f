"""Data-parallel fine-tuning on the CPU: N processes x T threads against 1 process x N·T threads (issue 24).

Fine-tunes LoRA r16 over a packed SmolLM2 (rtn-w4g128, made once in WORK) with ``lowbit finetune``, each run a
fresh process, the configurations interleaved, ``--repeats`` times each; reports training tokens/s (median of
the steps after the first two, which warm up) as min / median / max per configuration, the ratio of medians,
and how far apart the two loss curves are (same global batches and seed; bf16 matmuls where the CPU has them,
as a user runs it, so rounding differs with the batch shape). Run it alone: decode and training timings collapse
when another CPU-heavy process runs.

    python benchmarks/processes.py --repeats 3 --steps 12 --out benchmarks/results_processes.json
    python benchmarks/processes.py --fsdp --repeats 2 --steps 12 --out benchmarks/results_processes_fsdp.json

``--fsdp`` adds a third configuration, the N processes with ``lowbit finetune --fsdp`` (float parameters sharded
by FSDP2), and every configuration reports the main process's peak RSS beside its speed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path


def lowbit(*args: str, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run([sys.executable, "-m", "lowbit", *args, "--json"], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"lowbit {args[0]} failed: {done.stderr.strip().splitlines()[-1]}")
    return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("out/bench-processes"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--processes", type=int, default=2, help="N: N processes x 1 thread vs 1 x N threads")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results_processes.json"))
    parser.add_argument("--fsdp", action="store_true", help="also N processes x 1 thread with --fsdp")
    a = parser.parse_args()
    base = a.work / "base-rtn-w4g128"
    if not (base / "lowbit.json").is_file():
        lowbit("quantize", "smollm2-135m", "--recipe", "rtn-w4g128", "--windows", "0", "--out", str(base), "--force",
               threads=a.processes)
    configs = {f"1 process x {a.processes} threads": (1, a.processes, ()), f"{a.processes} processes x 1 thread":
               (a.processes, 1, ())}
    if a.fsdp:
        configs[f"{a.processes} processes x 1 thread, --fsdp"] = (a.processes, 1, ("--fsdp",))
    rates: dict[str, list[float]] = {name: [] for name in configs}
    rss: dict[str, list[float]] = {name: [] for name in configs}
    curves: dict[str, list[float]] = {}
    for repeat in range(a.repeats):
        for name, (procs, threads, extra) in configs.items():
            out = a.work / f"run-{procs}x{threads}{'-'.join(('',) + tuple(e.strip('-') for e in extra))}"
            result = lowbit("finetune", str(base), "--out", str(out), "--force", "--steps", str(a.steps), "--batch",
                            str(a.batch), "--seq-len", str(a.seq_len), "--rank", "16", "--processes", str(procs),
                            *extra, threads=threads)
            rss[name].append(result["peak_rss_mb"])
            assert result["processes"] == procs, result
            log = json.loads((out / "train_log.json").read_text())
            rates[name].append(statistics.median(log["step_tokens_per_second"][2:] or log["step_tokens_per_second"]))
            curves[name] = log["losses"]
            print(f"repeat {repeat + 1}: {name}: {rates[name][-1]:.1f} tokens/s", file=sys.stderr)
    one, many = (statistics.median(rates[n]) for n in list(configs)[:2])
    first, second = (curves[n] for n in list(configs)[:2])
    rows = {name: {"min": min(r), "median": statistics.median(r), "max": max(r), "runs": r,
                   "peak_rss_mb_median": statistics.median(rss[name])} for name, r in rates.items()}
    report = {"model": "smollm2-135m rtn-w4g128 + LoRA r16", "steps": a.steps, "batch": a.batch,
              "seq_len": a.seq_len, "cpu_count": os.cpu_count(), "tokens_per_second": rows,
              "ratio_processes_over_threads": many / one,
              "loss_max_rel_diff": {name: max(abs(x - y) / abs(y) for x, y in zip(curves[name], first, strict=True))
                                    for name in list(configs)[1:]}}
    a.out.write_text(json.dumps(report, indent=1) + "\n")
    for name, r in rows.items():
        print(f"| {name} | {r['min']:.1f} | {r['median']:.1f} | {r['max']:.1f} | {r['peak_rss_mb_median']:.0f} |")
    print(f"ratio of medians (processes / threads): {many / one:.3f}; loss curves differ from one process's by at "
          f"most {report['loss_max_rel_diff']} relative")


if __name__ == "__main__":
    main()
