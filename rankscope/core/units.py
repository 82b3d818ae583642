"""Human-readable sizes for messages and listings (one formatter: the memory-budget errors and ``rankscope cache``)."""

from __future__ import annotations


def byte_size(count: float) -> str:
    """``count`` bytes in binary units, three significant digits: 1536 → ``1.5 KiB``, 3·2³⁰ → ``3 GiB``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024:
            return f"{count:.3g} {unit}"
        count /= 1024
    return f"{count:.3g} TiB"
