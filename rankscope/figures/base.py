"""Figures of updates against their base weights (``--base``): the relative update ‖ΔW‖_F/‖W₀‖_F and the intruder
counts per layer as heatmaps (layer index × module type), and σ(ΔW) against σ(W₀) for one layer.

They draw the records' ``base`` objects (``analysis.against_base``) and compute nothing new; W₀'s full spectrum,
which records do not hold, is given by the caller (``analysis.against_base.weight_spectrum``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from ._common import (
    FigureInputError,
    axes_given,
    block_of,
    block_positions,
    by_module,
    check_axes,
    ellipsize,
    new_figure,
    root_figure,
)
from .heatmaps import _annotate, _columns, _edges, _masked
from .style import MISSING_COLOR, SEQUENTIAL_CMAP, figure_width, paper_style, series_style

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from ..analysis.records import Analysis, LayerRecord

BASE_PANELS = (
    ("relative_update", "‖ΔW‖_F / ‖W₀‖_F"),
    ("intruders", "intruder dimensions"),
)


def _base_value(record: LayerRecord, key: str) -> float | None:
    base = record.base if record.valid else None
    if base is None:
        return None
    if key == "intruders":
        return float(base["intruders"]["count"]) if base["intruders"] is not None else None
    return base[key]


def base_heatmap_figure(
    analysis: Analysis, *, width: str | float = "column", ax: Sequence[Axes] | None = None
) -> Figure:
    """Two heatmaps, one cell per layer (layer index across, module type down): the relative update
    ‖ΔW‖_F/‖W₀‖_F and the count of intruder dimensions (of the top k); grey cells have no value (no base weight,
    intruders not computed, an invalid layer). ``ax``: two Axes to draw into; by default a new figure."""
    records = [record for record in analysis.layers if record.valid and record.base is not None]
    if not records:
        raise FigureInputError(f"{analysis.checkpoint.path}: no layer measured against a base (give --base)")
    modules = list(by_module(analysis.layers))
    positions, xlabel = block_positions(analysis.layers)
    columns = _columns(positions)
    column_of = {index: c for c, index in enumerate(columns)}
    top_k = max((r.base["intruders"]["top_k"] for r in records if r.base["intruders"] is not None), default=None)
    given = axes_given(ax)
    inches = figure_width(width)
    cell = (inches - 0.12 - 0.055 * max(len(m) for m in modules) - 0.75) / len(columns)
    with paper_style():
        if given is not None:
            axes = check_axes(given, len(BASE_PANELS), "base_heatmap_figure")
            fig = root_figure(axes[0])
        else:
            height = 0.9 + 2 * (0.17 * len(modules) + 0.22)
            fig = new_figure(width, min(height, 9.0) / inches)
            axes = list(fig.subplots(len(BASE_PANELS), 1, sharex=True, squeeze=False)[:, 0])
        for panel_ax, (key, title) in zip(axes, BASE_PANELS, strict=True):
            matrix: list[list[float | None]] = [[None] * len(columns) for _ in modules]
            for record in records:
                column = column_of.get(positions[block_of(record.name)])
                if column is not None:
                    matrix[modules.index(record.module_type)][column] = _base_value(record, key)
            values = [v for row in matrix for v in row if v is not None]
            high = max(values, default=1.0)
            if key == "intruders":
                high = float(top_k or high or 1.0)
            panel_ax.set_facecolor(MISSING_COLOR)
            mesh = panel_ax.pcolormesh(
                _edges(len(columns), -0.5), _edges(len(modules), -0.5), _masked(matrix),
                cmap=SEQUENTIAL_CMAP, vmin=0.0, vmax=high if high > 0 else 1.0, edgecolors="white", linewidth=0.4,
            )  # fmt: skip
            panel_ax.set_ylim(len(modules) - 0.5, -0.5)
            panel_ax.set_yticks(range(len(modules)), [ellipsize(m, 24) for m in modules])
            panel_ax.tick_params(axis="y", length=0)
            shown = range(0, len(columns), max(1, -(-len(columns) // 8)))  # at most about 8 labels
            panel_ax.set_xticks(list(shown), [str(columns[c]) for c in shown])
            for side in ("top", "right", "left", "bottom"):
                panel_ax.spines[side].set_visible(False)
            suffix = f" (of the top {top_k})" if key == "intruders" and top_k else ""
            panel_ax.set_title(title + suffix, fontsize=7, loc="left")
            if cell >= 0.22 and len(modules) <= 12:
                fmt = ".0f" if key == "intruders" or high >= 10 else ".2g"
                _annotate(panel_ax, matrix, mesh, fmt=fmt, xs=range(len(columns)), ys=range(len(modules)))
            colorbar = fig.colorbar(mesh, ax=panel_ax, fraction=0.05, pad=0.02)
            colorbar.outline.set_linewidth(0.4)
        axes[-1].set_xlabel(xlabel)
    return fig


def base_spectrum_figure(
    record: LayerRecord,
    weight_singular_values: Sequence[float],
    *,
    width: str | float = "column",
    ax: Axes | None = None,
) -> Figure:
    """σ_i(ΔW) (the record's singular values) against σ_i(W₀) (``weight_singular_values``) of one layer, by
    index, on a log scale: where the update's spectrum sits under (or over) the weight's it changes."""
    update = [s for s in record.singular_values if s > 0]
    weight = [s for s in weight_singular_values if s > 0]
    if not record.valid or not update or not weight:
        raise FigureInputError(f"layer {record.name}: no nonzero singular values to draw")
    given = axes_given(ax)
    with paper_style():
        if given is not None:
            (panel_ax,) = check_axes(given, 1, "base_spectrum_figure")
            fig = root_figure(panel_ax)
        else:
            fig = new_figure(width, 0.7)
            panel_ax = fig.subplots()
        for index, (values, label) in enumerate(((weight, "σ(W₀)"), (update, "σ(ΔW)"))):
            style = series_style(index, marker=len(values) <= 64)
            panel_ax.plot(range(1, len(values) + 1), values, label=label, **style)
        panel_ax.set_yscale("log")
        panel_ax.set_xlabel("index i")
        panel_ax.set_ylabel("singular value σ_i")
        panel_ax.set_title(ellipsize(record.name, 48), fontsize=7, loc="left")
        panel_ax.legend(frameon=False)
    return fig


__all__ = ["BASE_PANELS", "base_heatmap_figure", "base_spectrum_figure"]
