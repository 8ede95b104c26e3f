"""The base of every typed step config: frozen, versioned, round-tripping through ``to_dict``/``from_dict``.

Quantizers, transforms, compensation steps and adapters subclass :class:`StepConfig`; a :class:`~lowbit.recipe.Recipe`
is an ordered list of them. Lookups go through :mod:`lowbit.registry`, so this module knows no step by name.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from .errors import LowbitError
from .registry import get


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
