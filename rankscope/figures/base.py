"""Figures of updates against their base weights (``--base``): the relative update ‖ΔW‖_F/‖W₀‖_F and the intruder
counts per layer as heatmaps (layer index × module type), and σ(ΔW) against σ(W₀) for one layer.

They draw the records' ``base`` objects (``analysis.against_base``) and compute nothing new; W₀'s full spectrum,
which records do not hold, is given by the caller (``analysis.against_base.weight_spectrum``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from ._axes import axes_given, check_axes, new_figure, plain_log_axis, root_figure
from ._common import FigureInputError, check_labels, ellipsize
from .heatmaps import Block, draw_heatmaps, layer_columns, layer_matrix
from .style import paper_style, series_style

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from ..analysis.records import Analysis, LayerRecord

BASE_PANELS = (
    ("relative_update", "‖ΔW‖ / ‖W₀‖ (Frobenius)"),
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
    analyses: Analysis | Sequence[Analysis],
    labels: Sequence[str] | None = None,
    *,
    width: str | float = "column",
    ax: Sequence[Axes] | None = None,
) -> Figure:
    """Two heatmaps, one cell per layer (layer index across, module type down): the relative update
    ‖ΔW‖_F/‖W₀‖_F and the count of intruder dimensions (of the top k); grey cells have no value (no base weight,
    intruders not computed, an invalid layer).

    ``analyses``: one analysis, or several — then each measure is a block of panels, one per checkpoint (titled
    by ``labels``), on one colour scale with one colour bar (0 … the largest relative update of any checkpoint;
    0 … k for intruders). ``ax``: two Axes per checkpoint (all relative-update panels, then all intruder
    panels) to draw into; by default a new figure of ``width``."""
    analyses = [analyses] if hasattr(analyses, "layers") else list(analyses)
    labels = check_labels(analyses, labels)
    measured = [[r for r in a.layers if r.valid and r.base is not None] for a in analyses]
    for analysis, records in zip(analyses, measured, strict=True):
        if not records:
            raise FigureInputError(
                f"{analysis.checkpoint.path}: no layer was measured against W₀: give base (the base model) when "
                "reading the checkpoint",
                argument="base",
            )
    modules, positions, columns, column_of, xlabel = layer_columns([r for a in analyses for r in a.layers])
    every = [r for records in measured for r in records]
    top_k = max((r.base["intruders"]["top_k"] for r in every if r.base["intruders"] is not None), default=None)
    several = len(analyses) > 1
    blocks = []
    for key, title in BASE_PANELS:
        matrices = [
            layer_matrix(records, modules, positions, column_of, lambda r, key=key: _base_value(r, key))
            for records in measured
        ]
        high = max((v for m in matrices for row in m for v in row if v is not None), default=1.0)
        if key == "intruders":
            high = float(top_k or high or 1.0)
        title += f" (of the top {top_k})" if key == "intruders" and top_k else ""
        fmt = ".0f" if key == "intruders" or high >= 10 else ".2g"
        # one checkpoint: each panel is titled by its measure; several: by checkpoint, the colour bar by measure
        titles, name = (labels, title) if several else ([title], "")
        blocks.append(Block(matrices, titles, 0.0, high if high > 0 else 1.0, name, fmt, key == "intruders"))
    return draw_heatmaps(blocks, modules, columns, xlabel, width=width, given=axes_given(ax),
                         what="base_heatmap_figure")  # fmt: skip


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
        plain_log_axis(panel_ax.yaxis)
        panel_ax.set_xlabel("index i")
        panel_ax.set_ylabel("singular value σᵢ")
        panel_ax.set_title(ellipsize(record.name, 48), fontsize=7, loc="left")
        panel_ax.legend(frameon=False)
    return fig


__all__ = ["BASE_PANELS", "base_heatmap_figure", "base_spectrum_figure"]
