"""The curve figures' machinery (spectrum and cumulative energy, ``spectra``): which panels and curves to draw,
each curve's median and quartiles over its layers, one y range for all the panels, and the drawing.

A curve's median at index i is over all of its layers: a layer's vector is taken past its end as the value it has
there (``CurveKind.fill``: σᵢ = 0 beyond a layer's numerical rank, a cumulative energy share of 1), so that
layers of a lower rank pull the tail down instead of dropping out of it. A zero layer (all σ = 0) is counted
(its σᵢ are 0) or, where its values are undefined (energy shares 0/0), left out; either way its curve's legend
entry says how many of its layers are zero, and where.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ._axes import (
    axes_given,
    check_axes,
    empty_note,
    facet_grid,
    facet_title,
    facets,
    integer_ticks,
    legend_above,
    new_figure,
    plain_log_axis,
    root_figure,
    style_for,
)
from ._common import (
    BAND_ALPHA,
    MAX_FACETS,
    MAX_LINES,
    FigureInputError,
    by_module,
    check_labels,
    ellipsize,
    quartiles,
    selected,
    short_name,
)
from .style import paper_style

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from ..analysis.records import Analysis, LayerRecord

MAX_BANDS = 3  # quartile bands are shaded only when at most this many curves share a panel
Summary = tuple[list[float], list[float], list[float]]  # lower quartile, median, upper quartile at each index


@dataclass(frozen=True)
class CurveKind:
    """What a curve figure draws: each record's vector (``values``) against its index from ``start``, on a log
    or linear scale; ``fill``: a vector's value past its end (``quartiles``); ``zero_counts``: whether a zero
    layer's vector is in the median (False: its values are undefined); ``extent``: an index the x axis must reach
    (rank bounds); ``fit``: the last index worth showing (where every curve has levelled off); ``name``: the public
    function, for errors."""

    name: str
    values: Callable[[LayerRecord], list[float]]
    start: int
    log: bool
    xlabel: str
    ylabel: str
    fill: float | str
    zero_counts: bool
    extent: Callable[[Panel], int] = lambda panel: 0
    fit: Callable[[Panel], int] | None = None


@dataclass
class Curve:
    """One drawn series: its label, its style index, how many layers it stands for (``layers``, of which
    ``zero`` have all σ = 0), the vectors in its median and that median with its quartiles (``summary``)."""

    label: str
    index: int
    layers: int
    zero: int
    vectors: list[list[float]]
    summary: Summary


@dataclass
class Panel:
    title: str | None
    curves: list[Curve]
    records: list[LayerRecord]


def is_zero(record: LayerRecord) -> bool:
    """A zero update: no singular value above 0 (its numerical rank is 0)."""
    return not any(v > 0 for v in record.singular_values)


def _curve(label: str, index: int, records: Sequence[LayerRecord], kind: CurveKind) -> Curve:
    zero = sum(is_zero(r) for r in records)
    vectors = [kind.values(r) for r in records if kind.zero_counts or not is_zero(r)]
    return Curve(label, index, len(records), zero, vectors, quartiles(vectors, kind.fill))


def plan(
    analyses: Sequence[Analysis], labels: list[str], layers, kind: CurveKind, *, one_panel: bool, per_module: bool
) -> list[Panel]:
    """The panels and curves to draw (``one_panel``: never one panel per module type; ``per_module``: always one
    panel per module type, one curve per checkpoint in each)."""
    chosen = [selected(a, layers) for a in analyses]
    if not any(chosen):
        raise FigureInputError(f"{analyses[0].checkpoint.path}: no valid layer to draw")
    everything = [r for records in chosen for r in records]
    if per_module:
        return [_module_panel(module, labels, chosen, kind) for module in by_module(everything)]
    if len(everything) <= MAX_LINES:
        curves, index = [], 0
        for label, records in zip(labels, chosen, strict=True):
            for record in records:
                if len(analyses) == 1:
                    name = short_name(record) if len(everything) > 1 else label
                else:
                    name = label if len({r.name for r in everything}) == 1 else f"{label}: {short_name(record)}"
                curves.append(_curve(name, index, [record], kind))
                index += 1
        title = everything[0].name if len({r.name for r in everything}) == 1 else None
        return [Panel(title, curves, everything)]
    if len(analyses) == 1:
        groups = by_module(chosen[0])
        if len(groups) <= MAX_LINES:
            curves = [_curve(module, i, rs, kind) for i, (module, rs) in enumerate(groups.items())]
        else:
            curves = [_curve(labels[0], 0, chosen[0], kind)]
        return [Panel(None, curves, chosen[0])]
    modules = list(by_module(everything))
    if 1 < len(modules) <= MAX_FACETS and not one_panel:
        return [_module_panel(module, labels, chosen, kind) for module in modules]
    curves = [_curve(label, i, rs, kind) for i, (label, rs) in enumerate(zip(labels, chosen, strict=True))]
    return [Panel(None, [c for c in curves if c.layers], everything)]


def _module_panel(module: str, labels: list[str], chosen: list[list[LayerRecord]], kind: CurveKind) -> Panel:
    """One module type's panel: each checkpoint's curve over its layers of that type (those that have any)."""
    records = [[r for r in rs if r.module_type == module] for rs in chosen]
    curves = [_curve(label, i, rs, kind) for i, (label, rs) in enumerate(zip(labels, records, strict=True))]
    return Panel(module, [c for c in curves if c.layers], [r for rs in records for r in rs])


def shaded(panel: Panel) -> bool:
    """Quartile bands are drawn where few curves share the panel and a curve summarises several layers."""
    return len(panel.curves) <= MAX_BANDS and any(len(c.vectors) > 1 for c in panel.curves)


def drawn_lines(panel: Panel, curve: Curve) -> list[list[float]]:
    """What is drawn of a curve: its median, and its quartiles where the panel shades them."""
    low, mid, high = curve.summary
    return [low, mid, high] if shaded(panel) and len(curve.vectors) > 1 else [mid]


def _summary(panels: list[Panel]) -> str | None:
    """The legend title: what a curve is, when it is not one layer's own (the median of n layers, shaded or not)."""
    counts = {c.layers for panel in panels for c in panel.curves}
    if counts <= {1}:
        return None
    what = f"median of {counts.pop()} layers" if len(counts) == 1 else "median over layers"
    return what + (", quartiles shaded" if any(shaded(p) for p in panels) else "")


