"""``rankscope cache``: the on-disk cache of base-weight SVDs (``core.svd_cache``) — ``info`` shows where it is and
how much it holds, ``clear`` empties it."""

from __future__ import annotations

import click

from .app import handle_errors


@click.group("cache")
def cache() -> None:
    """The cache of base-model SVDs that --base analyses reuse ($RANKSCOPE_CACHE, limit $RANKSCOPE_CACHE_SIZE)."""


def _size(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024:
            return f"{count:.3g} {unit}"
        count /= 1024
    return f"{count:.3g} TiB"


@cache.command("info")
@handle_errors
def info() -> None:
    """Where the cache is, its entries and their size, and its limit."""
    from ..core.svd_cache import SVDCache

    found = SVDCache().info()
    click.echo(f"directory: {found['directory']}")
    click.echo(f"entries:   {found['entries']} ({_size(found['bytes'])})")
    click.echo(f"limit:     {_size(found['limit'])} (RANKSCOPE_CACHE_SIZE)")


@cache.command("clear")
@handle_errors
def clear() -> None:
    """Remove every cached decomposition (nothing else in the directory is touched)."""
    from ..core.svd_cache import SVDCache

    store = SVDCache()
    removed = store.clear()
    click.echo(f"removed {removed} cached decomposition(s) from {store.directory}")
