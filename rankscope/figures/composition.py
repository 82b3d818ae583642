"""Composition figures: the weights and the energy shares of the components per layer, and how effective rank
grows with the number of components in a sequential (boosting) composition.

The energy shares ‖w_iΔW_i‖²/Σ_j‖w_jΔW_j‖² and the growth records are the analysis' own numbers
(``record.composition``); nothing is recomputed here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from ._axes import axes_given, check_axes, integer_ticks, legend_above, new_figure, root_figure, style_for
from ._common import MAX_LINES, FigureInputError, by_module, ellipsize, metric_from, parse_metric, quartiles, short_name
from .style import GUIDE_COLOR, HATCHES, figure_width, paper_style, series_colour

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from ..analysis.records import Analysis, LayerRecord

MAX_BARS = 48  # more composed layers than this are drawn as stacked areas instead of bars
MAX_NAMED_TICKS = 24  # up to this many layers are named one by one on the axis


def composed_records(analysis: Analysis, kind: str) -> list[LayerRecord]:
    """The composed layers (weights and energy shares known), or an error saying what ``kind`` needs."""
    records = [r for r in analysis.layers if r.valid and r.composition is not None]
    if not records:
        raise FigureInputError(
            f"{analysis.checkpoint.path}: no composed layers ({analysis.checkpoint.adapter_type}): {kind} needs a "
            "composition (a composition.json manifest, adapters read with compose, or a BoostLoRA checkpoint)",
            argument="compose",
        )
    return records


def _component_names(records: list[LayerRecord]) -> list[str]:
    """Component labels in order of first appearance across layers."""
    names: list[str] = []
    for record in records:
        for component in record.components or []:
            if component.name not in names:
                names.append(component.name)
    return names


def _layer_axis(ax: Axes, records: list[LayerRecord]) -> None:
    """Name each layer when there are few; else tick the first layer of every few blocks with its index."""
    count = len(records)
    if count <= MAX_NAMED_TICKS:
        ax.set_xticks(range(count), [ellipsize(short_name(r), 16) for r in records], rotation=90)
        ax.set_xlabel("layer")
        return
    indices = [r.layer_index for r in records]
    firsts = [i for i, index in enumerate(indices) if index is not None and (i == 0 or indices[i - 1] != index)]
    if not firsts:
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_xlabel("composed layer (model order)")
        return
    step = max(1, -(-len(firsts) // 10))
    shown = firsts[::step]
    ax.set_xticks(shown, [str(indices[i]) for i in shown])
    ax.set_xlabel("layer index (its modules in model order)")


def _weight_ticks(ax: Axes, weights: list[float]) -> None:
    """A y range from 0 (drawn) past the weights, with round ticks enough to read them: 0, 0.1, 0.2, 0.3, 0.4
    for weights near 0.33, not 0 and 0.2 only."""
    from matplotlib.ticker import MaxNLocator

    low, high = min(0.0, *weights), max(0.0, *weights)
    if high - low <= 0:
        high = 1.0
    locator = MaxNLocator(nbins=5, steps=[1, 2, 2.5, 5, 10])
    ticks = locator.tick_values(low, high)  # round values from at or below low to at or above high
    ax.yaxis.set_major_locator(locator)
    pad = 0.06 * (high - low)  # markers on the extreme weights stay whole
    ax.set_ylim(min(ticks[0], low - pad) if low < 0 else 0.0, max(ticks[-1], high + pad))


def weights_figure(analysis: Analysis, *, width: str | float = "full", ax: Sequence[Axes] | None = None) -> Figure:
    """Per composed layer: the applied weights w_i (top) and the energy shares ‖w_iΔW_i‖²/Σ_j‖w_jΔW_j‖²
    stacked to 1 (bottom), one colour and hatch per component. ``ax``: two Axes (weights, shares) to draw into,
    whose figure is returned; by default a new figure of ``width``."""
    records = composed_records(analysis, "the weights figure")
    names = _component_names(records)
    count = len(records)
    xs = list(range(count))
    weights = {name: [None] * count for name in names}
    shares = {name: [0.0] * count for name in names}
    for x, record in enumerate(records):
        fields = record.composition
        values = fields["energy_shares"]["values"] or [0.0] * len(record.components)
        for component, weight, share in zip(record.components, fields["weights"]["normalized"], values, strict=True):
            weights[component.name][x] = weight
            shares[component.name][x] = share
    inches = figure_width(width)
    tick_room = 0.75 if count <= MAX_NAMED_TICKS else 0.25
    given = axes_given(ax)
    with paper_style():
        if given is not None:
            top, bottom = check_axes(given, 2, "weights_figure")
            fig = root_figure(top)
        else:
            fig = new_figure(width, (2.7 + tick_room) / inches)
            top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(1, 1.25))
        lines = []
        for i, name in enumerate(names):
            style = style_for(i, count)
            present = [(x, w) for x, w in zip(xs, weights[name], strict=True) if w is not None]
            if count == 1:
                style["linestyle"] = "none"
            lines.extend(top.plot([x for x, _ in present], [w for _, w in present], zorder=3, **style))
        top.axhline(0, color=GUIDE_COLOR, linewidth=0.5, zorder=1)
        _weight_ticks(top, [w for ws in weights.values() for w in ws if w is not None])
        top.set_ylabel("weight wᵢ")
        stack = [0.0] * count
        handles = []
        for i, name in enumerate(names):
            color, hatch = series_colour(i), HATCHES[i % len(HATCHES)]
            upper = [s + v for s, v in zip(stack, shares[name], strict=True)]
            if count <= MAX_BARS:
                handle = bottom.bar(xs, shares[name], bottom=stack, width=0.8, facecolor=color, hatch=hatch,
                                    edgecolor="white", linewidth=0.4)  # fmt: skip
            else:
                handle = bottom.fill_between(xs, stack, upper, step="mid", facecolor=color, hatch=hatch,
                                             edgecolor="white", linewidth=0.0)  # fmt: skip
            handles.append((handle if count > MAX_BARS else handle.patches[0], lines[i]))  # swatch and line
            stack = upper
        bottom.set_ylim(0, 1)
        bottom.set_xlim(-0.6, count - 0.4)
        bottom.set_ylabel("energy share")
        top.tick_params(labelbottom=False)
        _layer_axis(bottom, records)
        names = [ellipsize(n, 20) for n in names]
        legend_above(fig, handles, names, title="component", wide=True, axes=given)
    return fig


def growth_figure(
    analysis: Analysis, *, metric: str = "erank", width: str | float = "column", ax: Axes | None = None
) -> Figure:
    """Sequential compositions: ``metric`` (default erank) of Σ_{i≤t} w_iΔW_i against the number of components
    t, per module type (median over layers, quartiles shaded for few types) or per layer when few; the rank
    bound min(Σ_{i≤t} r_i, m, n) dotted. ``ax``: the Axes to draw into, whose figure is returned."""
    records = [r for r in composed_records(analysis, "the growth figure") if "growth" in r.composition]
    if not records:
        raise FigureInputError(
            f'{analysis.checkpoint.path}: the growth figure needs a sequential composition (mode "sequential")'
        )
    key, parameter, name = parse_metric(metric, analysis)

    def curve(record: LayerRecord) -> list[float]:
        return [metric_from(step["metrics"], key, parameter) for step in record.composition["growth"]]

    if len(records) <= 6:
        series = [(short_name(r) if len(records) > 1 else r.name, [curve(r)]) for r in records]
        what = None
    else:
        groups = by_module(records)
        if len(groups) <= MAX_LINES:
            series = [(module, [curve(r) for r in rs]) for module, rs in groups.items()]
        else:
            series = [("all layers", [curve(r) for r in records])]
        what = "median over layers" + (", quartiles shaded" if len(series) <= 3 else "")
    bounds = quartiles([[step["rank_bound"] for step in r.composition["growth"]] for r in records])[1]
    steps = max(len(r.composition["growth"]) for r in records)
    given = axes_given(ax)
    with paper_style():
        if given is not None:
            (ax,) = check_axes(given, 1, "growth_figure")
            fig = root_figure(ax)
        else:
            fig = new_figure(width, 0.7)
            ax = fig.subplots()
        handles, labels = [], []
        for i, (label, vectors) in enumerate(series):
            low, mid, high = quartiles(vectors)
            ts = list(range(1, len(mid) + 1))
            style = style_for(i, len(ts))
            (line,) = ax.plot(ts, mid, zorder=3, label=label, **style)
            if len(vectors) > 1 and len(series) <= 3:
                ax.fill_between(ts, low, high, color=style["color"], alpha=0.18, linewidth=0, zorder=2)
            handles.append(line)
            labels.append(ellipsize(label, 24))
        if key in ("erank", "erank_energy", "stable_rank", "participation_ratio", "numerical_rank", "count_above",
                   "count_above_rel", "energy_rank"):  # fmt: skip
            (line,) = ax.plot(range(1, len(bounds) + 1), bounds, color=GUIDE_COLOR, linewidth=0.8,
                              linestyle=(0, (1, 1.5)), zorder=1, label="rank bound")  # fmt: skip
            handles.append(line)
            labels.append("rank bound")
        integer_ticks(ax.xaxis, steps)
        ax.set_xlim(0.7, steps + 0.3)
        ax.set_ylim(bottom=0)
        ax.set_xlabel("components t")
        ax.set_ylabel(name)
        if len(records) == 1:
            ax.set_title(records[0].name, fontsize=7, loc="left")
        legend_above(fig, handles, labels, title=what, axes=given)
    return fig


__all__ = ["growth_figure", "weights_figure"]
