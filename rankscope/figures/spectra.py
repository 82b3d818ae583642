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
    BAND_ALPHA,
    MAX_BOUND_LINES,
    MAX_FACETS,
    MAX_LINES,
    FigureInputError,
    axes_given,
    by_module,
    check_axes,
    check_labels,
    cumulative_energy,
    empty_note,
    facet_grid,
    facets,
    guide_hline,
    guide_vline,
    integer_ticks,
    legend_above,
    new_figure,
    plain_log_axis,
    quartiles,
    root_figure,
    saturation_extent,
    selected,
    short_name,
    significant,
    style_for,
)
from .style import GUIDE_COLOR, paper_style

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from ..analysis.records import Analysis, LayerRecord

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


def _plan(
    analyses: Sequence[Analysis], labels: list[str], layers, values: Callable, *, one_panel: bool, per_module: bool
) -> list[Panel]:
    """The panels and curves to draw (``one_panel``: never one panel per module type; ``per_module``: always one
    panel per module type, one curve per checkpoint in each)."""
    chosen = [selected(a, layers) for a in analyses]
    if not any(chosen):
        raise FigureInputError(f"{analyses[0].checkpoint.path}: no valid layer to draw")
    everything = [r for records in chosen for r in records]
    if per_module:
        return [_module_panel(module, labels, chosen, values) for module in by_module(everything)]
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
        return [Panel(title, curves, everything)]
    if len(analyses) == 1:
        groups = by_module(chosen[0])
        if len(groups) <= MAX_LINES:
            curves = [Curve(module, i, [values(r) for r in rs]) for i, (module, rs) in enumerate(groups.items())]
        else:
            curves = [Curve(labels[0], 0, [values(r) for r in chosen[0]])]
        return [Panel(None, curves, chosen[0])]
    modules = list(by_module(everything))
    if 1 < len(modules) <= MAX_FACETS and not one_panel:
        return [_module_panel(module, labels, chosen, values) for module in modules]
    curves = [
        Curve(label, i, [values(r) for r in rs]) for i, (label, rs) in enumerate(zip(labels, chosen, strict=True))
    ]
    return [Panel(None, [c for c in curves if c.vectors], everything)]


def _module_panel(module: str, labels: list[str], chosen: list[list[LayerRecord]], values: Callable) -> Panel:
    """One module type's panel: each checkpoint's curve over its layers of that type (those that have any)."""
    records = [[r for r in rs if r.module_type == module] for rs in chosen]
    curves = [
        Curve(label, i, [values(r) for r in rs]) for i, (label, rs) in enumerate(zip(labels, records, strict=True))
    ]
    return Panel(module, [c for c in curves if c.vectors], [r for rs in records for r in rs])


def _shaded(panel: Panel) -> bool:
    """Quartile bands are drawn where few curves share the panel and a curve summarises several layers."""
    return len(panel.curves) <= MAX_BANDS and any(len(c.vectors) > 1 for c in panel.curves)


def _summary(panels: list[Panel]) -> str | None:
    """The legend title: what a curve is, when it is not one layer's own (the median of n layers, shaded or not)."""
    counts = {len(c.vectors) for panel in panels for c in panel.curves}
    if counts <= {1}:
        return None
    what = f"median of {counts.pop()} layers" if len(counts) == 1 else "median over layers"
    return what + (", quartiles shaded" if any(_shaded(p) for p in panels) else "")


def _positive(values: Sequence[float]) -> list[float]:
    """Log axes cannot show 0: exact zeros become gaps."""
    return [v if v > 0 else float("nan") for v in values]


def _draw_curve(ax: Axes, curve: Curve, *, start: int, log: bool, bands: bool, fill: float | str | None):
    low, mid, high = quartiles(curve.vectors, fill)
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


@dataclass(frozen=True)
class CurveKind:
    """What a curve figure draws: each record's vector (``values``) against its index from ``start``, on a log
    or linear scale; ``extent``: an index the x axis must reach (rank bounds); ``fit``: the last index worth
    showing (where every curve has levelled off); ``name``: the public function, for errors."""

    name: str
    values: Callable[[LayerRecord], list[float]]
    start: int
    log: bool
    xlabel: str
    ylabel: str
    extent: Callable[[Panel], int] = lambda panel: 0
    fit: Callable[[Panel], int] | None = None
    fill: float | str | None = None  # what a layer's shorter vector holds past its end (``quartiles``)


