"""The checkpoint manifest (``lowbit.json``) and the checks every loader runs before it reads a tensor.

The manifest records, besides the recipe and per-layer layouts, every file of the checkpoint folder with its size
and SHA-256, and its own checksum (``manifest_sha256``, over the rest of the manifest). What loading checks, on
both loading paths (:func:`lowbit.load` and ``AutoModelForCausalLM.from_pretrained``): the manifest's checksum (an
edited manifest is refused) and the types of the fields loaders read; its file list (every entry a plain file
inside the folder: loading never reads or reports on anything outside it); every listed file's size; the SHA-256
of every file (``LOWBIT_VERIFY=sizes`` or ``verify=False`` skips only the tensor shards', for very large models,
and says so); and the shards' safetensors headers against the index. Small files (config, index, tokenizer) are
always hashed, so a changed config is always caught.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from .errors import CheckpointError, LowbitError
from .fileio import sha256
from .formats import LAYOUT

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "lowbit.json"
PACKED_SHARD = "model-00001-of-00002.safetensors"
FLOAT_SHARD = "model-00002-of-00002.safetensors"
INDEX = "model.safetensors.index.json"


def manifest_digest(manifest: dict) -> str:
    """SHA-256 of the manifest without its ``manifest_sha256`` field (canonical JSON: sorted keys, no spaces)."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()


# Manifest fields the loaders read, with the JSON type each must have (None allowed where a save writes None).
_FIELD_TYPES = {"layers": (dict,), "embeddings": (dict,), "adapters": (dict,), "aliases": (dict,),
                "rotation": (dict, type(None)), "recipe": (dict, type(None)), "summary": (dict,),
                "source": (str, type(None)), "versions": (dict,), "extra": (dict,), "experts": (dict,),
                "expert_tokens": (dict, type(None)), "float_dtype": (str, type(None))}


