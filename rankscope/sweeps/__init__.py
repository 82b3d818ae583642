"""Sweeps: one table from many checkpoints (a zoo of adapters, a hyper-parameter grid, the checkpoints of many
runs), analysed on a local process pool, serially, or on Ray. ``rankscope.sweep(inputs, …)`` is :func:`~.run.sweep`
(the package is ``sweeps`` so that the façade's ``rankscope.sweep`` stays the function).
"""

from .inputs import SweepItem, discover
from .run import sweep
from .worker import content_hash

__all__ = ["SweepItem", "content_hash", "discover", "sweep"]
