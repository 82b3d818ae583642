"""``rankscope cache``: the on-disk cache of base-weight SVDs (``core.svd_cache``) — ``info`` shows where it is and
how much it holds, ``clear`` empties it."""

from __future__ import annotations

import click

from ..core.units import byte_size
from .app import handle_errors


@click.group("cache")
def cache() -> None:
    """The cache of base-model SVDs that --base analyses reuse ($RANKSCOPE_CACHE, limit $RANKSCOPE_CACHE_SIZE)."""


@cache.command("info")
@handle_errors
def info() -> None:
    """Where the cache is, its entries and their size, and its limit."""
    from ..core.svd_cache import SVDCache

    found = SVDCache().info()
    click.echo(f"directory: {found['directory']}")
    click.echo(f"entries:   {found['entries']} ({byte_size(found['bytes'])})")
    click.echo(f"limit:     {byte_size(found['limit'])} (RANKSCOPE_CACHE_SIZE)")


@cache.command("clear")
@handle_errors
def clear() -> None:
    """Remove every cached decomposition (nothing else in the directory is touched)."""
    from ..core.svd_cache import SVDCache

    store = SVDCache()
    removed = store.clear()
    click.echo(f"removed {removed} cached decomposition(s) from {store.directory}")
