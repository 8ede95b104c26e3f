"""What integer-coded LoRA adapters cost at decode: a checkpoint as stored against the same adapters unpacked.

int8 and int4 adapters (``adapter_dtype``) are dequantized by ``LoRA.factors`` on every forward; a batch-1 decode
step runs every adapted layer once per token (210 layers on SmolLM2). This measures greedy batch-1 decode tokens/s
of ``CK`` as loaded (coded adapters), and of a second copy whose adapters were unpacked to fp32 parameters once
(``LoRA.unpack``: identical values), in round robin, ``--runs`` times each, in one process; prints one JSON object
with each median, its [min, max] and the ratio. Measure it alone on the cores.

    python benchmarks/adapter_decode.py CK --runs 3 --tokens 64
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics

import torch

import lowbit
from lowbit.adapters.lora import LoRA
from lowbit.eval.speed import decode_speed


def unpacked(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy with every integer-coded LoRA turned back into fp32 parameters."""
    twin = copy.deepcopy(model)
    for module in twin.modules():
        if isinstance(module, LoRA) and module.code_bits is not None:
            module.unpack()
    return twin


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    model, tokenizer = lowbit.load(args.checkpoint)
    coded = [m.code_bits for m in model.modules() if isinstance(m, LoRA)]
    models = {"stored": model, "unpacked": unpacked(model)}
    speeds: dict[str, list[float]] = {name: [] for name in models}
    with torch.no_grad():
        for _ in range(args.runs):
            for name, m in models.items():
                speeds[name].append(decode_speed(m, tokenizer, new_tokens=args.tokens).tok_s)
    row = {name: {"tok_s": statistics.median(v), "range": [min(v), max(v)]} for name, v in speeds.items()}
    print(json.dumps({"checkpoint": args.checkpoint, "adapters": len(coded), "code_bits": sorted(set(map(str, coded))),
                      "runs": args.runs, "new_tokens": args.tokens, "threads": torch.get_num_threads(), **row,
                      "stored_over_unpacked": row["stored"]["tok_s"] / row["unpacked"]["tok_s"]}))


if __name__ == "__main__":
    main()
