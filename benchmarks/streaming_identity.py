"""Streamed vs in-memory quantize of SmolLM2-135M: are the checkpoints byte-identical, and what does each cost?

    python benchmarks/streaming_identity.py [--recipes rtn-w4g128 gptq-w4g128] [--work DIR]

The built-in GGUF is dequantized once and written as an HF folder of fp16 safetensors shards (fp16: what the
GGUF's float parts are stored in, and the storage the checkpoint keeps), then ``lowbit quantize`` runs on that
folder twice per recipe, each in a fresh process: ``--no-stream`` (the whole fp32 model in memory) and
``--stream`` (one decoder block at a time), with the same calibration windows (16 × 2048 tokens of WikiText-2
valid, seed 0) and no evaluation. Every file of the two checkpoints is compared byte for byte; of ``lowbit.json``
only the wall time (``quantize_seconds``) and the manifest's own checksum over it may differ. Prints one JSON
object with the verdicts, seconds and peak RSS of each run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TIMING = ("quantize_seconds", "manifest_sha256")


def hf_folder(work: Path) -> Path:
    """SmolLM2-135M as an HF folder of fp16 safetensors shards (made once, in a child process: a child's peak RSS
    counts its parent's at the fork, so this process stays small)."""
    folder = work / "smollm2-135m-fp16"
    if not (folder / "config.json").is_file():
        subprocess.run([sys.executable, __file__, "--make-folder", "--work", str(work)], check=True)
    return folder


def make_folder(work: Path) -> None:
    folder = work / "smollm2-135m-fp16"
    if not (folder / "config.json").is_file():
        import torch

        import lowbit

        model, tokenizer = lowbit.load_model("smollm2-135m")
        model.hf_quantizer = None  # its weights are plain floats now (transformers still marks it as GGUF)
        model.config.dtype = torch.float16
        model.to(torch.float16).save_pretrained(folder, max_shard_size="100MB")
        tokenizer.save_pretrained(folder)


def run_measured(cmd: list[str]) -> tuple[dict, float]:
    """Run ``cmd`` (a ``--json`` lowbit command); its JSON and the child's peak RSS over its whole life, MiB
    (``wait4``; this process imports nothing heavy, since a child's peak starts from its parent's at the fork)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        child = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if child.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed ({child.returncode}): {err.read().strip()[-500:]}")
        return json.loads(out.read()), usage.ru_maxrss / 1024


def quantize(folder: Path, recipe: str, out: Path, stream: bool) -> tuple[dict, float]:
    return run_measured([sys.executable, "-m", "lowbit", "quantize", str(folder), "--recipe", recipe, "--out",
                         str(out), "--windows", "0", "--force", "--json", "--stream" if stream else "--no-stream"])


def digests(folder: Path) -> dict[str, str]:
    out = {}
    for p in sorted(folder.iterdir()):
        if p.name == "lowbit.json":
            manifest = {k: v for k, v in json.loads(p.read_text()).items() if k not in TIMING}
            out[p.name + " (less its wall time)"] = hashlib.sha256(json.dumps(manifest).encode()).hexdigest()
        else:
            out[p.name] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipes", nargs="+", default=["rtn-w4g128", "gptq-w4g128"])
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "lowbit-streaming")
    parser.add_argument("--make-folder", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.make_folder:
        return make_folder(args.work)
    folder = hf_folder(args.work)
    rows = {}
    for recipe in args.recipes:
        runs, sums = {}, {}
        for stream in (False, True):
            out = args.work / f"{recipe}-{'streamed' if stream else 'in-memory'}"
            result, peak = quantize(folder, recipe, out, stream)
            runs["streamed" if stream else "in_memory"] = {
                "quantize_seconds": round(result["quantize_seconds"], 1), "process_peak_rss_mb": round(peak),
                "streamed": result["streamed"]}
            sums[stream] = digests(out)
        differ = sorted(k for k in sums[True].keys() | sums[False].keys() if sums[True].get(k) != sums[False].get(k))
        rows[recipe] = {"identical": not differ, "differ": differ, "files": sorted(sums[True]), **runs}
    print(json.dumps({"model": "smollm2-135m (fp16 safetensors)", "calibration": "16 x 2048 WikiText-2 valid",
                      "recipes": rows}, indent=1))


if __name__ == "__main__":
    main()
