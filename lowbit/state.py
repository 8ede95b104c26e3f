"""The one object lowbit keeps on a model beside its modules: where it came from, the recipe applied, the
rotation, the manifest it was loaded with, and per-step records (RILQ's loss curve, LoftQ's errors).

``state_of(model)`` returns it, creating an empty one the first time; :func:`lowbit.save` writes it to the
manifest and :func:`lowbit.load` fills it. It lives in ``model.__dict__["lowbit_state"]``, so ``copy.deepcopy``
carries it and ``state_dict`` never sees it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

ATTRIBUTE = "lowbit_state"


@dataclass
class ModelState:
    source: str | None = None  # the model source it was loaded from (built-in name, folder, .gguf)
    recipe: Any = None  # the lowbit.Recipe applied (None: a float model)
    quantize_seconds: float | None = None  # wall time of the recipe
    rotation: dict | None = None  # the rotate step's record (outlier width, rotation kind, seed)
    # the rotate step's map of the float model's final states (after the last norm) into the rotated basis:
    # (gain (d,), M (d, d + r)) fp64, state -> (state / gain) @ M; in memory only (RILQ's cached teacher uses it)
    residual_map: tuple | None = None
    float_dtype: str | None = None  # dtype the source stores its unquantized tensors in ("bfloat16"; None: as held)
    manifest: dict | None = None  # the manifest of the checkpoint it was loaded from
    history: dict[str, Any] = field(default_factory=dict)  # per-step records: "rilq", "loftq"


def state_of(model: nn.Module) -> ModelState:
    """The model's :class:`ModelState` (an empty one, attached, when it has none yet)."""
    found = model.__dict__.get(ATTRIBUTE)
    if found is None:
        found = model.__dict__[ATTRIBUTE] = ModelState()
    return found