def _legend_label(label: str, panels: list[Panel], kind: CurveKind) -> str:
    """``label``'s legend entry, saying how many of its layers are zero (all σ = 0) and in which panels: a zero
    layer draws nothing of its own on a log axis, and an energy median leaves it out."""
    curves = [(panel, c) for panel in panels for c in panel.curves if c.label == label]
    zero, layers = sum(c.zero for _, c in curves), sum(c.layers for _, c in curves)
    if not zero:
        return label
    if layers == 1:
        return f"{label} (all σ = 0)"
    note = f"{zero} layer{'s' if zero > 1 else ''} all σ = 0"
    where = [panel.title for panel, c in curves if c.zero and panel.title and len(panels) > 1]
    if where:
        note += f" in {len(where)} panels" if len(where) > 2 else " in " + ", ".join(ellipsize(w) for w in where)
    return f"{label} ({note}{'' if kind.zero_counts else ', left out'})"


def _positive(values: Sequence[float]) -> list[float]:
    """Log axes cannot show 0: exact zeros become gaps."""
    return [v if v > 0 else float("nan") for v in values]


def _draw_curve(ax: Axes, panel: Panel, curve: Curve, *, start: int, log: bool, floor: float):
    """The median line and, where shaded, the quartile band; on a log axis a zero median is a gap (fewer than half
    the layers have a σᵢ above 0 there) and a zero lower quartile takes the band down to ``floor``, the axis'
    bottom."""
    low, mid, high = curve.summary
    xs = list(range(start, start + len(mid)))
    style = style_for(curve.index, len(xs))
    (line,) = ax.plot(xs, _positive(mid) if log else mid, label=curve.label, zorder=3, **style)
    if len(drawn_lines(panel, curve)) > 1:
        lower = [v if v > 0 else floor for v in low] if log else low
        ax.fill_between(xs, lower, _positive(high) if log else high, color=style["color"], alpha=BAND_ALPHA,
                        linewidth=0, zorder=2)  # fmt: skip
    return line


