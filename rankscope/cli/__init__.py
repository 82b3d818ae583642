"""The ``rankscope`` command: parse, call the library, render, map errors to exit codes.

One module per command (``spectrum.py``, ``components.py``, ``compare.py``, ``formats.py``); shared option groups in
``options.py``; terminal I/O helpers in ``app.py``. Heavy imports happen inside the commands.

Exit codes: 0 success (also with invalid layers, which are listed; ``--strict`` makes that 1), 1 the input
cannot be analysed (one line on stderr, never a traceback), 2 usage errors.
"""

from __future__ import annotations

import click

from .. import __version__
from .compare import compare
from .components import components
from .formats import list_formats
from .plot import plot
from .report import report
from .spectrum import spectrum


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="rankscope")
def main() -> None:
    """How much rank does a low-rank adapter actually use, and where?"""


main.add_command(spectrum)
main.add_command(components)
main.add_command(compare)
main.add_command(list_formats)
main.add_command(report)
main.add_command(plot)

__all__ = ["main"]
