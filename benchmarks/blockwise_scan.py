"""Block-wise training settings compared on the first blocks of SmolLM2-135M (how the ``blockwise`` defaults were
chosen): held-out output error of each block, start (the GPTQ result) and after each epoch.

    python benchmarks/blockwise_scan.py "lr=0,scale_lr=0.005,epochs=2" "lr=0.001,epochs=2" [--blocks 2]
                                        [--bits 3] [--group-size 128]

Each argument is one setting (``BlockwiseConfig`` fields, ``key=value`` joined by commas). Calibration: WikiText-2
*valid*, 16 windows of 2048 (2 held out per block, as the step does). For each setting the first ``--blocks``
decoder blocks are quantized by GPTQ and trained exactly as ``lowbit quantize --recipe blockwise-gptq-…`` would;
prints one JSON line per setting: ``{block: [start, best, best epoch, [held-out loss after each epoch]]}``.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import lowbit
from lowbit.calibration import Calibration, block_inputs, for_each_block
from lowbit.quantizers.blockwise import Blockwise, BlockwiseConfig

INTS = ("epochs", "val_windows")


class Enough(Exception):
    """Raised once the asked number of blocks is done."""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("settings", nargs="+")
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--bits", type=int, default=3)
    p.add_argument("--group-size", type=int, default=128)
    args = p.parse_args()
    float_model, tok = lowbit.load_model("smollm2-135m")
    windows = Calibration(tokenizer=tok).get_windows(float_model)
    for setting in args.settings:
        fields = dict(kv.split("=") for kv in setting.split(","))
        config = BlockwiseConfig(quantizer={"step": "gptq", "bits": args.bits, "group_size": args.group_size},
                                 **{k: int(v) if k in INTS else float(v) for k, v in fields.items()})
        step, model, done = Blockwise(config), copy.deepcopy(float_model), []

        def work(prefix, collect, step=step, model=model, done=done):
            if len(done) == args.blocks:
                raise Enough
            done.append(prefix)
            step.apply_block(model, prefix, collect)

        start = time.perf_counter()
        try:
            for_each_block(model, block_inputs(model, windows), work)
        except Enough:
            pass
        rows = {k: [round(v["start"], 5), round(v["best"], 5), v["best_epoch"], [round(x, 5) for x in v["held_out"]]]
                for k, v in step.report.items()}
        print(json.dumps({"setting": setting, "seconds": round(time.perf_counter() - start), "blocks": rows}),
              flush=True)


if __name__ == "__main__":
    main()
