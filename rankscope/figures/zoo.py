"""Figures of a zoo of adapters (a sweep's layer table, passed in as plain data): the distribution of a per-layer
value by group (r, module type, family) as box and strip plots, and a scatter of erank against the rank r with the
bound erank ≤ r drawn."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from ._axes import legend_above
from ._common import FigureInputError
from ._panel import one_axes
from .style import GUIDE_COLOR, paper_style, series_colour, series_marker

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

JITTER = 0.18  # half-width of the strip's horizontal spread, in group widths (r steps for the scatter)


def _jitter(count: int, seed: int) -> list[float]:
    """Deterministic offsets in [−JITTER, JITTER]: the same data give the same figure bytes."""
    import numpy as np

    return list(np.random.default_rng(seed).uniform(-JITTER, JITTER, count))


def distribution_figure(
    groups: Mapping[str, Sequence[float]],
    *,
    value_label: str,
    group_label: str,
    width: str | float = "column",
    ax: Axes | None = None,
) -> Figure:
    """One box (quartiles, whiskers at 1.5 IQR) per group with every value drawn over it as a jittered point;
    groups in the order given, each labelled with its count."""
    drawn = {name: [float(v) for v in values if v is not None and v == v] for name, values in groups.items()}
    drawn = {name: values for name, values in drawn.items() if values}
    if not drawn:
        raise FigureInputError(f"no {value_label} to draw")
    with paper_style():
        fig, axes = one_axes(ax, width, 0.62, "distribution_figure")
        positions = list(range(1, len(drawn) + 1))
        axes.boxplot(list(drawn.values()), positions=positions, widths=0.55, showfliers=False,
                     medianprops={"color": series_colour(1)}, boxprops={"color": GUIDE_COLOR},
                     whiskerprops={"color": GUIDE_COLOR}, capprops={"color": GUIDE_COLOR})  # fmt: skip
        for index, (position, values) in enumerate(zip(positions, drawn.values(), strict=True)):
            offsets = _jitter(len(values), index)
            axes.scatter([position + o for o in offsets], values, s=5, color=series_colour(0), alpha=0.55,
                         linewidths=0, zorder=3)  # fmt: skip
        axes.set_xticks(positions, [f"{name}\n({len(values)})" for name, values in drawn.items()])
        axes.set_xlabel(group_label)
        axes.set_ylabel(value_label)
    return fig


def erank_scatter_figure(
    ranks: Sequence[float],
    eranks: Sequence[float],
    module_types: Sequence[str],
    *,
    order: Sequence[str] | None = None,
    width: str | float = "column",
    ax: Axes | None = None,
) -> Figure:
    """One point per layer: erank against its rank bound r (jittered on r), coloured and marked by module type
    (``order``: the types' legend order, default first-seen); the line erank = r is the bound."""
    points = [(float(r), float(e), t) for r, e, t in zip(ranks, eranks, module_types, strict=True)
              if r is not None and e is not None and r == r and e == e]  # fmt: skip
    if not points:
        raise FigureInputError("no layer has both r and erank to draw")
    types = list(dict.fromkeys([*(order or ()), *(t for _, _, t in points)]))
    types = [t for t in types if any(p[2] == t for p in points)]
    with paper_style():
        fig, axes = one_axes(ax, width, 0.75, "erank_scatter_figure")
        ranks_drawn = sorted({r for r, _, _ in points})
        step = min((b - a for a, b in itertools.pairwise(ranks_drawn)), default=1.0)  # jitter within a gap
        handles = []
        for index, name in enumerate(types):
            mine = [(r, e) for r, e, t in points if t == name]
            offsets = _jitter(len(mine), index)
            handles.append(axes.scatter([r + o * step for (r, _), o in zip(mine, offsets, strict=True)],
                                        [e for _, e in mine], s=7, color=series_colour(index),
                                        marker=series_marker(index), alpha=0.7, linewidths=0))  # fmt: skip
        low, high = ranks_drawn[0] - 2 * JITTER * step, ranks_drawn[-1] + 2 * JITTER * step
        axes.plot([low, high], [low, high], color=GUIDE_COLOR, linestyle="--", linewidth=0.8, label="erank = r")
        axes.set_xticks(ranks_drawn, [f"{r:g}" for r in ranks_drawn])
        axes.minorticks_off()
        axes.set_xlabel("rank bound r (jittered)")
        axes.set_ylabel("erank")
        legend_above(fig, handles, types, axes=[axes] if ax is not None else None)
    return fig
