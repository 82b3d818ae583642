"""The ``rankscope`` command: parse, call the library, render, map errors to exit codes.

One module per command (``spectrum.py``, ``components.py``, ``compare.py``, ``formats.py``); shared option groups in
``options.py``; terminal I/O helpers in ``app.py``. Heavy imports happen inside the commands.

Exit codes: 0 success (also with invalid layers, which are listed; ``--strict`` makes that 1), 1 the input
cannot be analysed (one line on stderr, never a traceback), 2 usage errors.
"""

from __future__ import annotations

import sys

import click

from .. import __version__
from ..core.errors import one_line
from .cache import cache
from .compare import compare
from .components import components
from .convert import convert
from .formats import list_formats
from .interrupt import interrupts, report_interrupt
from .plot import plot
from .report import report
from .spectrum import spectrum
from .suggest import suggest
from .sweep import sweep
from .trajectory import trajectory


class _Main(click.Group):
    """The command group, with click's usage errors as one line (what went wrong, and where help is) and exit 2."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):  # type: ignore[override]
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            with interrupts(process=args is None):  # args given: called in-process (click's test runner)
                code = super().main(args, prog_name, complete_var, False, **extra)
        except click.UsageError as exc:
            no_args = getattr(click.exceptions, "NoArgsIsHelpError", ())
            if isinstance(exc, no_args) and exc.ctx is not None:  # bare ``rankscope``: its help, as click shows it
                click.echo(exc.ctx.get_help(), err=True)
                sys.exit(exc.exit_code)
            command = exc.ctx.command_path if exc.ctx is not None else "rankscope"
            click.echo(f"rankscope: error: {one_line(exc.format_message())} (see '{command} --help')", err=True)
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except (click.Abort, KeyboardInterrupt):
            report_interrupt()
            sys.exit(130)
        sys.exit(code if isinstance(code, int) else 0)


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="rankscope")
def main() -> None:
    """How much rank does a low-rank adapter actually use, and where?"""


main.add_command(spectrum)
main.add_command(components)
main.add_command(compare)
main.add_command(list_formats)
main.add_command(report)
main.add_command(plot)
main.add_command(suggest)
main.add_command(convert)
main.add_command(cache)
main.add_command(sweep)
main.add_command(trajectory)

__all__ = ["main"]
