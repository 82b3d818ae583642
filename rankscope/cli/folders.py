"""The options of the commands that write a folder (``report``, ``trajectory -o``, ``sweep``): ``-o DIR`` and
``--figures pdf,png,svg|none``, declared once and checked once."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import click

from .options import CommaList


def folder_option(help: str, *, required: bool = True) -> Callable:
    """``-o/--output DIR`` → parameter ``out_dir``."""
    return click.option("-o", "--output", "out_dir", required=required, metavar="DIR", help=help)


def figures_option(help: str) -> Callable:
    """``--figures pdf,png,svg|none`` (default pdf: the promised files; PNGs when asked) → parameter ``figure_formats``; read it with
    :func:`read_figure_formats`."""
    return click.option(
        "--figures",
        "figure_formats",
        type=CommaList(),
        default="pdf",
        show_default=True,
        metavar="pdf,png,svg|none",
        help=f"{help} PDF by default; pdf,png adds 300-dpi PNGs.",
    )


def read_figure_formats(given: Iterable[str]) -> tuple[str, ...]:
    """The figure formats ``--figures`` asks for, lower case, each once (``none``: no files); a usage error for any
    other name."""
    from ..report.bundle import FIGURE_FORMATS

    given = tuple(given)
    formats = () if given == ("none",) else tuple(dict.fromkeys(f.lower() for f in given))
    unknown = [f for f in formats if f not in FIGURE_FORMATS]
    if unknown:
        raise click.BadParameter(f"{unknown[0]!r} is not one of pdf, png, svg (or 'none')", param_hint="--figures")
    return formats
