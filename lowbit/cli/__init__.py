"""``lowbit`` command line: thin calls into the Python API.

Every command that reports figures takes ``--json`` and then prints exactly one JSON object on stdout;
progress bars and logs go to stderr. Bad input exits with status 2 and one line naming the problem and the fix.
Commands live in :mod:`.commands` (models and checkpoints) and :mod:`.training` (adapters); both register on the
one :data:`app` of :mod:`.common`.
"""

from __future__ import annotations

from . import commands, training  # noqa: F401  (registers the commands)
from .common import app, err_console, out_console

__all__ = ["app", "err_console", "main", "out_console"]


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
