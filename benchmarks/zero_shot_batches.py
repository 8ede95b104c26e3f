"""Zero-shot scoring one example per forward against batches of examples (``lowbit eval --tasks --batch-tokens``),
side by side in one process on one checkpoint: accuracies, seconds, and how far the batches move each answer's
log-likelihood and pick.

    python benchmarks/zero_shot_batches.py CK [--limit 300] [--batch-tokens 4096] [--compare 100] [--json OUT]

For each task: ``evaluate_examples`` both ways over the first ``--limit`` examples (timed), then the first
``--compare`` examples' log-likelihoods both ways: the largest relative change and the number of picks (acc or
acc_norm) that differ. Run it alone.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import lowbit
from lowbit.eval import tasks as T


def logliks(model, tok, examples, batch_tokens: int) -> list[list[float]]:
    out: list[list[float]] = [[] for _ in examples]
    for i, lls in T.scored(model, tok, examples, batch_tokens=batch_tokens):
        out[i] = lls
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--tasks", default="piqa,arc_easy,boolq")
    parser.add_argument("--limit", type=int, default=300)
    parser.add_argument("--batch-tokens", type=int, default=4096)
    parser.add_argument("--compare", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = lowbit.load(args.checkpoint)
    rows = {}
    for task in args.tasks.split(","):
        examples = T.load_task(task, args.limit)
        row = {}
        for name, batch in (("one_per_forward", 0), ("batched", args.batch_tokens)):
            start = time.perf_counter()
            row[name] = T.evaluate_examples(model, tok, examples, progress=False, batch_tokens=batch)
            row[name]["seconds"] = time.perf_counter() - start
        row["speed"] = row["one_per_forward"]["seconds"] / row["batched"]["seconds"]
        some = examples[:args.compare]
        single, batched = logliks(model, tok, some, 0), logliks(model, tok, some, args.batch_tokens)
        row["compared"] = len(some)
        row["max_rel_change"] = max(abs(a - b) / max(abs(a), 1e-9) for s, b_ in zip(single, batched, strict=True)
                                    for a, b in zip(s, b_, strict=True))
        row["picks_flipped"] = sum(T.predictions(ex, s) != T.predictions(ex, b)
                                   for ex, s, b in zip(some, single, batched, strict=True))
        rows[task] = row
        print(f"{task}: one per forward {row['one_per_forward']}, batched {row['batched']}, {row['speed']:.2f}x; "
              f"first {len(some)}: largest relative change {row['max_rel_change']:.1e}, "
              f"{row['picks_flipped']} picks flipped", flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"checkpoint": args.checkpoint, "limit": args.limit, "batch_tokens": args.batch_tokens,
                       "tasks": rows}, f, indent=1)


if __name__ == "__main__":
    main()
