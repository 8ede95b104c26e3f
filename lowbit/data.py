"""Finding the evaluation and calibration data where users have it: WikiText-2 raw and the zero-shot task sets.

Three places, in this order:

1. A folder the user names: ``--data DIR`` (:func:`use_data_dir`) or ``$LOWBIT_DATA``. Only that folder is read.
2. The project layout: the first ``shared/data`` beside or above the working directory or this package
   (``../shared/data`` from the repository root).
3. The Hugging Face datasets cache (``datasets.load_dataset``: ``Salesforce/wikitext`` ``wikitext-2-raw-v1``,
   ``ybisk/piqa``, ``allenai/ai2_arc`` ``ARC-Easy``, ``aps/super_glue`` ``boolq``). The cache is read offline
   first; ``datasets`` fetches a missing set where the network allows (``HF_HUB_OFFLINE=1`` forbids it).

A set found nowhere is one :class:`LowbitError` naming the three ways; jobs call :func:`check_data` before they
load a model.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import LowbitError
from .hub import hub_reachable

log = logging.getLogger(__name__)

DATA_ENV = "LOWBIT_DATA"
_chosen: Path | None = None  # --data DIR of the running command


@dataclass(frozen=True)
class DataSet:
    """One split of a data set: its file under a data folder and its Hugging Face dataset (repo, config, split)."""

    name: str  # what error messages call it
    relative: str  # path under a data folder
    repo: str
    config: str | None
    split: str


SETS = {
    "wikitext-test": DataSet("WikiText-2 test", "wikitext-2-raw/wiki.test.raw", "Salesforce/wikitext",
                             "wikitext-2-raw-v1", "test"),
    "wikitext-valid": DataSet("WikiText-2 valid", "wikitext-2-raw/wiki.valid.raw", "Salesforce/wikitext",
                              "wikitext-2-raw-v1", "validation"),
    "piqa": DataSet("PIQA validation", "tasks/piqa/valid.jsonl", "ybisk/piqa", None, "validation"),
    "arc_easy": DataSet("ARC-Easy test", "tasks/arc_easy/ARC-Easy-test.jsonl", "allenai/ai2_arc", "ARC-Easy",
                        "test"),
    "boolq": DataSet("BoolQ validation", "tasks/boolq/val.jsonl", "aps/super_glue", "boolq", "validation"),
}


def use_data_dir(path: str | Path | None) -> None:
    """Make ``path`` the data folder of this process (``--data``); None goes back to the search."""
    global _chosen
    _chosen = Path(path).expanduser() if path is not None else None
    if _chosen is not None and not _chosen.is_dir():
        raise LowbitError(f"--data {path} is not a folder; pass the folder holding wikitext-2-raw/ and tasks/")
    hub_rows.cache_clear()


def chosen_dir() -> Path | None:
    """The folder the user named (``--data`` or ``$LOWBIT_DATA``), if any."""
    if _chosen is not None:
        return _chosen
    return Path(os.environ[DATA_ENV]).expanduser() if os.environ.get(DATA_ENV) else None


def project_dir() -> Path | None:
    """The first ``shared/data`` (holding ``wikitext-2-raw/`` or ``tasks/``) beside or above the working
    directory or this package."""
    for start in (Path.cwd(), Path(__file__).resolve()):
        for parent in [start, *start.parents]:
            for cand in (parent / "shared" / "data", parent.parent / "shared" / "data"):
                if (cand / "wikitext-2-raw").is_dir() or (cand / "tasks").is_dir():
                    return cand
    return None


def data_dir() -> Path | None:
    """The data folder in use: the one the user named, else the project layout's (None: neither)."""
    return chosen_dir() or project_dir()


def missing(key: str, detail: str = "") -> LowbitError:
    """The one error for a data set found nowhere, naming the three ways to provide it."""
    s = SETS[key]
    where = f" ({detail})" if detail else ""
    return LowbitError(f"{s.name} data not found{where}: pass --data DIR or set {DATA_ENV}=DIR to a folder holding "
                       f"{s.relative}, or place the project's shared/data beside the repository, or let the Hugging "
                       f"Face datasets library fetch {s.repo}{' ' + s.config if s.config else ''} into its cache "
                       "(needs the network once)")


def local_path(key: str) -> Path | None:
    """The set's file in the data folder in use; a folder the user named that lacks it is an error."""
    chosen = chosen_dir()
    for folder in ([chosen] if chosen is not None else [project_dir()]):
        if folder is not None and (folder / SETS[key].relative).is_file():
            return folder / SETS[key].relative
    if chosen is not None:
        raise missing(key, f"{chosen / SETS[key].relative} does not exist")
    return None


@contextlib.contextmanager
def _offline():
    """``datasets`` and ``huggingface_hub`` in offline mode for the duration (they read it at import time)."""
    import datasets
    import huggingface_hub.constants as hub

    saved = datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = hub.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE = saved


@functools.cache
def hub_rows(key: str) -> tuple[dict, ...]:
    """The set's rows from the Hugging Face datasets cache (offline first; then fetched where the network
    allows and offline mode is not set), or the one missing-data error."""
    try:
        import datasets
    except ImportError as e:
        raise missing(key, "and the datasets package is not installed") from e
    s = SETS[key]
    online = not datasets.config.HF_HUB_OFFLINE and hub_reachable()
    attempts = [_offline, contextlib.nullcontext] if online else [_offline]
    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    for attempt in attempts:
        hub_log.setLevel(logging.ERROR)  # its retry warnings are not the user's problem; the error below is
        try:
            with attempt():
                ds = datasets.load_dataset(s.repo, s.config, split=s.split)
            log.info("%s from the Hugging Face datasets cache (%s)", s.name, s.repo)
            return tuple(ds)
        except Exception as e:  # noqa: BLE001 - datasets raises many types (connection, not found, ...)
            log.debug("%s not loaded by datasets (%s)", s.name, e)
        finally:
            hub_log.setLevel(level)
    raise missing(key, "" if online or datasets.config.HF_HUB_OFFLINE else "the Hugging Face Hub is not reachable")


def check_data(test: bool = False, valid: bool = False) -> None:
    """Before a model loads: raise the missing-data error of WikiText-2 ``test`` (evaluation) or ``valid``
    (calibration, training) when the job needs it and it is found nowhere."""
    for key, needed in (("wikitext-test", test), ("wikitext-valid", valid)):
        if needed and local_path(key) is None:
            hub_rows(key)


def wikitext2_path(split: str = "test") -> Path | None:
    """The WikiText-2 raw file of ``split`` in the data folder, or None when it comes from the datasets cache."""
    return local_path(_wikitext_key(split))


def _wikitext_key(split: str) -> str:
    if split not in ("test", "valid"):
        raise LowbitError(f"WikiText-2 split must be 'test' or 'valid' (train is not available), got {split!r}")
    return f"wikitext-{split}"


def wikitext2_rows(split: str = "test") -> list[str]:
    """The split as the usual dataset rows: each line keeps its trailing newline, blank lines become ""."""
    key = _wikitext_key(split)
    path = local_path(key)
    if path is None:
        return [row["text"] for row in hub_rows(key)]
    try:
        with open(path, encoding="utf-8", newline="") as f:
            return ["" if line.strip() == "" else line for line in f]
    except UnicodeDecodeError as e:
        raise LowbitError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); restore the WikiText-2 raw "
                          f"files in {path.parent}") from e


def wikitext2_text(split: str = "test") -> str:
    """Rows joined with "\\n\\n": the GPTQ-line perplexity text."""
    return "\n\n".join(wikitext2_rows(split))
