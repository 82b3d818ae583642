"""The count of σ > τ per layer against the layer index (the BoRA/HiRA rank-validation figure): one series per
checkpoint, one panel per module type. The counts are the analysis' own (``count_above`` at τ)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from ._axes import (
    axes_given,
    check_axes,
    facet_grid,
    facet_title,
    facets,
    guide_hline,
    legend_above,
    new_figure,
    root_figure,
    style_for,
)
from ._common import (
    BAND_ALPHA,
    MAX_BOUND_LINES,
    MAX_FACETS,
    FigureInputError,
    block_positions,
    by_module,
    check_labels,
    metric_value,
)
from .style import paper_style

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from ..analysis.records import Analysis, LayerRecord


def _count_series(ax: Axes, records: list[LayerRecord], counts: dict, x_of: Callable, index: int):
    """One checkpoint's counts against layer index: the mean over the module types at each index (the range
    shaded) when several share a panel."""
    by_x: dict[int, list[float]] = {}
    for record in records:
        by_x.setdefault(x_of(record), []).append(counts[id(record)])
    xs = sorted(by_x)
    style = style_for(index, len(xs))
    ys = [sum(by_x[x]) / len(by_x[x]) for x in xs]
    (line,) = ax.plot(xs, ys, zorder=3, **style)
    if any(len(v) > 1 for v in by_x.values()):
        low, high = [min(by_x[x]) for x in xs], [max(by_x[x]) for x in xs]
        ax.fill_between(xs, low, high, color=style["color"], alpha=BAND_ALPHA, linewidth=0, zorder=2)
    return line, max(ys)


TICK_LABEL_ROOM = 0.11  # inches: a 7 pt tick label's height and a little space


def _apart(ticks: list[int], span: float, ax: Axes) -> list[int]:
    """Of ``ticks`` (most telling first: the rank bounds, then 0), those whose labels do not overlap an earlier
    one's on ``ax``'s y axis over 0…``span`` (bounds 4 and 64 label 4 and 64: a 0 just under the 4 would collide)."""
    inches = ax.get_position().height * root_figure(ax).get_figheight()  # before the layout: about the panel
    gap = span * TICK_LABEL_ROOM / max(inches, 1e-3)
    kept: list[int] = []
    for tick in ticks:
        if all(abs(tick - other) >= gap for other in kept):
            kept.append(tick)
    return sorted(kept)


def count_above_figure(
    analyses: Sequence[Analysis],
    labels: Sequence[str] | None = None,
    *,
    threshold: float | None = None,
    width: str | float = "column",
    ax: Axes | Sequence[Axes] | None = None,
) -> Figure:
    """The count of σ > τ per layer (the BoRA/HiRA rank-validation figure): one series per checkpoint, one panel
    per module type (up to 8; more are averaged per layer, the range shaded); rank bounds dashed (up to three
    distinct ones; the y axis fits the counts, and the bounds drawn).

    ``threshold``: τ, which the analyses must have computed (default: their first threshold, 0.005). ``ax``: one
    Axes (the module types averaged per layer) or one per module type; by default a new figure of ``width``.
    """
    from ..core.naming import block_of
    from .style import figure_width

    labels = check_labels(analyses, labels)
    tau = threshold if threshold is not None else analyses[0].options.thresholds[0]
    # a --top-k layer's count is unknown (None): not drawn
    chosen = [[r for r in a.layers if r.valid and metric_value(r, "count_above", tau) is not None] for a in analyses]
    everything = [r for records in chosen for r in records]
    if not everything:
        raise FigureInputError(f"{analyses[0].checkpoint.path}: no valid layer to draw")
    counts = {id(r): metric_value(r, "count_above", tau) for r in everything}
    modules = list(by_module(everything))
    given = axes_given(ax)
    facet = 1 < len(modules) <= MAX_FACETS and not (given is not None and len(given) == 1)
    positions, xlabel = block_positions(everything)

    def x_of(record: LayerRecord) -> int:
        return positions[block_of(record.name)]

    with paper_style():
        if given is not None:
            axes = check_axes(given, len(modules) if facet else 1, "count_above_figure")
            fig = root_figure(axes[0])
        elif facet:
            rows, _ = facet_grid(len(modules), width)
            fig = new_figure(width, (0.45 + 0.95 * rows) / figure_width(width))
            axes = facets(fig, len(modules), width)
        else:
            fig = new_figure(width, 0.62)
            axes = [fig.subplots()]
        handles: dict[str, object] = {}
        guide_handles: dict[str, object] = {}
        all_bounds: set[int] = set()
        top = 1.0
        for panel_ax, module in zip(axes, modules if facet else [None], strict=True):
            panel = [[r for r in records if module is None or r.module_type == module] for records in chosen]
            for i, (label, records) in enumerate(zip(labels, panel, strict=True)):
                if records:
                    line, highest = _count_series(panel_ax, records, counts, x_of, i)
                    handles.setdefault(label, line)
                    top = max(top, highest)
            bounds = sorted({r.rank_bound for records in panel for r in records})
            all_bounds.update(bounds)
            if len(bounds) <= MAX_BOUND_LINES:  # labelled in place on one panel, in the legend on small multiples
                top = max(top, *bounds)
                for bound in bounds:
                    mark = guide_hline(panel_ax, bound, "" if facet else f"r = {bound}", side="left", above=False)
                    guide_handles.setdefault("rank bound", mark)
            if facet:
                facet_title(panel_ax, module, width, len(modules))
        from matplotlib.ticker import MaxNLocator

        plotted = {x_of(r) for records in chosen for r in records}

        for panel_ax in axes:
            panel_ax.set_ylim(0, top * 1.1)
            if len(all_bounds) <= MAX_BOUND_LINES and top <= max(all_bounds):  # ticks at 0 and the bounds say it all
                panel_ax.set_yticks(_apart([*sorted(all_bounds, reverse=True), 0], top * 1.1, panel_ax))
            else:
                panel_ax.yaxis.set_major_locator(MaxNLocator(nbins=4, integer=True))
            panel_ax.xaxis.set_major_locator(MaxNLocator(nbins=6, integer=True))
            if len(plotted) == 1:  # one layer index (one block, or a flat naming): a tick at it, not at ±0.04
                (only,) = plotted
                panel_ax.set_xlim(only - 1, only + 1)
                panel_ax.set_xticks([only])
        ylabel = f"count σ > {tau:g}"
        if facet and given is None:
            fig.supxlabel(xlabel)
            fig.supylabel(ylabel)
        else:
            for panel_ax in axes:
                panel_ax.set_xlabel(xlabel)
            axes[0].set_ylabel(ylabel)
        what = None if facet or len(modules) == 1 else f"mean over {len(modules)} module types, range shaded"
        if len(handles) > 1 or what or facet:
            if facet:
                handles.update(guide_handles)
            legend_above(fig, list(handles.values()), list(handles), title=what, axes=given)
    return fig
