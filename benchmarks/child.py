"""What the export benchmarks share: run one step in a fresh process and read the JSON line it prints last, and
print (and optionally write) the result object."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def parser(doc: str) -> argparse.ArgumentParser:
    """An argument parser described by ``doc``'s first line, with the options every export benchmark takes:
    ``--windows`` (perplexity windows, 16), ``--work`` (where files go) and ``--out`` (the result JSON)."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--work", type=Path)
    p.add_argument("--out", type=Path)
    return p


def work_dir(work: Path | None, prefix: str) -> Path:
    """``work`` (created), or a new temporary folder named ``prefix…``."""
    work = work or Path(tempfile.mkdtemp(prefix=prefix))
    work.mkdir(parents=True, exist_ok=True)
    return work


def run_json(cmd: list[str]) -> dict:
    """Run ``cmd``; its last stdout line parsed as JSON, plus ``seconds``. A failed step ends the benchmark,
    showing the end of its stderr."""
    start = time.perf_counter()
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"step failed ({r.returncode}): {' '.join(map(str, cmd))[:200]}\n{r.stderr[-3000:]}")
    lines = r.stdout.strip().splitlines()
    return {**(json.loads(lines[-1]) if lines else {}), "seconds": round(time.perf_counter() - start, 1)}


def emit(result: dict, out: Path | None) -> None:
    """Print ``result`` as one JSON object; also write it to ``out`` when given."""
    text = json.dumps(result, indent=1)
    print(text)
    if out:
        Path(out).write_text(text + "\n")
