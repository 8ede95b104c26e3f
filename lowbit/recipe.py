"""Recipes: an ordered list of registered steps, each with a typed, versioned, frozen dataclass config.

Build one in Python (``Recipe([RTNConfig(bits=4, group_size=128)])``), from YAML (``Recipe.from_yaml``) or by
preset name (``Recipe.from_name("rtn-w4g128")``). Every config round-trips through ``to_dict``/``from_dict``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import yaml

from .errors import LowbitError
from .registry import get, unknown_name_error


@dataclass(frozen=True)
class StepConfig:
    """Base of every step config. Subclasses set ``step`` (registry name) and may bump ``version``."""

    step: ClassVar[str] = ""
    version: ClassVar[int] = 1

    def __post_init__(self):
        # YAML gives lists where configs hold tuples; normalise so configs stay hashable and comparable.
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):
                object.__setattr__(self, f.name, tuple(value))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"step": self.step, "version": self.version}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def describe(self) -> str:
        """One line for people: the step and the fields that differ from their defaults."""
        changed = [f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self)
                   if f.default is not dataclasses.MISSING and getattr(self, f.name) != f.default]
        return f"{self.step}({', '.join(changed)})"

    @staticmethod
    def from_dict(data: dict[str, Any], kind: str = "step") -> StepConfig:
        """Rebuild a config from :meth:`to_dict` output; errors name the unknown step, field or version.
        ``kind`` is the registry the ``step`` name is looked up in (``step``, or ``adapter`` for adapters)."""
        if not isinstance(data, dict) or "step" not in data:
            raise LowbitError(f"a recipe step must be a mapping with a 'step' key, got {data!r}")
        data = dict(data)
        cls = get(kind, data.pop("step")).Config
        version = data.pop("version", cls.version)
        if version != cls.version:
            raise LowbitError(f"step {cls.step!r} config version {version} is not supported (this lowbit "
                              f"reads version {cls.version}); upgrade lowbit or re-create the recipe")
        names = {f.name for f in dataclasses.fields(cls)}
        extra = sorted(set(data) - names)
        if extra:
            raise LowbitError(f"step {cls.step!r} has no field(s) {extra}; its fields are {sorted(names)}")
        return cls(**data)


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
            raise LowbitError(f"recipe is not valid YAML: {e}") from e
        return cls.from_dict(data)

    @classmethod
    def from_name(cls, name: str) -> Recipe:
        """A named preset (``rtn-w4g128``, ``nf4-g64``, ...) or presets joined by ``+`` (``rtn-w2g64+emb8``: their
        steps in that order); unknown names list the known ones."""
        from .presets import PRESETS

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
            recipe = cls.from_yaml(path.read_text())
            if recipe.name == "custom":
                recipe.name = path.stem
            return recipe
        return cls.from_name(str(spec))