def _curve_figure(
    kind: CurveKind,
    guides: Callable[[Axes, Panel, bool], dict],
    analyses: Sequence[Analysis],
    labels: Sequence[str] | None,
    layers,
    width,
    ax,
    per_module: bool = False,
) -> Figure:
    """Draw the planned panels of ``kind`` into a new figure or the caller's axes; ``guides`` marks a panel's
    reference lines (labelled in place when the figure has one panel) and returns their legend handles."""
    values, start, log, extent, fit = kind.values, kind.start, kind.log, kind.extent, kind.fit
    xlabel, ylabel, name = kind.xlabel, kind.ylabel, kind.name
    labels = check_labels(analyses, labels)
    given = axes_given(ax)
    one_panel = given is not None and len(given) == 1 and not per_module
    panels = _plan(analyses, labels, layers, values, one_panel=one_panel, per_module=per_module)
    what = _summary(panels)
    with paper_style():
        if given is not None:
            axes = check_axes(given, len(panels), name)
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
        limits: list[tuple[float, float]] = []
        for panel_ax, panel in zip(axes, panels, strict=True):
            for curve in panel.curves:
                line = _draw_curve(panel_ax, curve, start=start, log=log, bands=_shaded(panel), fill=kind.fill)
                handles.setdefault(curve.label, line)
                longest = max(longest, max(len(v) for v in curve.vectors))
            longest = max(longest, extent(panel))
            if log:
                panel_ax.set_yscale("log")
            # one panel: guides labelled in place; small panels: labelled once, in the legend
            marks = guides(panel_ax, panel, len(panels) == 1)
            limits.append(panel_ax.get_ylim())  # each panel's own, before the next one's (shared) replace them
            if panel_ax is axes[0] and len(panels) > 1:
                guide_handles = marks
            if panel.title and len(panels) > 1:
                panel_ax.set_title(panel.title)
        if given is None and len(axes) > 1:  # the facets share their y axis: the union of every panel's limits
            lows, highs = zip(*limits, strict=True)
            axes[0].set_ylim(min(lows), max(highs))
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
                panel_ax.set_xlabel(xlabel)
            axes[0].set_ylabel(ylabel)
            if panels[0].title and len(panels) == 1:
                axes[0].set_title(panels[0].title, fontsize=7, loc="left")
        else:
            fig.supxlabel(xlabel)
            fig.supylabel(ylabel)
        if len(handles) > 1 or what:
            handles.update(guide_handles)
            legend_above(fig, list(handles.values()), list(handles), title=what, axes=given)
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


def _drawn_bounds(panel: Panel) -> list[int]:
    """The rank bounds marked in a panel: up to ``MAX_BOUND_LINES`` distinct ones (more would be a thicket of
    lines and would stretch the axis far past the data)."""
    bounds = sorted({r.rank_bound for r in panel.records})
    return bounds if len(bounds) <= MAX_BOUND_LINES else []


SPECTRUM = CurveKind(
    "spectrum_figure",
    significant,
    start=1,
    log=True,
    xlabel="index i",
    ylabel="singular value σᵢ",
    extent=lambda panel: max(_drawn_bounds(panel), default=0),  # the rank bounds drawn are in view
    fill=0.0,  # σᵢ beyond a layer's numerical rank (or its rank bound) are 0
)


def spectrum_figure(
    analyses: Sequence[Analysis],
    labels: Sequence[str] | None = None,
    *,
    layers: Sequence[str] | None = None,
    thresholds: Sequence[float] | None = None,
    width: str | float = "column",
    ax: Axes | Sequence[Axes] | None = None,
) -> Figure:
    """Singular values σ_i of each layer's ΔW against i, log scale, checkpoints overlaid.

    The absolute thresholds τ (``thresholds``; default: the analyses', 0.005 unless set) are dashed lines, the
    layers' rank bounds dotted verticals; numerically zero values (beyond each layer's numerical rank) are not
    drawn. ``layers``: names of the layers to draw (default: every valid layer, summarised as the module docstring
    says). ``ax``: draw into this Axes (one panel: the checkpoints' medians over all layers) or into one Axes per
    module-type panel, and return its figure; by default a new figure of ``width``.
    """
    return _spectrum(analyses, labels, layers, thresholds, width, ax, per_module=False)


def module_spectra_figure(
    analyses: Sequence[Analysis],
    labels: Sequence[str] | None = None,
    *,
    layers: Sequence[str] | None = None,
    thresholds: Sequence[float] | None = None,
    width: str | float = "full",
) -> Figure:
    """:func:`spectrum_figure` with one panel per module type whatever the number of checkpoints: in each panel,
    each checkpoint's median σ_i over its layers of that type (quartiles shaded when at most three curves share
    the panel), one legend. The report's per-module spectra, in one figure."""
    return _spectrum(analyses, labels, layers, thresholds, width, None, per_module=True)


