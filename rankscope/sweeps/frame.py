"""The DataFrame ``rankscope.sweep`` returns: the layers table, with the checkpoints table beside it as an attribute.

The checkpoints table is not kept in ``DataFrame.attrs``: pandas deep-copies ``attrs`` into every derived frame and,
when it combines frames (``concat``, hence ``groupby(...).describe()``), compares them with ``==``, which a
DataFrame inside ``attrs`` cannot answer with one bool. ``attrs`` holds only plain scalars (``resumed``).
"""

from __future__ import annotations

from typing import ClassVar

import pandas


class SweepFrame(pandas.DataFrame):
    """One row per (checkpoint, layer); ``.checkpoints`` is the one-row-per-checkpoint DataFrame (status, error,
    seconds, config fields, content hash, ``duplicate_of``) and ``attrs["resumed"]`` the number of checkpoints an
    earlier sweep had done. Every frame derived from it (a selection, a copy, a groupby) is a plain DataFrame
    without ``.checkpoints``: the table describes this sweep's rows, not a subset's."""

    _metadata: ClassVar[list[str]] = ["checkpoints"]  # kept by pickle; never propagated (see _constructor)
    checkpoints: pandas.DataFrame | None = None

    @property
    def _constructor(self):
        return pandas.DataFrame


def sweep_frame(layers: pandas.DataFrame, checkpoints: pandas.DataFrame, resumed: int) -> SweepFrame:
    result = SweepFrame(layers)
    result.checkpoints = checkpoints
    result.attrs["resumed"] = int(resumed)
    return result
