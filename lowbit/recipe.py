"""Recipes: an ordered list of registered steps, each with a typed, versioned, frozen dataclass config.

Build one in Python (``Recipe([RTNConfig(bits=4, group_size=128)])``), from YAML (``Recipe.from_yaml``) or by
preset name (``Recipe.from_name("rtn-w4g128")``). Every config round-trips through ``to_dict``/``from_dict``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .architectures import check_family, expert_lists, unfuse_experts
from .config import StepConfig
from .errors import LowbitError
from .fileio import read_text
from .models import round_to_storage
from .nn import use_cpu_attention, use_gemv_head
from .presets import PRESETS
from .registry import get, unknown_name_error
from .state import state_of

log = logging.getLogger(__name__)


@dataclass
class Recipe:
    """An ordered list of step configs, applied in order by :func:`lowbit.quantize`."""

    steps: list[StepConfig]
    name: str = "custom"

    def __post_init__(self):
        if not self.steps:
            raise LowbitError("a recipe needs at least one step")
        for s in self.steps:
            if not isinstance(s, StepConfig):
                raise LowbitError(f"recipe steps must be step configs (e.g. lowbit.RTNConfig()), got {s!r}")
        if not isinstance(self.name, str) or not self.name.strip():
            raise LowbitError(f"a recipe's name must be a non-empty string, got {self.name!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "steps": [s.to_dict() for s in self.steps]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Recipe:
        if not isinstance(data, dict) or not isinstance(data.get("steps"), list):
            raise LowbitError("a recipe must be a mapping with a 'steps' list")
        return cls([StepConfig.from_dict(s) for s in data["steps"]], name=data.get("name", "custom"))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> Recipe:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise LowbitError(f"recipe is not valid YAML: {' '.join(str(e).split())}") from e
        return cls.from_dict(data)

    @classmethod
    def from_name(cls, name: str) -> Recipe:
        """A named preset (``rtn-w4g128``, ``nf4-g64``, ...) or presets joined by ``+`` (``rtn-w2g64+emb8``: their
        steps in that order); unknown names list the known ones."""
        parts = name.split("+")
        for part in parts:
            if part not in PRESETS:
                raise unknown_name_error("preset", part, sorted(PRESETS))
        return cls([step for part in parts for step in PRESETS[part]], name=name)

    @classmethod
    def parse(cls, spec: str | Path | Recipe) -> Recipe:
        """A Recipe from a preset name, a path to a YAML file, or a Recipe (returned as is)."""
        if isinstance(spec, Recipe):
            return spec
        path = Path(spec)
        if path.suffix in (".yaml", ".yml"):
            if not path.is_file():
                raise LowbitError(f"recipe file {path} does not exist")
            recipe = cls.from_yaml(read_text(path, "recipe file"))
            if recipe.name == "custom":
                recipe.name = path.stem
            return recipe
        return cls.from_name(str(spec))


def apply_recipe(model, recipe: Recipe | str | Path, calib=None):
    """Apply every step of ``recipe`` (a :class:`Recipe`, a preset name or a YAML path) to ``model`` in place, in
    memory (``lowbit.quantize``). ``calib`` is a :class:`lowbit.Calibration` (or token windows) for the steps that
    read data.

    Returns the model; its :func:`~lowbit.state.state_of` records the recipe and the wall time, so
    :func:`lowbit.save` writes both to the manifest.
    """
    recipe = Recipe.parse(recipe)
    start = time.perf_counter()
    steps = [get("step", config.step)(config) for config in recipe.steps]
    model_type = getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__
    arch = check_family(model_type, steps)  # refused before any step changes it, if a step needs the table
    if arch is not None and unfuse_experts(model):  # MoE: one Linear per expert: every step packs and adapts each
        log.info("%d experts held as Linears (the router stays float)", sum(map(len, expert_lists(model).values())))
    for step in steps:  # e.g. RILQ caches the float model's outputs before any step quantizes it
        step.prepare(model, calib)
    for step in steps:
        model = step.apply(model, calib)
    round_to_storage(model)  # the float parts as the checkpoint stores them (the source's dtype)
    use_gemv_head(model)  # decode reads a float head through lowbit's fp32 GEMV (same parameters)
    use_cpu_attention(model)  # whole causal sequences through lowbit's CPU attention kernel (lowbit.nn.attention)
    state_of(model).recipe = recipe
    state_of(model).quantize_seconds = time.perf_counter() - start
    return model