def curve_figure(
    kind: CurveKind,
    limits: Callable[[list[Panel]], tuple[float, float]],
    guides: Callable[[Axes, Panel, bool], dict],
    analyses: Sequence[Analysis],
    labels: Sequence[str] | None,
    layers,
    width,
    ax,
    per_module: bool = False,
) -> Figure:
    """Draw the planned panels of ``kind`` into a new figure or the caller's axes, every panel over the same y
    range (``limits`` of all the panels: they share the axis); ``guides`` marks a panel's reference lines
    (labelled in place when the figure has one panel) and returns their legend handles."""
    start, log, extent, fit = kind.start, kind.log, kind.extent, kind.fit
    labels = check_labels(analyses, labels)
    given = axes_given(ax)
    one_panel = given is not None and len(given) == 1 and not per_module
    panels = plan(analyses, labels, layers, kind, one_panel=one_panel, per_module=per_module)
    what = _summary(panels)
    bottom, top = limits(panels)
    with paper_style():
        if given is not None:
            axes = check_axes(given, len(panels), kind.name)
            fig = root_figure(axes[0])
        elif len(panels) == 1:
            fig = new_figure(width, 0.68)
            axes = [fig.subplots()]
        else:
            rows, _ = facet_grid(len(panels), width)
            from .style import figure_width

            fig = new_figure(width, (0.45 + 1.0 * rows) / figure_width(width))
            axes = facets(fig, len(panels), width)
        handles: dict[str, object] = {}
        guide_handles: dict[str, object] = {}
        longest = 2 - start  # at least one point on the axis
        for panel_ax, panel in zip(axes, panels, strict=True):
            for curve in panel.curves:
                line = _draw_curve(panel_ax, panel, curve, start=start, log=log, floor=bottom)
                handles.setdefault(curve.label, line)
                longest = max(longest, len(curve.summary[1]))
            longest = max(longest, extent(panel))
            if log:
                panel_ax.set_yscale("log")
            panel_ax.set_ylim(bottom, top)
            # one panel: guides labelled in place; small panels: labelled once, in the legend
            marks = guides(panel_ax, panel, len(panels) == 1)
            if panel_ax is axes[0] and len(panels) > 1:
                guide_handles = marks
            if all(is_zero(r) for r in panel.records):
                empty_note(panel_ax, "all singular values are 0")
            if panel.title and len(panels) > 1:
                facet_title(panel_ax, panel.title, width, len(panels))
        last = longest - 1 + start
        if fit is not None:
            last = max(start + 1, min(last, max(fit(panel) for panel in panels)))
        for panel_ax in axes:
            if log:
                plain_log_axis(panel_ax.yaxis)
            if last > 100:  # full dense spectra: log index, labelled 1, 10, 100
                from matplotlib.ticker import FuncFormatter

                panel_ax.set_xscale("log")
                panel_ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
                panel_ax.xaxis.set_minor_formatter(FuncFormatter(lambda value, _: ""))
                panel_ax.set_xlim(right=last * 1.05)
            else:
                integer_ticks(panel_ax.xaxis, last, start=start, most=6 if len(panels) > 1 else 9)
                panel_ax.set_xlim(start - 0.4, last + 0.4)
        if len(panels) == 1 or given is not None:
            for panel_ax in axes:
                panel_ax.set_xlabel(kind.xlabel)
            axes[0].set_ylabel(kind.ylabel)
            if panels[0].title and len(panels) == 1:
                axes[0].set_title(panels[0].title, fontsize=7, loc="left")
        else:
            fig.supxlabel(kind.xlabel)
            fig.supylabel(kind.ylabel)
        noted = [_legend_label(label, panels, kind) for label in handles]
        if len(handles) > 1 or what or noted != list(handles):
            guide_labels = [label for label in guide_handles if label not in handles]
            legend_above(fig, [*handles.values(), *(guide_handles[g] for g in guide_labels)], [*noted, *guide_labels],
                         title=what, axes=given)  # fmt: skip
    return fig
