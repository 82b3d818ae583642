"""Spectrum, cumulative energy and count-above figures: several checkpoints overlaid, layer by layer.

How many layers decides how a figure reads (never a legend with hundreds of entries):

- at most 8 curves in all (a few named layers): one curve per layer and checkpoint;
- one checkpoint: one curve per module type, the median over its layers (quartiles shaded when few types);
- several checkpoints: one panel per module type (up to 8 types), each overlaying the checkpoints' medians;
  more module types than that: one panel, each checkpoint's median over all layers.

The curves are the records' own numbers: σ_i as analysed, the cumulative energy Σ_{j≤k} σ_j² / Σ σ², the count
of σ > τ as computed by the analysis; the median and quartiles across layers are display summaries.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ._common import (
    MAX_FACETS,
    MAX_LINES,
    FigureInputError,
    block_positions,
    by_module,
    check_labels,
    cumulative_energy,
    empty_note,
    facet_grid,
    guide_hline,
    guide_vline,
    integer_ticks,
    legend_above,
    metric_value,
    new_figure,
    quartiles,
    selected,
    short_name,
    style_for,
)
from .style import paper_style

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from ..analysis.records import Analysis, LayerRecord

BAND_ALPHA = 0.18
MAX_BANDS = 3  # quartile bands are shaded only when at most this many curves share a panel


@dataclass
class Curve:
    """One drawn series: its label, its style index and the vectors it summarises (one per layer)."""

    label: str
    index: int
    vectors: list[list[float]]


@dataclass
class Panel:
    title: str | None
    curves: list[Curve]
    records: list[LayerRecord]


def _plan(analyses: Sequence[Analysis], labels: list[str], layers, values: Callable) -> tuple[list[Panel], str | None]:
    """The panels and curves to draw, and a legend title saying what a curve summarises."""
    chosen = [selected(a, layers) for a in analyses]
    if not any(chosen):
        raise FigureInputError(f"{analyses[0].checkpoint.path}: no valid layer to draw")
    everything = [r for records in chosen for r in records]
    if len(everything) <= MAX_LINES:
        curves, index = [], 0
        for label, records in zip(labels, chosen, strict=True):
            for record in records:
                if len(analyses) == 1:
                    name = short_name(record) if len(everything) > 1 else label
                else:
                    name = label if len({r.name for r in everything}) == 1 else f"{label}: {short_name(record)}"
                curves.append(Curve(name, index, [values(record)]))
                index += 1
        title = everything[0].name if len({r.name for r in everything}) == 1 else None
        return [Panel(title, curves, everything)], None
    if len(analyses) == 1:
        groups = by_module(chosen[0])
        if len(groups) <= MAX_LINES:
            curves = [Curve(module, i, [values(r) for r in rs]) for i, (module, rs) in enumerate(groups.items())]
            per = {len(rs) for rs in groups.values()}
            what = f"median of {per.pop()} layers" if len(per) == 1 else "median over layers"
        else:
            curves = [Curve(labels[0], 0, [values(r) for r in chosen[0]])]
            what = f"median of {len(chosen[0])} layers"
        if len(curves) <= MAX_BANDS:
            what += ", quartiles shaded"
        return [Panel(None, curves, chosen[0])], what
    modules = list(by_module(everything))
    if 1 < len(modules) <= MAX_FACETS:
        panels = []
        for module in modules:
            curves = [
                Curve(label, i, [values(r) for r in records if r.module_type == module])
                for i, (label, records) in enumerate(zip(labels, chosen, strict=True))
            ]
            panels.append(
                Panel(module, [c for c in curves if c.vectors], [r for r in everything if r.module_type == module])
            )
        return panels, "median over layers, quartiles shaded"
    curves = [
        Curve(label, i, [values(r) for r in rs]) for i, (label, rs) in enumerate(zip(labels, chosen, strict=True))
    ]
    return [Panel(None, curves, everything)], "median over all layers, quartiles shaded"


def significant(record: LayerRecord) -> list[float]:
    """The record's singular values without the numerically zero tail (beyond its ``numerical_rank``: below
    σ₁·max(m, n)·eps(float32)), which a dense SVD of a low-rank update returns as noise near 1e-17."""
    values = list(record.singular_values)
    rank = (record.metrics or {}).get("numerical_rank")
    return values[:rank] if rank is not None and rank < len(values) else values


def _positive(values: Sequence[float]) -> list[float]:
    """Log axes cannot show 0: exact zeros become gaps."""
    return [v if v > 0 else float("nan") for v in values]


def _draw_curve(ax: Axes, curve: Curve, *, start: int, log: bool, bands: bool):
    low, mid, high = quartiles(curve.vectors)
    xs = list(range(start, start + len(mid)))
    style = style_for(curve.index, len(xs))
    ys = _positive(mid) if log else mid
    (line,) = ax.plot(xs, ys, label=curve.label, zorder=3, **style)
    if bands and len(curve.vectors) > 1:
        ax.fill_between(
            xs,
            _positive(low) if log else low,
            _positive(high) if log else high,
            color=style["color"],
            alpha=BAND_ALPHA,
            linewidth=0,
            zorder=2,
        )
    return line


def _facets(fig: Figure, count: int, width, *, sharey: bool = True) -> list[Axes]:
    rows, columns = facet_grid(count, width)
    grid = fig.subplots(rows, columns, sharex=True, sharey=sharey, squeeze=False)
    axes = [ax for row in grid for ax in row]
    for ax in axes[count:]:
        ax.set_visible(False)
    for i, ax in enumerate(axes[:count]):
        # x tick labels on the lowest panel of each column (sharex hides them above an empty slot too)
        ax.tick_params(labelbottom=i + columns >= count, labelleft=i % columns == 0)
    return axes[:count]


def _curve_figure(
    analyses: Sequence[Analysis],
    labels: Sequence[str] | None,
    layers,
    width,
    *,
    values: Callable[[LayerRecord], list[float]],
    start: int,
    log: bool,
    xlabel: str,
    ylabel: str,
    guides: Callable[[Axes, Panel, bool], dict],
    extent: Callable[[Panel], int] = lambda panel: 0,
) -> Figure:
    labels = check_labels(analyses, labels)
    panels, what = _plan(analyses, labels, layers, values)
    with paper_style():
        if len(panels) == 1:
            fig = new_figure(width, 0.68)
            axes = [fig.subplots()]
        else:
            rows, _ = facet_grid(len(panels), width)
            from .style import figure_width

            fig = new_figure(width, (0.45 + 1.0 * rows) / figure_width(width))
            axes = _facets(fig, len(panels), width)
        handles: dict[str, object] = {}
        guide_handles: dict[str, object] = {}
        longest = 2 - start  # at least one point on the axis
        for ax, panel in zip(axes, panels, strict=True):
            bands = len(panel.curves) <= MAX_BANDS
            for curve in panel.curves:
                handles.setdefault(curve.label, _draw_curve(ax, curve, start=start, log=log, bands=bands))
                longest = max(longest, max(len(v) for v in curve.vectors))
            longest = max(longest, extent(panel))
            if log:
                ax.set_yscale("log")
            # one panel: guides labelled in place; small panels: labelled once, in the legend
            marks = guides(ax, panel, len(panels) == 1)
            if ax is axes[0] and len(panels) > 1:
                guide_handles = marks
            if panel.title and len(panels) > 1:
                ax.set_title(panel.title)
        for ax in axes:
            if longest > 100:  # full dense spectra: log index, labelled 1, 10, 100
                from matplotlib.ticker import FuncFormatter

                ax.set_xscale("log")
                ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
            else:
                integer_ticks(ax.xaxis, longest - 1 + start, start=start, most=6 if len(panels) > 1 else 9)
                ax.set_xlim(start - 0.4, longest - 1 + start + 0.4)
        if len(panels) == 1:
            axes[0].set_xlabel(xlabel)
            axes[0].set_ylabel(ylabel)
            if panels[0].title:
                axes[0].set_title(panels[0].title, fontsize=7, loc="left")
        else:
            fig.supxlabel(xlabel)
            fig.supylabel(ylabel)
        if len(handles) > 1 or what:
            handles.update(guide_handles)
            legend_above(fig, list(handles.values()), list(handles), title=what)
    return fig


# -- spectrum ---------------------------------------------------------------------------------------------
def _spectrum_limits(panel: Panel, thresholds: Sequence[float]) -> tuple[float, float]:
    values = [v for r in panel.records for v in significant(r) if v > 0]
    if not values:
        return 1e-3, 1.0
    top = max(values) * 3  # room above the curves for the rank-bound labels
    # numerically zero values (≈1e-16·σ₁) would squash the scale: they fall off the bottom instead
    bottom = max(min(values) / 1.8, top * 1e-9)
    for tau in thresholds:
        if tau > 0:
            bottom, top = min(bottom, tau / 3), max(top, tau * 3)
    return bottom, top


def spectrum_figure(
    analyses: Sequence[Analysis],
    labels: Sequence[str] | None = None,
    *,
    layers: Sequence[str] | None = None,
    width: str | float = "column",
) -> Figure:
    """Singular values σ_i of each layer's ΔW against i, log scale, checkpoints overlaid.

    The absolute thresholds τ of the analyses (default 0.005) are dashed lines, the layers' rank bounds dotted
    verticals; numerically zero values (beyond each layer's numerical rank) are not drawn. ``layers``: names of
    the layers to draw (default: every valid layer, summarised as the module docstring says).
    """
    thresholds = sorted({t for a in analyses for t in a.options.thresholds if t > 0})

    def guides(ax: Axes, panel: Panel, inline: bool) -> dict:
        bottom, top = _spectrum_limits(panel, thresholds)
        ax.set_ylim(bottom, top)
        marks = {}
        for tau in thresholds:  # labelled at the left: spectra fall from there, so the corner is empty
            marks[f"τ = {tau:g}"] = guide_hline(ax, tau, f"τ = {tau:g}" if inline else "", side="left")
        bounds = sorted({r.rank_bound for r in panel.records})
        if len(bounds) <= 3:  # more distinct bounds (per-layer rank patterns) would be a thicket of lines
            for bound in bounds:
                marks["rank bound"] = guide_vline(ax, bound, f"r = {bound}" if inline else "")
        if not any(v > 0 for r in panel.records for v in r.singular_values):
            empty_note(ax, "all singular values are 0")
        return marks

    return _curve_figure(
        analyses,
        labels,
        layers,
        width,
        values=significant,
        extent=lambda panel: max(r.rank_bound for r in panel.records),  # the rank bounds are in view
        start=1,
        log=True,
        xlabel="index i",
        ylabel="singular value σᵢ",
        guides=guides,
    )


# -- cumulative energy ------------------------------------------------------------------------------------
def _cumulative_energy(record: LayerRecord) -> list[float]:
    """0, then Σ_{j≤k} σ_j² / Σσ² for k = 1..K, K the numerical rank (all 0 for a zero update)."""
    sigma = significant(record)
    return [0.0, *(cumulative_energy(sigma) or [0.0] * len(sigma))]


def energy_figure(
    analyses: Sequence[Analysis],
    labels: Sequence[str] | None = None,
    *,
    layers: Sequence[str] | None = None,
    width: str | float = "column",
) -> Figure:
    """Cumulative energy Σ_{j≤k} σ_j² / Σσ² against k; the analyses' energy levels p (0.9, 0.99) dashed."""
    levels = sorted({p for a in analyses for p in a.options.energies})
    if len(levels) > 2:  # labels of close levels would collide: the lowest and highest say enough
        levels = [levels[0], levels[-1]]

    def guides(ax: Axes, panel: Panel, inline: bool) -> dict:
        ax.set_ylim(0, 1.04)
        marks = {}
        for p in levels:  # labelled below the line at the left, where every curve is still near 0
            marks["energy " + ", ".join(f"{100 * q:g}%" for q in levels)] = guide_hline(
                ax, p, f"{100 * p:g}%" if inline else "", side="left", above=False
            )
        return marks

    return _curve_figure(
        analyses,
        labels,
        layers,
        width,
        values=_cumulative_energy,
        start=0,
        log=False,
        xlabel="number of singular values k",
        ylabel="cumulative energy",
        guides=guides,
    )


# -- count above τ per layer ------------------------------------------------------------------------------
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


def count_above_figure(
    analyses: Sequence[Analysis],
    labels: Sequence[str] | None = None,
    *,
    threshold: float | None = None,
    width: str | float = "column",
) -> Figure:
    """The count of σ > τ per layer (the BoRA/HiRA rank-validation figure): one series per checkpoint, one panel
    per module type (up to 8; more are averaged per layer, the range shaded); rank bounds dashed.

    ``threshold``: τ, which the analyses must have computed (default: their first threshold, 0.005).
    """
    from ..core.naming import block_of
    from .style import figure_width

    labels = check_labels(analyses, labels)
    tau = threshold if threshold is not None else analyses[0].options.thresholds[0]
    chosen = [[r for r in a.layers if r.valid] for a in analyses]
    everything = [r for records in chosen for r in records]
    if not everything:
        raise FigureInputError(f"{analyses[0].checkpoint.path}: no valid layer to draw")
    counts = {id(r): metric_value(r, "count_above", tau) for r in everything}
    modules = list(by_module(everything))
    facet = 1 < len(modules) <= MAX_FACETS
    positions, xlabel = block_positions(everything)

    def x_of(record: LayerRecord) -> int:
        return positions[block_of(record.name)]

    with paper_style():
        if facet:
            rows, _ = facet_grid(len(modules), width)
            fig = new_figure(width, (0.45 + 0.95 * rows) / figure_width(width))
            axes = _facets(fig, len(modules), width)
        else:
            fig = new_figure(width, 0.62)
            axes = [fig.subplots()]
        handles: dict[str, object] = {}
        guide_handles: dict[str, object] = {}
        all_bounds: set[int] = set()
        top = 1.0
        for ax, module in zip(axes, modules if facet else [None], strict=True):
            panel = [[r for r in records if module is None or r.module_type == module] for records in chosen]
            for i, (label, records) in enumerate(zip(labels, panel, strict=True)):
                if records:
                    line, highest = _count_series(ax, records, counts, x_of, i)
                    handles.setdefault(label, line)
                    top = max(top, highest)
            bounds = sorted({r.rank_bound for records in panel for r in records})
            all_bounds.update(bounds)
            top = max(top, *bounds)
            if len(bounds) <= 3:  # labelled in place on one panel, in the legend on small multiples
                for bound in bounds:
                    mark = guide_hline(ax, bound, "" if facet else f"r = {bound}", side="left", above=False)
                    guide_handles.setdefault("rank bound", mark)
            if facet:
                ax.set_title(module)
        for ax in axes:
            ax.set_ylim(0, top * 1.1)
            if len(all_bounds) <= 3 and top <= max(all_bounds):  # ticks at 0 and the rank bounds say it all
                ax.set_yticks(sorted({0, *all_bounds}))
            else:
                ax.yaxis.get_major_locator().set_params(integer=True)
            ax.xaxis.get_major_locator().set_params(integer=True)
        ylabel = f"count σ > {tau:g}"
        if facet:
            fig.supxlabel(xlabel)
            fig.supylabel(ylabel)
        else:
            axes[0].set_xlabel(xlabel)
            axes[0].set_ylabel(ylabel)
        what = None if facet or len(modules) == 1 else f"mean over {len(modules)} module types, range shaded"
        if len(handles) > 1 or what or facet:
            if facet:
                handles.update(guide_handles)
            legend_above(fig, list(handles.values()), list(handles), title=what)
    return fig
