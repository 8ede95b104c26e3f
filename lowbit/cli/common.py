"""What every command shares: the Typer app, the two consoles, errors, output and option parsing."""

from __future__ import annotations

import dataclasses
import json
import logging
import sys

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..errors import LowbitError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Quantize Hugging Face causal LMs to 1-8 bits, evaluate, save, load and generate.")
out_console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)

WINDOWS_HELP = "WikiText-2 test windows of 2048 tokens to evaluate (the first N; 0 = all)."


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    import transformers

    transformers.logging.set_verbosity_error()


def fail(message: str) -> None:
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False)  # paths may hold [...]
    raise typer.Exit(code=2)


def emit(payload: dict, as_json: bool, title: str) -> None:
    """One JSON object on stdout, or a two-column table for people."""
    if as_json:
        sys.stdout.write(json.dumps(payload, default=str) + "\n")
        sys.stdout.flush()
        return
    table = Table(title=escape(title), show_header=False)
    for key, value in payload.items():
        if isinstance(value, float):
            value = f"{value:,.4f}" if abs(value) < 1e6 else f"{value:,.0f}"
        table.add_row(key, escape(str(value)))
    out_console.print(table)


def window_count(n: int) -> int | None:
    if n < 0:
        fail(f"--windows must be 0 (all) or a positive number, got {n}")
    return n or None


def recipe_with_overrides(recipe: str, fmt, bits, group_size, granularity, symmetric, budget=None):
    """The preset/YAML recipe, with single-step overrides from the command line applied to its first step."""
    from ..recipe import Recipe

    parsed = Recipe.parse(recipe)
    overrides = {k: v for k, v in dict(format=fmt, bits=bits, group_size=group_size, granularity=granularity,
                                       symmetric=symmetric, budget=budget).items() if v is not None}
    fields = {f.name for f in dataclasses.fields(parsed.steps[0])}
    for key in overrides:
        if key not in fields:
            flag = "--" + key.replace("_", "-")
            raise LowbitError(f"{flag} does not apply to step {parsed.steps[0].step!r} of recipe {parsed.name!r} "
                              f"(its fields: {', '.join(sorted(fields))})")
    if overrides:
        first = dataclasses.replace(parsed.steps[0], **overrides)
        parsed = Recipe([first, *parsed.steps[1:]], name=f"{parsed.name}+custom")
    return parsed
