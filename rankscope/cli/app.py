"""Terminal I/O for the commands: one-line errors and warnings on stderr, outputs written all-or-nothing."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable

import click

from ..core.errors import RankscopeError, UsageProblem, one_line

EXIT_INPUT = 1
EXIT_USAGE = 2

# The library's argument names whose flag is not ``--`` + the name with dashes (repeatable options are singular;
# positional arguments are written as click's usage line writes them).
FLAGS = {
    "thresholds": "--threshold",
    "energies": "--energy",
    "rel_thresholds": "--rel-threshold",
    "from_list": "--from",
    "out_dir": "--output",
    "inputs": "INPUTS",
    "paths": "PATHS",
}


def flag(argument: str) -> str:
    """The command-line spelling of a library argument: ``max_memory`` → ``--max-memory``."""
    return FLAGS.get(argument, "--" + argument.replace("_", "-"))


def error(message: str) -> None:
    click.echo(f"rankscope: error: {one_line(message)}", err=True)


def warn(message: str) -> None:
    click.echo(f"rankscope: warning: {one_line(message, 600)}", err=True)


def note(message: str) -> None:
    click.echo(f"rankscope: {one_line(message, 600)}", err=True)


def handle_errors(command: Callable) -> Callable:
    """Run a command under :func:`~rankscope.core.threads.single_threaded` (the CLI owns its process: see
    ``core.threads`` for why one thread per op is faster); turn rankscope's errors (and anything unexpected) into
    one line on stderr, with the library's argument names written as flags, and exit code 1 (2 for usage)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        from . import interrupt

        try:
            from ..core.threads import single_threaded

            with single_threaded():
                result = command(*args, **kwargs)
            interrupt.check()  # a Ctrl-C that a finaliser swallowed, in a command that wrote nothing
            return result
        except UsageProblem as exc:
            interrupt.exit_if_pending()  # an error the Ctrl-C itself caused: an interrupt
            error(exc.spelled(flag))
            sys.exit(EXIT_USAGE)
        except RankscopeError as exc:
            interrupt.exit_if_pending()  # an error the Ctrl-C itself caused: an interrupt
            error(exc.spelled(flag))
        except KeyboardInterrupt:
            interrupt.report_interrupt()
            sys.exit(130)
        except (click.exceptions.Exit, click.ClickException, SystemExit):
            interrupt.exit_if_pending()  # an error the Ctrl-C itself caused: an interrupt
            raise
        except Exception as exc:
            interrupt.exit_if_pending()  # an error the Ctrl-C itself caused: an interrupt
            if os.environ.get("RANKSCOPE_DEBUG"):
                raise
            error(f"internal error: {type(exc).__name__}: {exc} (set RANKSCOPE_DEBUG=1 for the traceback)")
        sys.exit(EXIT_INPUT)

    return wrapper


def output_width(*, err: bool = False) -> int | None:
    """The width terminal tables must fit: ``$COLUMNS``, else the terminal's; None (no limit) when the output is
    not a terminal (a file or a pipe)."""
    import shutil

    stream = sys.stderr if err else sys.stdout
    if os.environ.get("COLUMNS", "").isdigit() or stream.isatty():
        return shutil.get_terminal_size().columns
    return None


def write_outputs(rendered: list[tuple[str, Callable[[], str]]]) -> None:
    """Render every requested output first, then write them: an error leaves no file half-written (and a Ctrl-C
    before the writing starts, none written)."""
    from ..report.output import write_text
    from .interrupt import commit

    texts = [(destination, render()) for destination, render in rendered if destination]
    commit()
    for destination, text in texts:
        try:
            write_text(destination, text)
        except OSError as exc:
            raise RankscopeError(f"{destination}: cannot write ({exc.strerror or exc})") from exc


def distinct_outputs(**destinations: str | None) -> None:
    """Refuse two outputs sent to one place (``--json - --csv -``, or one file twice): one would be lost."""
    seen: dict[str, str] = {}
    for option, destination in destinations.items():
        if not destination:
            continue
        where = destination if destination == "-" else os.path.realpath(destination)
        if where in seen:
            place = "stdout" if destination == "-" else destination
            raise UsageProblem(f"--{seen[where]} and --{option} both write to {place}: give each its own destination")
        seen[where] = option
