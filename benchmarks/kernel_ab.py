"""lowbit's CPU kernels at two or more git revisions, timed side by side in one process (issue 25's kernel passes).

    python benchmarks/kernel_ab.py --revs HEAD~1,WORKTREE [--threads 1] [--rounds 41] [--sets 2] [--json OUT.json]
    python benchmarks/kernel_ab.py --revs HEAD~1,WORKTREE --rows 16   # the small-batch GEMM (qgemm_i8) instead
    python benchmarks/kernel_ab.py --revs HEAD~1,WORKTREE --attention 512,2048   # and whole-sequence attention

Each revision's ``lowbit/kernels/csrc/*.cpp`` is built as its own extension (``lbab_<i>``, under ``--work``) with
the flags ``lowbit/kernels/cpu.py`` uses; its ``TORCH_LIBRARY`` blocks are compiled out (``-DLB_NO_LIB``) so that
several builds load in one process. ``WORKTREE`` names the files as they are on disk now. The int8-activation
quantized GEMV (``qgemv``) then runs on random codes of each format and shape (or, with ``--rows M`` above 1, the
small-batch integer GEMM ``qgemm_i8`` on ``M`` rows, on SmolLM2's and a 1B LLaMA's layer shapes), the revisions
round robin within every round, so a VM whose memory bandwidth drifts (this one: 28-54 GB/s within a minute) moves all
of them together. Printed per shape: the median microseconds over the rounds and GB/s of codes + scales + zero points;
the ratio of each revision to the first; the largest output difference relative to the first revision's largest output
(0 when the sums are the same). With ``--attention L1,L2,...`` each set also times ``causal_attention`` (fp32, inputs
laid out as transformers makes them) on SmolLM2's heads (9 over 3 KV heads of 64) and a 1B LLaMA's (32 over 8) at
those lengths. ``--sets N`` repeats the whole table, the only honest spread here: single shapes moved
±30% between sets in the seventh and eighth passes (BENCHMARKS.md). Run it alone.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CSRC = "lowbit/kernels/csrc"
FORMATS = ((4, 128), (2, 64), (8, 128), (4, 32), (1, 128))  # (bits, group size)
SHAPES = ((8192, 2048, 30), (2048, 8192, 30), (576, 1536, 1000), (256, 2048, 2000))  # (out, in, calls a round)
BATCH_SHAPES = ((1536, 576, 100), (576, 1536, 100), (576, 576, 200), (192, 576, 400), (8192, 2048, 3), (2048, 8192, 3))


def guard_library_blocks(source: str) -> str:
    """``source`` with every ``TORCH_LIBRARY*(...) { ... }`` block that starts a line inside ``#ifndef LB_NO_LIB``:
    two builds that both register the ``lowbit`` ops would fail to load in one process."""
    out, pos = [], 0
    for match in re.finditer(r"^TORCH_LIBRARY\w*\(", source, flags=re.MULTILINE):  # at a line's start: not a comment
        start = match.start()
        depth, end = 0, source.index("{", start)
        while True:  # to the brace that closes the block's first
            depth += {"{": 1, "}": -1}.get(source[end], 0)
            if depth == 0:
                break
            end += 1
        out += [source[pos:start], "#ifndef LB_NO_LIB\n", source[start:end + 1], "\n#endif\n"]
        pos = end + 1
    return "".join(out) + source[pos:]


def sources_at(rev: str, into: Path) -> list[Path]:
    """The kernel sources of git revision ``rev`` (or the working tree for ``WORKTREE``) written under ``into``."""
    into.mkdir(parents=True, exist_ok=True)
    if rev == "WORKTREE":
        names = sorted(p.name for p in (ROOT / CSRC).glob("*.cpp"))
        texts = [(ROOT / CSRC / n).read_text() for n in names]
    else:
        listing = subprocess.run(["git", "-C", str(ROOT), "ls-tree", "--name-only", f"{rev}:{CSRC}"],
                                 capture_output=True, text=True, check=True).stdout.split()
        names = sorted(n for n in listing if n.endswith(".cpp"))
        texts = [subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{CSRC}/{n}"], capture_output=True,
                                text=True, check=True).stdout for n in names]
    paths = []
    for name, text in zip(names, texts, strict=True):
        (into / name).write_text(guard_library_blocks(text))
        paths.append(into / name)
    return paths


def build(revs: list[str], work: Path) -> dict:
    from torch.utils.cpp_extension import load

    os.environ["TORCH_EXTENSIONS_DIR"] = str(work / "ext")
    return {rev: load(name=f"lbab_{i}", sources=[str(p) for p in sources_at(rev, work / f"src{i}")],
                      extra_cflags=["-O3", "-march=native", "-fopenmp", "-DLB_NO_LIB"], extra_ldflags=["-fopenmp"],
                      verbose=False)
            for i, rev in enumerate(revs)}


def random_weight(out_features: int, in_features: int, bits: int, group: int):
    """(codes (out, in*bits/8) uint8, scales (out, in/group) fp16, zero points (out, in/group) uint8)."""
    return (torch.randint(0, 256, (out_features, in_features * bits // 8), dtype=torch.uint8),
            (torch.rand(out_features, -(-in_features // group)) + 0.5).half(),
            torch.randint(0, 2 ** bits, (out_features, -(-in_features // group)), dtype=torch.uint8))


def kernel_call(ext, x: torch.Tensor, weight, bits: int, group: int) -> torch.Tensor:
    """The int8-activation kernel for ``x``: the GEMV for one row ``(in,)``, the small-batch GEMM for ``(M, in)``."""
    if x.dim() == 1:
        return ext.qgemv(x, *weight, None, bits, group, 0, True)
    return ext.qgemm_i8(x, *weight, bits, group, 0)


def side_by_side(exts: dict, rounds: int, call, calls: int = 1) -> tuple[float, dict]:
    """``call(ext, i)`` in every revision: the largest difference of its output (``i = 0``) from the first
    revision's, relative to the first's largest output, and each revision's median seconds per call over ``rounds``
    round-robin rounds of ``calls`` calls (``i = 0 .. calls - 1``)."""
    revs = list(exts)
    ys = {r: call(exts[r], 0) for r in revs}
    ref = ys[revs[0]]
    diff = max((ys[r] - ref).abs().max().item() for r in revs) / ref.abs().max().item()
    seconds = {r: [] for r in revs}
    for _ in range(rounds):
        for r in revs:
            start = time.perf_counter()
            for i in range(calls):
                call(exts[r], i)
            seconds[r].append((time.perf_counter() - start) / calls)
    return diff, {r: statistics.median(seconds[r]) for r in revs}


def _weight_call(ext, i: int, x: torch.Tensor, weights: list, bits: int, group: int) -> torch.Tensor:
    return kernel_call(ext, x, weights[i % len(weights)], bits, group)


def _attention_call(ext, i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return ext.causal_attention(q, k, v, q.shape[-1] ** -0.5)


def time_set(exts: dict, rounds: int, rows_m: int = 1) -> list[dict]:
    revs, rows = list(exts), []
    for bits, group in FORMATS:
        applies = [getattr(e, "int8_x_applies", e.vnni_applies)(bits, group, False) for e in exts.values()]
        if rows_m > 1 and not all(applies):
            print(f"int{bits} g{group}: no small-batch int8 kernel in every revision on this CPU (AVX2: up to 4 bits)")
            continue
        for n, k, calls in SHAPES if rows_m == 1 else BATCH_SHAPES:
            # several copies of a weight larger than the caches, so that every call reads from memory
            weights = [random_weight(n, k, bits, group) for _ in range(1 if n * k < 1e6 else 6)]
            x = torch.randn(k) if rows_m == 1 else torch.randn(rows_m, k)
            diff, median = side_by_side(exts, rounds, functools.partial(_weight_call, x=x, weights=weights, bits=bits,
                                                                        group=group), calls)
            nbytes = weights[0][0].numel() + weights[0][1].numel() * 3
            rows.append({"bits": bits, "group_size": group, "out": n, "in": k, "rows": rows_m, "max_rel_diff": diff,
                         "us": {r: median[r] * 1e6 for r in revs},
                         "gb_per_s": {r: nbytes / median[r] / 1e9 for r in revs},
                         "ratio_to_first": {r: median[r] / median[revs[0]] for r in revs}})
            shape = f"{n}x{k}" + (f" x {rows_m} rows" if rows_m > 1 else "")
            print(f"int{bits} g{group} {shape} (max rel diff {diff:.1e}): " + "  ".join(
                f"{r} {median[r] * 1e6:.1f} us ({rows[-1]['ratio_to_first'][r]:.2f}x)" for r in revs), flush=True)
    return rows


ATTENTION_SHAPES = (("smollm2-135m", 9, 3, 64), ("llama-1b", 32, 8, 64))  # (name, heads, kv heads, head dim)


def time_attention(exts: dict, rounds: int, lengths: list[int]) -> list[dict]:
    """``causal_attention`` of every revision on :data:`ATTENTION_SHAPES` at each length, round robin."""
    revs, rows = list(exts), []
    for name, heads, kv_heads, dim in ATTENTION_SHAPES:
        for length in lengths:
            q, k, v = (torch.randn(1, length, h, dim).transpose(1, 2) for h in (heads, kv_heads, kv_heads))
            diff, median = side_by_side(exts, rounds, functools.partial(_attention_call, q=q, k=k, v=v))
            rows.append({"attention": name, "tokens": length, "max_rel_diff": diff,
                         "ms": {r: median[r] * 1e3 for r in revs},
                         "ratio_to_first": {r: median[r] / median[revs[0]] for r in revs}})
            print(f"attention {name} {length} tokens (max rel diff {diff:.1e}): " + "  ".join(
                f"{r} {median[r] * 1e3:.2f} ms ({rows[-1]['ratio_to_first'][r]:.2f}x)" for r in revs), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--revs", default="HEAD,WORKTREE", help="comma-separated git revisions; WORKTREE = files on disk")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rows", type=int, default=1, help="activation rows: 1 = the GEMV, more = the small-batch GEMM")
    ap.add_argument("--rounds", type=int, default=41)
    ap.add_argument("--sets", type=int, default=2)
    ap.add_argument("--attention", default="", help="comma-separated lengths: also time causal_attention")
    ap.add_argument("--work", type=Path, default=None, help="build folder (default: a new temporary folder)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    revs = args.revs.split(",")
    work = args.work or Path(tempfile.mkdtemp(prefix="kernel_ab_"))
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    exts = build(revs, work)
    sets = []
    for s in range(args.sets):
        print(f"set {s + 1} of {args.sets}, {args.threads} thread(s), {args.rounds} rounds", flush=True)
        rows = time_set(exts, args.rounds, args.rows)
        if args.attention:
            rows += time_attention(exts, args.rounds, [int(n) for n in args.attention.split(",")])
        sets.append(rows)
    if args.json:
        args.json.write_text(json.dumps({"revs": revs, "threads": args.threads, "rows": args.rows,
                                         "rounds": args.rounds, "sets": sets}, indent=1))


if __name__ == "__main__":
    main()
