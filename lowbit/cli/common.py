"""What every command shares: the Typer app, the two consoles, errors, output and option parsing."""

from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from typer.core import TyperGroup

from ..errors import LowbitError
from ..fileio import json_text, os_error_line
from ..protocol import EVAL_SEQ_LEN

invoked_args: list[str] = []  # the arguments of the running command (after the program name): relaunch repeats them


class OneLineUsageErrors(TyperGroup):
    """The command group whose usage errors (an unknown option, a missing one, a value of the wrong type) print as
    one ``error:`` line naming the command's ``--help``, exit 2, like every other error; help is shown as usual."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        invoked_args[:] = sys.argv[1:] if args is None else [str(a) for a in args]
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except typer.TyperException as e:  # typer vendors click: its usage errors are TyperExceptions
            if type(e).__name__ == "NoArgsIsHelpError":  # a bare `lowbit`: the help, as click would show it
                e.show()
                sys.exit(e.exit_code)
            ctx = getattr(e, "ctx", None)
            hint = f"; see {ctx.command_path} --help" if ctx is not None else ""
            err_console.print(f"[bold red]error:[/] {escape(e.format_message())}{escape(hint)}", highlight=False)
            sys.exit(getattr(e, "exit_code", 2))
        except typer.Abort:
            err_console.print("[bold red]error:[/] aborted", highlight=False)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(cls=OneLineUsageErrors, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Quantize Hugging Face causal LMs to 1-8 bits, evaluate, save, load and generate.")
out_console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)

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
        sys.stdout.write(json_text(payload, default=str) + "\n")
        sys.stdout.flush()
        return
    table = Table(title=escape(title), show_header=False)
    for key, value in payload.items():
        if isinstance(value, float):
            value = f"{value:,.4f}" if abs(value) < 1e6 else f"{value:,.0f}"
        table.add_row(key, escape(str(value)))
    out_console.print(table)


WINDOWS_HELP = f"WikiText-2 test windows of {EVAL_SEQ_LEN} tokens to evaluate: N (the first N), all, or 0 (skip)."
JSON_OPTION = typer.Option(False, "--json", help="Print one JSON object on stdout.")
VERBOSE_OPTION = typer.Option(False, "-v", "--verbose", help="Log progress to stderr.")
FORCE_OPTION = typer.Option(False, "--force", help="Replace the output folder if it exists.")
OUT_OPTION = typer.Option(..., help="Output folder (must not exist unless --force).")
DATA_OPTION = typer.Option(None, "--data", help="Data folder holding wikitext-2-raw/ and tasks/ (default: "
                           "$LOWBIT_DATA, then ../shared/data, then the Hugging Face datasets cache).")
MODEL_HELP = "Built-in name (smollm2-135m), Hub id (owner/name), Hugging Face model folder, .gguf file or lowbit " \
    "checkpoint."


def parse_windows(text: str, flag: str = "--windows") -> int | None:
    """``all`` -> None (every window), a whole number -> itself (0 = skip); the range is the API's to check."""
    if text.strip().lower() == "all":
        return None
    try:
        return int(text)
    except ValueError:
        raise LowbitError(f"{flag} must be 'all' or a whole number (0 skips the evaluation), got {text!r}") from None


def model_source(argument: str | None, option: str | None, default: str | None = None) -> str:
    """The model source, given as the first argument (every command) or, for old scripts, ``--model``."""
    if argument and option and argument != option:
        raise LowbitError(f"two model sources given ({argument!r} and --model {option!r}); pass one")
    source = argument or option or default
    if not source:
        raise LowbitError("no model given: pass a model source as the first argument")
    return source


@contextlib.contextmanager
def one_line_errors():
    """Every :class:`LowbitError` inside, and every refusal of the file system (``OSError``), becomes one line on
    stderr and exit status 2 (no traceback)."""
    try:
        yield
    except LowbitError as e:
        fail(str(e))
    except OSError as e:  # the file system said no: disk full, read-only, permissions, a path that vanished
        fail(os_error_line(e))


def run_job(verbose: bool, job, data: Path | None = None):
    """What every command does around its API call: set up logging, use the ``--data`` folder (if given), then
    ``job()`` with every :class:`LowbitError` as one line on stderr and exit status 2. Returns the job's result."""
    from ..data import use_data_dir

    setup_logging(verbose)
    with one_line_errors():
        use_data_dir(data)
        return job()


def relaunch(count: int, flag: str = "--processes") -> None:
    """Run this very command again as ``count`` processes under ``accelerate launch`` (``flag`` and its value
    dropped), each with ``cores // count`` threads unless ``OMP_NUM_THREADS`` is set, and exit with its status.
    Only the main process prints the result."""
    import os
    import socket
    import subprocess

    argv, args = [], iter(invoked_args)
    for arg in args:
        if arg == flag:
            next(args, None)  # its value
        elif not arg.startswith(flag + "="):
            argv.append(arg)
    with socket.socket() as s:  # a free port for the process group's rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // count)))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(count),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
               str(port), "-m", "lowbit", *argv]
    raise typer.Exit(subprocess.call(command, env=env))


def print_out(*args, **kwargs) -> None:
    """Print on stdout through ``out_console`` as it is at call time (tests replace it)."""
    out_console.print(*args, **kwargs)
