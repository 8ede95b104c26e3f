"""kill -9 at random points of ``lowbit quantize --force`` over an existing checkpoint (issue "Trust").

Each round starts the real command on a tiny random llama folder, writing over the checkpoint the previous round
left, and kills it with SIGKILL at a random point: a third of the rounds uniform over a whole uninterrupted run,
a third over its last 40 %, and a third inside the save itself (the moment its staging folder appears, plus 0-40
ms: writing shards, fsync, the exchange, removing the old folder). After every kill the output must hold a
complete checkpoint that loads and passes every check (old or new: rounds alternate 2- and 4-bit so we can tell
which), and after every save that completes no staging folder may remain next to it.

    python benchmarks/kill_saves.py --rounds 200 [--seed 0]

Prints one JSON object: rounds, how many kept the old checkpoint or hold the new one, how many ran to the end,
how many kills left a staging folder behind (each cleaned by the next round's save), and the failures.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lowbit

ROOT = Path(__file__).resolve().parents[1]


def tiny_folder(where: Path) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import tiny_model, word_tokenizer

    folder = where / "tiny-llama"
    tiny_model("llama", max_position_embeddings=2048).save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return folder


def command(source: Path, out: Path, bits: int) -> list[str]:
    return [sys.executable, "-m", "lowbit", "quantize", str(source), "--recipe", f"rtn-w{bits}g64", "--out", str(out),
            "--force", "--no-eval"]


def bits_of(out: Path) -> int:
    """Load with every check (sizes, SHA-256, headers, manifest checksum); the checkpoint's code bits."""
    model, _ = lowbit.load(out)
    return lowbit.state_of(model).recipe.steps[0].bits


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        source, out = tiny_folder(tmp), tmp / "ckpt"
        start = time.perf_counter()
        subprocess.run(command(source, out, 2), check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        full = time.perf_counter() - start
        counts = {"old": 0, "new": 0, "completed": 0, "killed_leaving_staging": 0}
        failures = []
        bits = 2
        for i in range(args.rounds):
            new_bits = 6 - bits
            mode = ("run", "end", "save")[i % 3]
            delay = {"run": rng.uniform(0, full), "end": rng.uniform(0.6 * full, full),
                     "save": rng.uniform(0, 0.04)}[mode]
            child = subprocess.Popen(command(source, out, new_bits), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
            if mode == "save":  # wait for this child's staging folder, then kill within the save
                while child.poll() is None and not list(out.parent.glob(f".{out.name}.tmp-{child.pid}-*")):
                    time.sleep(0.0005)
            try:
                child.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                os.kill(child.pid, signal.SIGKILL)
                child.wait()
            completed = child.returncode == 0
            try:
                found = bits_of(out)
            except Exception as e:  # noqa: BLE001 - any failure to load is a finding
                failures.append(f"round {i} (delay {delay:.2f}s): {type(e).__name__}: {e}")
                break
            counts["new" if found == new_bits else "old"] += 1
            counts["completed"] += completed
            counts["killed_leaving_staging"] += bool(not completed and leftovers(out))  # the next round cleans it
            if completed and leftovers(out):
                failures.append(f"round {i}: a completed save left {leftovers(out)}")
            bits = found
        # the next save cleans whatever the last kill left
        subprocess.run(command(source, out, 6 - bits), check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        final_leftovers = leftovers(out)
        if final_leftovers:
            failures.append(f"after the final save: {final_leftovers}")
        print(json.dumps({"rounds": args.rounds, "uninterrupted_run_s": round(full, 2), **counts,
                          "failures": failures, "leftovers_after_next_save": final_leftovers}))


if __name__ == "__main__":
    main()
