"""``rankscope formats``: every registered format (third-party ones too), in the order detection tries them.

Each format is two lines: its name and description, then what reading it needs beyond its own files and how its
spectrum is computed (the ``needs`` and ``spectrum`` of its :class:`~rankscope.formats.Format`).
"""

from __future__ import annotations

import warnings

import click

from .app import warn

NAME_WIDTH = 12
NOT_STATED = "not stated"  # a third-party format that does not fill needs/spectrum


def format_lines(fmt) -> tuple[str, str]:
    """The listing's two lines for one format: ``name  description`` and ``needs: …; spectrum: …`` below it."""
    details = f"needs: {fmt.needs or NOT_STATED}; spectrum: {fmt.spectrum or NOT_STATED}"
    return f"{fmt.name:<{NAME_WIDTH}} {fmt.description}", f"{'':<{NAME_WIDTH}} {details}"


@click.command("formats")
def list_formats() -> None:
    """The checkpoint formats rankscope reads, in the order it tries them, with what each needs."""
    from ..formats import FormatWarning, detection_order

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", FormatWarning)
        order = detection_order()
    for problem in caught:
        warn(str(problem.message))
    for fmt in order:
        for line in format_lines(fmt):
            click.echo(line)
