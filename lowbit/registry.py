"""Name -> class registries, one per kind of pluggable piece (quantizer, format, ...).

A paper's method is one module plus one ``@register(kind, name)`` line. Lookups of unknown names raise a
:class:`~lowbit.errors.LowbitError` that lists the known names and suggests the closest one.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import TypeVar

from .errors import LowbitError

T = TypeVar("T")
_REGISTRY: dict[str, dict[str, object]] = {}


def register(kind: str, name: str) -> Callable[[T], T]:
    """Class decorator: make ``obj`` findable as ``get(kind, name)``."""

    def wrap(obj: T) -> T:
        table = _REGISTRY.setdefault(kind, {})
        if name in table and table[name] is not obj:
            raise RuntimeError(f"{kind} {name!r} is registered twice")
        table[name] = obj
        return obj

    return wrap


def known(kind: str) -> list[str]:
    """Sorted names registered under ``kind``."""
    return sorted(_REGISTRY.get(kind, {}))


def unknown_name_error(kind: str, name: str, names: list[str]) -> LowbitError:
    """The error for a name that is not in ``names``: lists them and suggests the closest."""
    close = difflib.get_close_matches(name, names, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return LowbitError(f"unknown {kind} {name!r}.{hint} Known {kind}s: {', '.join(names) or '(none)'}.")


def get(kind: str, name: str):
    """The object registered as ``name`` under ``kind``; a clear error listing known names otherwise."""
    table = _REGISTRY.get(kind, {})
    if name not in table:
        raise unknown_name_error(kind, name, sorted(table))
    return table[name]
