"""``rankscope formats``: every registered format (third-party ones too), in the order detection tries them."""

from __future__ import annotations

import warnings

import click

from .app import warn


@click.command("formats")
def list_formats() -> None:
    """The checkpoint formats rankscope reads, in the order it tries them."""
    from ..formats import FormatWarning, detection_order

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", FormatWarning)
        order = detection_order()
    for problem in caught:
        warn(str(problem.message))
    for fmt in order:
        click.echo(f"{fmt.name:<12} {fmt.description}")
