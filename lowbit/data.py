"""Locating and reading the evaluation/calibration text (WikiText-2 raw, shipped in ``shared/data``)."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import LowbitError

DATA_ENV = "LOWBIT_DATA"


def data_dir() -> Path:
    """The data folder: ``$LOWBIT_DATA`` if set, else the first ``shared/data`` found beside or above the cwd
    or this package (the project layout puts it at ``../shared/data`` from the repository root)."""
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV])
    starts = [Path.cwd(), Path(__file__).resolve()]
    for start in starts:
        for parent in [start, *start.parents]:
            for cand in (parent / "shared" / "data", parent.parent / "shared" / "data"):
                if (cand / "wikitext-2-raw").is_dir():
                    return cand
    raise LowbitError(f"cannot find the data folder (shared/data with wikitext-2-raw/); set {DATA_ENV}=/path/to/data")


def wikitext2_path(split: str = "test") -> Path:
    if split not in ("test", "valid"):
        raise LowbitError(f"WikiText-2 split must be 'test' or 'valid' (train is not available), got {split!r}")
    path = data_dir() / "wikitext-2-raw" / f"wiki.{split}.raw"
    if not path.is_file():
        raise LowbitError(f"{path} is missing; set {DATA_ENV} to a folder holding wikitext-2-raw/")
    return path


def wikitext2_rows(split: str = "test") -> list[str]:
    """The split as the usual dataset rows: each line keeps its trailing newline, blank lines become ""."""
    path = wikitext2_path(split)
    try:
        with open(path, encoding="utf-8", newline="") as f:
            return ["" if line.strip() == "" else line for line in f]
    except UnicodeDecodeError as e:
        raise LowbitError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); restore the WikiText-2 raw "
                          f"files in {path.parent}") from e


def wikitext2_text(split: str = "test") -> str:
    """Rows joined with "\\n\\n": the GPTQ-line perplexity text."""
    return "\n\n".join(wikitext2_rows(split))
