"""Heatmaps of compositions: the k×k alignment of a composition's components and the LoRA paper's
subspace-similarity grid φ(i, j) (moved from ``heatmaps``, which draws the layer × module-type heatmaps).

Cells are vector patches (``pcolormesh``); values are written in the cells when they hold 7 pt text.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ._axes import axes_given, check_axes, integer_ticks, new_figure, root_figure
from ._common import FigureInputError, ellipsize
from .heatmaps import MIN_ANNOTATED_CELL, _annotate, _edges, _masked
from .style import DIVERGING_CMAP, MISSING_COLOR, SEQUENTIAL_CMAP, figure_width, paper_style

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from ..analysis.records import LayerRecord


# -- alignment of components ------------------------------------------------------------------------------
ALIGNMENT_PANELS = (
    ("left_overlap", "left_baseline", "overlap\n(output space)"),
    ("right_overlap", "right_baseline", "overlap\n(input space)"),
    ("cosine", None, "update\ncosine"),
)


def alignment_figure(
    record: LayerRecord,
    *,
    width: str | float = "column",
    labels: Sequence[str] | None = None,
    ax: Sequence[Axes] | None = None,
) -> Figure:
    """For a composed layer (or any object with ``.alignment`` and ``.name``, such as a compared layer): k×k
    heatmaps of the projection overlap of the output (left) and input (right) singular subspaces, with their
    random baseline, and of the exact update cosine. ``labels``: component names (default: the components').

    Rows are named ``1: name``; columns, in the same order, by number. ``ax``: three Axes (output overlap, input
    overlap, cosine) to draw into, whose figure is returned; by default a new figure of ``width``.
    """
    from ..measures.components import off_diagonal_mean

    alignment = getattr(record, "alignment", None)
    if not alignment:
        raise FigureInputError(f"layer {record.name} has no alignment: it is not a composition of components")
    k = len(alignment["cosine"])
    if labels is None:
        components = getattr(record, "components", None) or []
        labels = [c.name for c in components] if len(components) == k else [str(i + 1) for i in range(k)]
    if len(labels) != k:
        raise FigureInputError(f"{len(labels)} labels for {k} components")
    names = [f"{i + 1}: {ellipsize(str(s), 14)}" for i, s in enumerate(labels)]
    inches = figure_width(width)
    label_room = 0.1 + 0.055 * max(len(n) for n in names)
    panel = (inches - label_room - 0.2) / 3.15
    given = axes_given(ax)
    with paper_style():
        if given is not None:
            axes = check_axes(given, len(ALIGNMENT_PANELS), "alignment_figure")
            fig = root_figure(axes[0])
        else:
            fig = new_figure(width, (panel + 1.2) / inches)
            # not shared: the inner panels get no y ticks at all (shared, each held every row's hidden label and
            # a zero-length mark, measured in every layout pass and draw); the rows are named on the first
            axes = list(fig.subplots(1, 3))
        mesh = None
        for ax, (key, baseline_key, title) in zip(axes, ALIGNMENT_PANELS, strict=True):
            named = given is not None or ax is axes[0]  # a caller's panels each keep their row names
            matrix = alignment[key]
            mesh = ax.pcolormesh(
                _edges(k, -0.5), _edges(k, -0.5), _masked(matrix), cmap=DIVERGING_CMAP, vmin=-1, vmax=1,
                edgecolors="white", linewidth=0.5,
            )  # fmt: skip
            ax.set_facecolor(MISSING_COLOR)
            ax.set_aspect("equal")
            ax.set_ylim(k - 0.5, -0.5)
            ax.set_title(title, fontsize=7)
            step = max(1, math.ceil(k / 8))
            ax.set_xticks(range(0, k, step), [str(i + 1) for i in range(0, k, step)])
            ax.set_yticks(range(0, k, step) if named else [], names[::step] if named else [])
            ax.tick_params(length=0)
            for side in ax.spines.values():
                side.set_visible(False)
            if panel / k >= MIN_ANNOTATED_CELL:
                _annotate(ax, matrix, mesh, fmt=".2f", xs=range(k), ys=range(k))
            baseline = off_diagonal_mean(alignment[baseline_key]) if baseline_key else None
            if baseline is not None:
                ax.set_xlabel(f"random ≈ {baseline:.2g}", fontsize=7)
        colorbar = fig.colorbar(mesh, ax=list(axes), orientation="horizontal", fraction=0.06, aspect=40, pad=0.03)
        colorbar.outline.set_linewidth(0.4)
        colorbar.set_ticks([-1, -0.5, 0, 0.5, 1])
        colorbar.set_label("overlap or cosine (1: aligned, 0: orthogonal)", fontsize=7)
        if given is None:
            fig.suptitle(record.name, fontsize=7)
        else:  # the caller's figure may hold more than this layer
            axes[0].set_title(f"{record.name}\n{ALIGNMENT_PANELS[0][2]}", fontsize=7)
    return fig


# -- subspace similarity ----------------------------------------------------------------------------------
def subspace_similarity_figure(
    grid, labels: Sequence[str], *, width: str | float = "column", title: str | None = None, ax: Axes | None = None
) -> Figure:
    """The LoRA paper's φ(i, j) = ‖U_iᵀV_j‖_F²/min(i, j) grid (from ``components.subspace_similarity_grid``):
    i over the top-i directions of the first update (down), j over the second's (across), 0 to 1. ``ax``: the
    Axes to draw into, whose figure is returned; by default a new figure of ``width``."""
    import numpy as np

    values = np.asarray(grid, dtype=float)
    if values.ndim != 2 or values.size == 0:
        raise FigureInputError("empty φ grid: one of the updates is zero (it has no singular directions)")
    if len(labels) != 2:
        raise FigureInputError(f"subspace similarity needs two labels, got {len(labels)}")
    rows, columns = values.shape
    inches = figure_width(width)
    plot_width = inches - 1.25
    box = min(1.0, max(0.3, rows / columns))
    given = axes_given(ax)
    with paper_style():
        if given is not None:
            (ax,) = check_axes(given, 1, "subspace_similarity_figure")
            fig = root_figure(ax)
            plot_width = ax.get_position().width * fig.get_figwidth()
        else:
            fig = new_figure(width, (plot_width * box + 0.62 + (0.15 if title else 0)) / inches)
            ax = fig.subplots()
        mesh = ax.pcolormesh(_edges(columns), _edges(rows), values, cmap=SEQUENTIAL_CMAP, vmin=0, vmax=1,
                             linewidth=0, rasterized=False)  # fmt: skip
        ax.set_ylim(rows + 0.5, 0.5)
        ax.set_box_aspect(box)
        integer_ticks(ax.xaxis, columns)
        integer_ticks(ax.yaxis, rows)
        ax.tick_params(length=2)
        ax.set_xlabel(f"j: top-j directions of {ellipsize(str(labels[1]), 28)}")
        ax.set_ylabel(f"i: top-i of {ellipsize(str(labels[0]), 20)}")
        for side in ax.spines.values():
            side.set_visible(False)
        if plot_width / columns >= MIN_ANNOTATED_CELL and plot_width * box / rows >= 0.15:
            _annotate(ax, values.tolist(), mesh, fmt=".2f", xs=range(1, columns + 1), ys=range(1, rows + 1))
        # the colour bar as tall as the grid, whatever the grid's shape
        colorbar = fig.colorbar(mesh, cax=ax.inset_axes((1.0 + 0.06 / plot_width, 0.0, 0.08 / plot_width, 1.0)))
        colorbar.set_label("φ(i, j)")
        colorbar.outline.set_linewidth(0.4)
        if title:
            ax.set_title(title, fontsize=7, loc="left")
    return fig
