"""Retained energy against total rank (or parameters): the best any allocation can do, each rule's point on it,
and where the adapter is now. The curve and the points come from ``resize`` (``energy_frontier``, ``suggest``).
Several checkpoints: one small panel each (its own x range, the energy axis shared), one legend of the rules."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from ._axes import axes_given, check_axes, facet_grid, guide_vline, legend_above, new_figure, root_figure
from ._common import FigureInputError, check_labels, ellipsize
from .style import GUIDE_COLOR, figure_width, paper_style, series_style

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from ..analysis.records import Analysis

DEFAULT_RULES = ("energy:0.9", "energy:0.95", "energy:0.99", "erank", "sv_ratio:10")


def _panel(axis: Axes, analysis: Analysis, rules: Sequence[str], by: str, max_rank: int | None, *, small: bool):
    """One checkpoint's frontier, rule points and present size; returns the legend handles and labels."""
    from ..resize.suggest import energy_frontier, suggest  # imports torch: not when the package is imported

    xs, ys = energy_frontier(analysis, by=by)
    (frontier,) = axis.plot(xs, ys, color=GUIDE_COLOR, linewidth=0.9, zorder=2)
    handles, labels = [frontier], ["best at each size"]
    for index, rule in enumerate(rules):
        suggestion = suggest(analysis, rule, max_rank=max_rank)
        x = suggestion.params_after if by == "params" else sum(layer.rank for layer in suggestion.layers)
        style = series_style(index)
        (point,) = axis.plot([x], [suggestion.retained_energy], linestyle="none", marker=style["marker"],
                             color=style["color"], markersize=4.5, zorder=3)  # fmt: skip
        handles.append(point)
        labels.append(rule if small else f"{rule} ({x:,})")  # small panels: the sizes differ per panel
    valid = [record for record in analysis.layers if record.valid]
    now = sum(record.params for record in valid) if by == "params" else sum(record.rank_bound for record in valid)
    guide_vline(axis, now, "")
    # labelled at the foot of the line: the rules' points sit on the frontier's top end, next to the present size
    axis.annotate(f"now: {now:,}", xy=(now, 0.04), xycoords=("data", "axes fraction"), xytext=(-1.5, 0),
                  textcoords="offset points", ha="right", va="bottom", fontsize=7, color=GUIDE_COLOR)  # fmt: skip
    axis.set_xlim(0, max(now, xs[-1]) * 1.04)
    axis.set_ylim(0, 1.02)
    return handles, labels


def resize_figure(
    analyses: Analysis | Sequence[Analysis],
    rules: Sequence[str] = DEFAULT_RULES,
    *,
    labels: Sequence[str] | None = None,
    by: str = "rank",
    max_rank: int | None = None,
    width: str | float = "column",
    ax: Axes | Sequence[Axes] | None = None,
) -> Figure:
    """Retained energy Σ kept σ²/Σσ² (over all layers) against the total rank (``by="rank"``) or the parameter
    count (``by="params"``): the frontier (directions taken by σ², or σ²/(m+n)), one marker per rule, and a
    dotted line at the adapter's present size. ``analyses``: one analysis, or several (one panel each, titled by
    ``labels``). ``ax``: one Axes per checkpoint to draw into; by default a new figure of ``width``."""
    analyses = [analyses] if hasattr(analyses, "layers") else list(analyses)
    labels = check_labels(analyses, labels)
    for analysis in analyses:
        if not any(record.valid for record in analysis.layers):
            raise FigureInputError(f"{analysis.checkpoint.path}: no valid layer to draw")
    several = len(analyses) > 1
    given = axes_given(ax)
    with paper_style():
        if given is not None:
            axes = check_axes(given, len(analyses), "resize_figure")
            fig = root_figure(axes[0])
        elif several:
            rows, columns = facet_grid(len(analyses), width)
            fig = new_figure(width, (0.45 + 1.05 * rows) / figure_width(width))
            grid = fig.subplots(rows, columns, sharey=True, squeeze=False)  # x: each adapter's own size
            axes = [a for row in grid for a in row]
            for extra in axes[len(analyses) :]:
                fig.delaxes(extra)
            axes = axes[: len(analyses)]
        else:
            fig = new_figure(width, 0.72)
            axes = [fig.subplots()]
        from matplotlib.ticker import MaxNLocator

        for axis, analysis, label in zip(axes, analyses, labels, strict=True):
            handles, names = _panel(axis, analysis, rules, by, max_rank, small=several)
            if several:
                axis.set_title(ellipsize(label, 22), fontsize=7, loc="left")
                axis.xaxis.set_major_locator(MaxNLocator(nbins=3, integer=True))
        xlabel, ylabel = ("parameters" if by == "params" else "total rank (Σ over layers)"), "energy kept"
        if several and given is None:
            fig.supxlabel(xlabel, fontsize=8)
            fig.supylabel(ylabel, fontsize=8)
        else:
            for axis in axes:
                axis.set_xlabel(xlabel)
            axes[0].set_ylabel(ylabel)
        legend_above(fig, handles, names, axes=[axes[0]] if given is not None else None)
    return fig


__all__ = ["DEFAULT_RULES", "resize_figure"]