def _spectrum(analyses, labels, layers, thresholds, width, ax, *, per_module: bool) -> Figure:
    if thresholds is None:
        thresholds = [t for a in analyses for t in a.options.thresholds]
    thresholds = sorted({float(t) for t in thresholds if t > 0})

    def guides(ax: Axes, panel: Panel, inline: bool) -> dict:
        bottom, top = _spectrum_limits(panel, thresholds)
        ax.set_ylim(bottom, top)
        marks = {}
        for tau in thresholds:  # labelled at the left: spectra fall from there, so the corner is empty
            marks[f"τ = {tau:g}"] = guide_hline(ax, tau, f"τ = {tau:g}" if inline else "", side="left")
        bounds = _drawn_bounds(panel)
        if bounds:
            for bound in bounds:
                marks["rank bound"] = guide_vline(ax, bound, f"r = {bound}" if inline else "")
        _zero_note(ax, panel, "as 0 in the median")
        return marks

    return _curve_figure(SPECTRUM, guides, analyses, labels, layers, width, ax, per_module)


def _zero_note(ax: Axes, panel: Panel, treated: str) -> None:
    """Say in the panel which of its layers are zero updates (every σ = 0): a log axis cannot draw them."""
    zero = [r for r in panel.records if not any(v > 0 for v in r.singular_values)]
    if not zero:
        return
    text = f"{short_name(zero[0])}: every σ is 0" if len(zero) == 1 else f"{len(zero)} layers: every σ is 0"
    if len(zero) == len(panel.records):
        empty_note(ax, text)
        return
    note = ax.text(0.97, 0.05, f"{text}\n({treated})", transform=ax.transAxes, ha="right", va="bottom",
                   fontsize=5, color=GUIDE_COLOR, linespacing=1.1)  # fmt: skip
    note.set_in_layout(False)  # the panels keep their size: the note sits inside one


# -- cumulative energy ------------------------------------------------------------------------------------
def _cumulative_energy(record: LayerRecord) -> list[float]:
    """0, then Σ_{j≤k} σ_j² / Σσ² for k = 1..K, K the numerical rank; empty for a zero update (its fractions are
    undefined: left out of the medians, and said in the panel)."""
    curve = cumulative_energy(significant(record))
    return [0.0, *curve] if curve else []


def _saturation(panel: Panel) -> int:
    """The last k worth showing: past where every drawn line (median, and the lower quartile where shaded) has
    levelled off (``saturation_extent``)."""
    lines = []
    for curve in panel.curves:
        low, mid, _ = quartiles(curve.vectors, ENERGY_FILL)
        lines.extend((mid, low) if _shaded(panel) else (mid,))
    return saturation_extent(lines, start=0)


ENERGY_FILL = "last"  # a curve that has reached 1 at its numerical rank stays there

ENERGY = CurveKind(
    "energy_figure",
    _cumulative_energy,
    start=0,
    log=False,
    xlabel="number of singular values k",
    ylabel="cumulative energy",
    fit=_saturation,
    fill=ENERGY_FILL,
)


def energy_figure(
    analyses: Sequence[Analysis],
    labels: Sequence[str] | None = None,
    *,
    layers: Sequence[str] | None = None,
    levels: Sequence[float] | None = None,
    width: str | float = "column",
    ax: Axes | Sequence[Axes] | None = None,
) -> Figure:
    """Cumulative energy Σ_{j≤k} σ_j² / Σσ² against k; the energy levels p dashed (``levels``; default: the
    analyses', 0.9 and 0.99 unless set; of more than two only the lowest and highest). The k axis ends a little
    past the last k at which a drawn curve is still below 0.999, not at the rank bound. ``layers`` and ``ax`` as
    for :func:`spectrum_figure`."""
    if levels is None:
        levels = [p for a in analyses for p in a.options.energies]
    elif any(not 0 < p <= 1 for p in levels):
        raise ValueError(f"levels: energy fractions must be in (0, 1], got {list(levels)}")
    levels = sorted({float(p) for p in levels})
    if len(levels) > 2:  # labels of close levels would collide: the lowest and highest say enough
        levels = [levels[0], levels[-1]]

    def guides(ax: Axes, panel: Panel, inline: bool) -> dict:
        ax.set_ylim(0, 1.04)
        _zero_note(ax, panel, "no fractions: left out")
        marks = {}
        for p in levels:  # labelled outside the right edge, like tick labels: curves crowd both ends inside
            marks["energy " + ", ".join(f"{100 * q:g}%" for q in levels)] = guide_hline(
                ax, p, f"{100 * p:g}%" if inline else "", side="outside"
            )
        return marks

    return _curve_figure(ENERGY, guides, analyses, labels, layers, width, ax)