def read_manifest(path: str | Path) -> dict:
    """The manifest of checkpoint ``path``, checked: readable JSON, this lowbit's format and packing layout, its
    own checksum (so an edited manifest is refused) and the type of every field the loaders read. Errors name
    the file and say what to do."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint folder {path} does not exist")
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise CheckpointError(f"{mpath} is missing: {path} is not a lowbit checkpoint (make one with lowbit quantize)")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{mpath} is not valid JSON ({e}); the checkpoint is damaged, re-create it") from e
    except OSError as e:
        raise CheckpointError(f"{mpath} cannot be read ({e.strerror})") from e
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{mpath} is not a JSON object; the checkpoint is damaged, re-create it")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{mpath} has format_version {version!r}; this lowbit reads version {FORMAT_VERSION}. "
                              "Upgrade lowbit or re-create the checkpoint.")
    if manifest.get("packing_layout") != LAYOUT:
        raise CheckpointError(f"{mpath} uses packing layout {manifest.get('packing_layout')!r}; this lowbit "
                              f"reads {LAYOUT!r}")
    if "manifest_sha256" not in manifest:
        raise CheckpointError(f"{mpath} has no checksum (manifest_sha256), so an edit could not be noticed; "
                              "re-save the checkpoint with this lowbit")
    if manifest["manifest_sha256"] != manifest_digest(manifest):
        raise CheckpointError(f"{mpath} was changed after it was saved (its checksum does not match); the "
                              "checkpoint is damaged or tampered with: re-create it")
    for name, types in _FIELD_TYPES.items():
        if name in manifest and not isinstance(manifest[name], types):
            raise CheckpointError(f"{mpath} field {name!r} is a {type(manifest[name]).__name__}; the manifest is "
                                  "damaged or crafted: do not use this checkpoint")
    for name in ("experts", "expert_tokens"):  # {name: count}
        if any(type(v) is not int or v < 0 for v in (manifest.get(name) or {}).values()):
            raise CheckpointError(f"{mpath} field {name!r} holds something other than counts; the manifest is "
                                  "damaged or crafted: do not use this checkpoint")
    entries = {**manifest.get("layers", {}), **manifest.get("embeddings", {})}
    if not all(isinstance(e, dict) for e in entries.values()) or \
            not all(isinstance(k, str) and isinstance(v, str) for k, v in manifest.get("aliases", {}).items()):
        raise CheckpointError(f"{mpath} has layer or alias entries of the wrong type; the manifest is damaged or "
                              "crafted: do not use this checkpoint")
    return manifest


def listed_files(path: Path, manifest: dict) -> dict[str, dict]:
    """The manifest's ``files`` table, refused unless it is there, covers the tensor shards and names only plain
    files inside ``path`` (no ``..``, no absolute path, no sub-folder, no link out): loading never reads or reports
    on anything outside the checkpoint folder."""
    files = manifest.get("files")
    if not isinstance(files, dict) or not {PACKED_SHARD, FLOAT_SHARD, INDEX, "config.json"} <= set(files):
        raise CheckpointError(f"{path / MANIFEST} has no list of the checkpoint's files (or it misses a tensor "
                              "shard, the index or config.json), so nothing could be verified; re-save the checkpoint")
    root = Path(path).resolve()
    for name, info in files.items():
        inside = (root / name).resolve()
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", "..") or inside.parent != root:
            raise CheckpointError(f"{path / MANIFEST} lists {name!r}, which is not a file of the checkpoint folder; "
                                  "the manifest is damaged or crafted: do not use this checkpoint")
        if not isinstance(info, dict) or not isinstance(info.get("bytes"), int) or \
                not isinstance(info.get("sha256"), str):
            raise CheckpointError(f"{path / MANIFEST} has no size and SHA-256 for {name!r}; re-save the checkpoint")
    return files


def hashes_by_default() -> bool:
    """Whether loaders check the tensor shards' SHA-256: yes unless ``LOWBIT_VERIFY=sizes`` (for models so large
    that hashing them takes minutes)."""
    value = os.environ.get("LOWBIT_VERIFY", "hashes").strip().lower()
    if value not in ("hashes", "sizes"):
        raise LowbitError(f"LOWBIT_VERIFY must be 'hashes' (the default) or 'sizes', got {value!r}")
    return value == "hashes"


SHARDS = (PACKED_SHARD, FLOAT_SHARD)
ESSENTIAL = (*SHARDS, INDEX, "config.json")  # what any loader reads; the rest (tokenizer files, ...) is optional


def verify_files(path: Path, manifest: dict, hashes: bool = True, essential_only: bool = False) -> None:
    """Check the checkpoint's files against the manifest before anything is read: the list itself
    (:func:`listed_files`), each file present with its recorded size (else truncated or replaced), its SHA-256
    (else modified; with ``hashes=False`` only the small files', not the tensor shards'), and the shards'
    safetensors headers against the index (so an extra or missing tensor is caught even without hashes).
    ``essential_only``: files outside :data:`ESSENTIAL` may be absent (a Hub download fetches only what its
    loader asks for); those present are checked all the same."""
    files = listed_files(path, manifest)
    for name, info in files.items():
        fp = path / name
        if essential_only and name not in ESSENTIAL and not os.path.lexists(fp):
            continue
        if not fp.is_file() or fp.is_symlink():
            raise CheckpointError(f"{fp} is missing from the checkpoint; re-save it")
        size = fp.stat().st_size
        if size != info["bytes"]:
            raise CheckpointError(f"{fp} is {size} bytes but the manifest says {info['bytes']}: the file is "
                                  "truncated or was replaced; re-save the checkpoint")
        if (hashes or name not in SHARDS) and sha256(fp) != info["sha256"]:
            raise CheckpointError(f"{fp} does not match its SHA-256 in {MANIFEST}: the file was modified or "
                                  "corrupted; re-save the checkpoint")
    if not hashes:
        log.warning("%s: tensor shards not hashed (LOWBIT_VERIFY=sizes / verify=False): sizes, headers, config and "
                    "manifest are checked, but bytes changed inside a tensor would load unnoticed", path)
    _check_headers(path)


def _check_headers(path: Path) -> None:
    """Each shard's tensor names are exactly those the index assigns to it."""
    from safetensors import safe_open

    try:
        index = json.loads((path / INDEX).read_text(encoding="utf-8"))["weight_map"]
        expected = {shard: {k for k, v in index.items() if v == shard} for shard in SHARDS}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path / INDEX} is not a shard index ({e}); re-save the checkpoint") from e
    for shard in SHARDS:
        try:
            with safe_open(path / shard, "pt") as f:
                keys = set(f.keys())
        except Exception as e:  # safetensors raises its own error types for damaged headers
            raise CheckpointError(f"{path / shard} cannot be read as safetensors ({e}); re-save the checkpoint") \
                from e
        if keys != expected[shard]:
            extra, missing = sorted(keys - expected[shard])[:3], sorted(expected[shard] - keys)[:3]
            raise CheckpointError(f"{path / shard} holds other tensors than {INDEX} lists (extra {extra}, missing "
                                  f"{missing}); the checkpoint is damaged or tampered with: re-save it")


def manifest_recipe(path: Path, manifest: dict):
    """The :class:`~lowbit.recipe.Recipe` the manifest records (None if none); one the steps cannot read is a
    :class:`CheckpointError` naming the manifest."""
    from .recipe import Recipe

    if not manifest.get("recipe"):
        return None
    try:
        return Recipe.from_dict(manifest["recipe"])
    except (LowbitError, TypeError, ValueError, KeyError, AttributeError) as e:
        raise CheckpointError(f"{Path(path) / MANIFEST} records a recipe this lowbit cannot read ({e}); the manifest "
                              "is damaged, crafted or from a newer lowbit") from e
