"""The base of every typed step config: frozen, versioned, round-tripping through ``to_dict``/``from_dict``.

Quantizers, transforms, compensation steps and adapters subclass :class:`StepConfig`; a :class:`~lowbit.recipe.Recipe`
is an ordered list of them. Lookups go through :mod:`lowbit.registry`, so this module knows no step by name.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any, ClassVar

from .errors import LowbitError
from .registry import get


def _matches(value, hint) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if hint is dict or origin is dict:
        return isinstance(value, dict)
    if origin in (types.UnionType, typing.Union):
        return any(_matches(value, a) for a in args)
    if origin is tuple:
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:  # tuple[X, ...]
            return all(_matches(v, args[0]) for v in value)
        return all(_matches(v, t) for v, t in zip(value, args, strict=False))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return not isinstance(hint, type) or isinstance(value, hint)


def _describe(hint) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        return " or ".join(_describe(a) for a in args)
    if origin is tuple:
        return f"a list of {_describe(args[0]).removeprefix('a ').removeprefix('an ')}s"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "a mapping",
            type(None): "null"}.get(hint, getattr(hint, "__name__", str(hint)))


def check_types(config) -> None:
    """Refuse a field whose value has another type than its annotation says (a recipe from YAML can hold
    anything): one line naming the step, the field, what it must be and what it got."""
    try:
        hints = typing.get_type_hints(type(config))
    except (NameError, TypeError):  # an annotation this Python cannot resolve: leave the checks to the step
        return
    for f in dataclasses.fields(config):
        value, hint = getattr(config, f.name), hints.get(f.name, Any)
        if not _matches(value, hint):
            raise LowbitError(f"{getattr(config, 'step', '') or type(config).__name__}: {f.name} must be "
                              f"{_describe(hint)}, got {value!r}")


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
        check_types(self)

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
