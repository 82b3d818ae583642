"""``rankscope formats``: the readers, in the order detection tries them."""

from __future__ import annotations

import click


@click.command("formats")
def list_formats() -> None:
    """The checkpoint formats rankscope reads, in the order it tries them."""
    from ..formats import formats

    for fmt in sorted(formats(), key=lambda f: (f.priority, f.name)):
        click.echo(f"{fmt.name:<12} {fmt.description}")
