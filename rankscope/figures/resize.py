"""Retained energy against total rank (or parameters): the best any allocation can do, each rule's point on it,
and where the adapter is now. The curve and the points come from ``resize`` (``energy_frontier``, ``suggest``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from ._common import axes_given, check_axes, guide_vline, legend_above, new_figure, root_figure
from .style import GUIDE_COLOR, paper_style, series_style

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from ..analysis.records import Analysis

DEFAULT_RULES = ("energy:0.9", "energy:0.95", "energy:0.99", "erank", "sv_ratio:10")


def resize_figure(
    analysis: Analysis,
    rules: Sequence[str] = DEFAULT_RULES,
    *,
    by: str = "rank",
    max_rank: int | None = None,
    width: str | float = "column",
    ax: Axes | None = None,
) -> Figure:
    """Retained energy Σ kept σ²/Σσ² (over all layers) against the total rank (``by="rank"``) or the parameter
    count (``by="params"``): the frontier (directions taken by σ², or σ²/(m+n)), one marker per rule, and a
    dotted line at the adapter's present size."""
    from ..resize.suggest import energy_frontier, suggest  # imports torch: not when the package is imported

    given = axes_given(ax)
    with paper_style():
        if given is None:
            fig = new_figure(width, 0.72)
            axis = fig.subplots()
        else:
            (axis,) = check_axes(given, 1, "resize_figure")
            fig = root_figure(axis)
        xs, ys = energy_frontier(analysis, by=by)
        axis.plot(xs, ys, color=GUIDE_COLOR, linewidth=0.9, zorder=2, label="best at each size")
        handles, labels = [axis.lines[-1]], ["best at each size"]
        for index, rule in enumerate(rules):
            suggestion = suggest(analysis, rule, max_rank=max_rank)
            x = suggestion.params_after if by == "params" else sum(layer.rank for layer in suggestion.layers)
            style = series_style(index)
            (point,) = axis.plot([x], [suggestion.retained_energy], linestyle="none", marker=style["marker"],
                                 color=style["color"], markersize=4.5, zorder=3)  # fmt: skip
            handles.append(point)
            labels.append(f"{rule} ({x:,})")
        valid = [record for record in analysis.layers if record.valid]
        now = sum(record.params for record in valid) if by == "params" else sum(record.rank_bound for record in valid)
        guide_vline(axis, now, f"now: {now:,}")
        axis.set_xlim(0, max(now, xs[-1]) * 1.04)
        axis.set_ylim(0, 1.02)
        axis.set_xlabel("parameters" if by == "params" else "total rank (Σ over layers)")
        axis.set_ylabel("energy kept")
        legend_above(fig, handles, labels, axes=[axis] if given is not None else None)
    return fig


__all__ = ["DEFAULT_RULES", "resize_figure"]
