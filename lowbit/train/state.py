"""The resumable training state, stored without pickle: every tensor in ``tensors.safetensors``, everything else
in ``state.json``, written together as one folder that replaces the previous one atomically
(:func:`lowbit.fileio.staged_folder`). Loading it can run no code: a crafted state folder is at worst refused.

Nested values (the optimizer's and scheduler's state dicts) are encoded generically: a tensor becomes
``{"__tensor__": key}``, a dict with non-string keys (the optimizer's per-parameter state) ``{"__items__": [[k, v],
...]}``; tuples come back as lists, which every torch optimizer and scheduler accepts.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import LowbitError
from ..fileio import staged_folder

TENSORS, JSON = "tensors.safetensors", "state.json"
STATE_FORMAT = 1


def _encode(value, tensors: dict[str, torch.Tensor], path: str):
    if isinstance(value, torch.Tensor):
        tensors[path] = value.detach().cpu().clone().contiguous()
        return {"__tensor__": path}
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value):
            return {k: _encode(v, tensors, f"{path}.{k}") for k, v in value.items()}
        return {"__items__": [[k, _encode(v, tensors, f"{path}.{k}")] for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        return [_encode(v, tensors, f"{path}.{i}") for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"training state value at {path} has type {type(value).__name__}, which the state cannot store")


def _decode(value, tensors: dict[str, torch.Tensor]):
    if isinstance(value, dict):
        if set(value) == {"__tensor__"}:
            return tensors[value["__tensor__"]]
        if set(value) == {"__items__"}:
            return {k: _decode(v, tensors) for k, v in value["__items__"]}
        return {k: _decode(v, tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    return value


def save_state(state_dir: Path, state: dict) -> None:
    """Write ``state`` (JSON-able values, tensors and nested state dicts) as the folder ``state_dir``, replacing
    the previous state atomically."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    encoded = _encode(state, tensors, "state")
    with staged_folder(Path(state_dir), force=True) as tmp:
        save_file(tensors, tmp / TENSORS)
        (tmp / JSON).write_text(json.dumps({"format": STATE_FORMAT, "state": encoded}), encoding="utf-8")


def load_state(state_dir: Path) -> dict:
    """The state :func:`save_state` wrote; a missing, damaged or foreign folder is a :class:`LowbitError`."""
    from safetensors.torch import load_file

    state_dir = Path(state_dir)
    if not (state_dir / JSON).is_file() or not (state_dir / TENSORS).is_file():
        raise LowbitError(f"nothing to resume: {state_dir} holds no training state ({JSON} and {TENSORS}); a run "
                          "writes it every --checkpoint-every steps")
    try:
        meta = json.loads((state_dir / JSON).read_text(encoding="utf-8"))
        tensors = load_file(state_dir / TENSORS)
    except Exception as e:  # JSON, UTF-8 and safetensors header errors alike
        raise LowbitError(f"the training state in {state_dir} is damaged ({e}); start a new run without --resume") \
            from e
    if not isinstance(meta, dict) or meta.get("format") != STATE_FORMAT:
        raise LowbitError(f"{state_dir / JSON} is not a training state this lowbit reads (format "
                          f"{meta.get('format') if isinstance(meta, dict) else None!r}); start a new run")
    try:
        return _decode(meta["state"], tensors)
    except KeyError as e:
        raise LowbitError(f"the training state in {state_dir} is damaged (no tensor {e}); start a new run") from e
