"""Heatmaps: a metric over layer index × module type, the k×k alignment of a composition's components, and the
LoRA paper's subspace-similarity grid φ(i, j).

Cells are vector patches (``pcolormesh``), so PDFs and SVGs stay vector; values are written in the cells when
the cells are large enough to hold 7 pt text, which also keeps the figures readable in black and white.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ._common import (
    FigureInputError,
    axes_given,
    block_of,
    block_positions,
    by_module,
    check_axes,
    check_labels,
    ellipsize,
    integer_ticks,
    metric_value,
    new_figure,
    parse_metric,
    root_figure,
)
from .style import DIVERGING_CMAP, MISSING_COLOR, SEQUENTIAL_CMAP, figure_width, paper_style

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from ..analysis.records import Analysis, LayerRecord

MIN_ANNOTATED_CELL = 0.22  # inches: a cell this wide holds "0.12" at 7 pt


def _annotate(ax: Axes, matrix, mesh, *, fmt: str, xs: Sequence[float], ys: Sequence[float]) -> None:
    """Write each defined value in its cell, dark text on light cells and white on dark ones: one
    :class:`~._cells.CellLabels` artist for the whole panel, not a Text per cell (half of a heatmap's drawing)."""
    from ._cells import CellLabels

    cmap, norm = mesh.get_cmap(), mesh.norm
    cells: tuple[list, list, list, list] = ([], [], [], [])
    for row, y in enumerate(ys):
        for column, x in enumerate(xs):
            value = matrix[row][column]
            if value is None or not math.isfinite(value):
                continue
            r, g, b, _ = cmap(norm(value))
            luminance = 0.2126 * r + 0.7152 * g + 0.0722 * b
            colour = "black" if luminance > 0.45 else "white"
            for part, item in zip(cells, (x, y, format(value, fmt), colour), strict=True):
                part.append(item)
    if cells[0]:
        ax.add_artist(CellLabels(*cells, fontsize=7, transform=ax.transData))


def _edges(count: int, start: float = 0.5) -> list[float]:
    return [start + i for i in range(count + 1)]


def _masked(matrix: Sequence[Sequence[float | None]]):
    import numpy as np

    values = np.array([[math.nan if v is None else float(v) for v in row] for row in matrix], dtype=float)
    return np.ma.masked_invalid(values)


# -- metric heatmap ---------------------------------------------------------------------------------------
def _columns(positions: dict[str, int]) -> list[int]:
    """Columns to draw: every index from the first to the last (gaps shown as missing) unless mostly gaps."""
    present = sorted(set(positions.values()))
    span = list(range(present[0], present[-1] + 1))
    return span if len(span) <= 2 * len(present) else present


# metrics on a rank scale: their colours run from 0 to the largest rank bound drawn, so equal colours mean equal
# ranks in every panel; utilisation is a share (0–1); the others (σ₁, ‖ΔW‖_F, Σσ²) run from 0 to their largest value
_RANK_SCALED = frozenset(
    {"erank", "erank_energy", "stable_rank", "participation_ratio", "numerical_rank", "count_above",
     "count_above_rel", "energy_rank"}
)  # fmt: skip


def heatmap_limits(analyses: Sequence[Analysis], metric: str = "erank") -> tuple[float, float]:
    """The colour range of ``metric`` by its meaning, shared by every analysis given: utilisation 0–1; rank-like
    metrics 0 … the largest rank bound; others 0 … the largest value. Pass it to every panel of one report."""
    key, parameter, _ = parse_metric(metric, analyses[0])
    if key == "utilization":
        return 0.0, 1.0
    valid = [record for analysis in analyses for record in analysis.layers if record.valid]
    if not valid:
        return 0.0, 1.0
    if key in _RANK_SCALED:
        high = float(max(record.rank_bound for record in valid))
    else:
        high = max(float(metric_value(record, key, parameter)) for record in valid)
    return 0.0, high if high > 0 else 1.0


def _metric_matrix(records, modules, positions, column_of, key, parameter) -> list[list[float | None]]:
    """Rows: module types; columns: blocks; None where the checkpoint has no valid layer."""
    return layer_matrix(records, modules, positions, column_of, lambda r: metric_value(r, key, parameter))


def layer_matrix(records, modules, positions, column_of, value: Callable) -> list[list[float | None]]:
    """``value(record)`` of each valid record at (its module type's row, its block's column); None elsewhere."""
    matrix: list[list[float | None]] = [[None] * len(column_of) for _ in modules]
    for record in records:
        column = column_of.get(positions[block_of(record.name)]) if record.valid else None
        if column is not None:
            matrix[modules.index(record.module_type)][column] = value(record)
    return matrix


@dataclass
class Block:
    """Heatmap panels drawn on one colour scale with one colour bar: one matrix per panel (rows: module types,
    columns: layer columns), each panel titled; ``name`` labels the colour bar."""

    matrices: list[list[list[float | None]]]
    titles: list[str]
    low: float
    high: float
    name: str = ""
    fmt: str = ".2f"
    integral: bool = False  # whole-number colour-bar ticks


MIN_CELL = 0.3  # inches: the narrowest cell of a panel laid side by side with others (holds "0.12" at 7 pt)
PANEL_GAP = 0.12  # inches between panels side by side


def panels_per_row(count: int, columns: int, room: float) -> int:
    """How many panels of ``columns`` cells fit side by side in ``room`` inches (1: stacked), balanced so the
    last row is not nearly empty (11 panels in 6 + 5, not 8 + 3)."""
    most = max(1, min(count, int((room + PANEL_GAP) // (columns * MIN_CELL + PANEL_GAP))))
    rows = math.ceil(count / most)
    return math.ceil(count / rows)


def draw_heatmaps(
    blocks: Sequence[Block],
    modules: list[str],
    columns: list[int],
    xlabel: str,
    *,
    width: str | float,
    given: list[Axes] | None,
    what: str,
) -> Figure:
    """Draw ``blocks`` of layer × module-type heatmaps into a new figure of ``width`` (panels side by side where
    their cells stay wide enough, each block's rows under the previous block's, one colour bar per block) or
    into the caller's axes (one per panel); grey cells have no value. Returns the figure."""
    count = max(len(b.matrices) for b in blocks)
    inches = figure_width(width)
    label_room = 0.12 + 0.055 * max(len(m) for m in modules)
    titled = any(t for b in blocks for t in b.titles)
    missing = any(v is None for b in blocks for matrix in b.matrices for row in matrix for v in row)
    per_row = panels_per_row(count, len(columns), inches - label_room - 0.75)
    rows = math.ceil(count / per_row)
    # a vertical colour bar's label needs the height of several rows; with few rows it goes underneath
    beneath = len(blocks) == 1 and len(modules) * rows <= 4
    room = inches - label_room - (0.1 if beneath else 0.75) - PANEL_GAP * (per_row - 1)
    cell = room / (per_row * len(columns))
    with paper_style():
        ticked: dict[Axes, tuple[bool, bool]] = {}  # (x, y) ticks of each panel of a new figure; given: both
        if given is not None:
            axes = check_axes(given, sum(len(b.matrices) for b in blocks), what)
            fig = root_figure(axes[0])
            grids = []
            for b in blocks:
                grids.append(axes[: len(b.matrices)])
                axes = axes[len(b.matrices) :]
        else:
            panel = 0.17 * len(modules) + (0.22 if titled else 0.0)  # rows, and the panel's title
            height = 0.68 + panel * rows * len(blocks) + (0.2 if missing else 0.0) + (0.45 if beneath else 0.0)
            fig = new_figure(width, min(height, 24.0) / inches)
            # not shared: a panel inside the grid gets no ticks at all (its labels were hidden and its tick marks
            # zero-length), where shared axes would give every panel every tick object to update and draw
            every = fig.subplots(rows * len(blocks), per_row, squeeze=False)
            grids = []
            for number, b in enumerate(blocks):
                cells = [ax for row in every[number * rows : (number + 1) * rows] for ax in row]
                for ax in cells[len(b.matrices) :]:
                    fig.delaxes(ax)
                for i, ax in enumerate(cells[: len(b.matrices)]):
                    # x tick labels under the lowest panel of each column of the block; none inside the stack
                    last = i + per_row >= len(b.matrices)
                    ax.tick_params(axis="x", length=2.5)
                    ticked[ax] = (last, i % per_row == 0)
                grids.append(cells[: len(b.matrices)])
        shown = list(range(len(columns)))
        most = 12 if per_row == 1 else max(2, int(cell * len(columns) / 0.25))  # tick labels a panel holds
        if len(columns) > most:
            step = math.ceil(len(columns) / (8 if per_row == 1 else most))
            shown = [c for c in range(len(columns)) if columns[c] % step == 0] or shown[::step]
        title_chars = max(8, int(cell * len(columns) / 0.045))  # 7 pt: ~0.045 in a character
        for b, panel_axes in zip(blocks, grids, strict=True):
            for panel_ax, matrix, title in zip(panel_axes, b.matrices, b.titles, strict=True):
                panel_ax.set_facecolor(MISSING_COLOR)
                mesh = panel_ax.pcolormesh(
                    _edges(len(columns), -0.5), _edges(len(modules), -0.5), _masked(matrix),
                    cmap=SEQUENTIAL_CMAP, vmin=b.low, vmax=b.high, edgecolors="white",
                    linewidth=0.4 if cell > 0.08 else 0.0,
                )  # fmt: skip
                panel_ax.set_ylim(len(modules) - 0.5, -0.5)
                ticks_x, ticks_y = ticked.get(panel_ax, (True, True))
                panel_ax.set_yticks(range(len(modules)) if ticks_y else [],
                                    [ellipsize(m, 24) for m in modules] if ticks_y else [])  # fmt: skip
                panel_ax.tick_params(axis="y", length=0)
                panel_ax.set_xticks(shown if ticks_x else [], [str(columns[c]) for c in shown] if ticks_x else [])
                for side in ("top", "right", "left", "bottom"):
                    panel_ax.spines[side].set_visible(False)
                if title:
                    panel_ax.set_title(ellipsize(title, title_chars), fontsize=7, loc="left")
                if cell >= MIN_ANNOTATED_CELL and len(modules) <= 12:
                    _annotate(panel_ax, matrix, mesh, fmt=b.fmt, xs=range(len(columns)), ys=range(len(modules)))
            if beneath:
                colorbar = fig.colorbar(mesh, ax=panel_axes, orientation="horizontal", fraction=0.12, aspect=35,
                                        pad=0.03)  # fmt: skip
            else:
                tall = len(modules) * (rows if given is None else len(panel_axes))
                colorbar = fig.colorbar(mesh, ax=panel_axes, fraction=0.05, pad=0.02, aspect=min(40, max(8, 4 * tall)))
            if b.name:
                colorbar.set_label(b.name)
            if b.integral:  # counts: whole-number ticks
                step = max(1, math.ceil((b.high - b.low) / 5))
                colorbar.set_ticks(range(math.ceil(b.low), math.floor(b.high) + 1, step))
            colorbar.outline.set_linewidth(0.4)
        if given is None and per_row > 1:
            fig.supxlabel(xlabel, fontsize=8)
        else:
            for panel_axes in grids:
                panel_axes[-1].set_xlabel(xlabel)
        if missing:
            from matplotlib.patches import Patch

            key_patch, key_text = [Patch(facecolor=MISSING_COLOR)], ["no layer or invalid"]
            if given is None:
                fig.legend(key_patch, key_text, loc="outside lower right")
            else:  # above the first panel, right-aligned (its title, if any, is on the left)
                first = grids[0][0]
                first.legend(key_patch, key_text, loc="lower right", bbox_to_anchor=(1.0, 1.0), borderaxespad=0.2)
    return fig


def layer_columns(records: Sequence[LayerRecord]) -> tuple[list[str], dict[str, int], list[int], dict[int, int], str]:
    """What a layer heatmap's rows and columns are: module types (model order), each block's position, the
    columns drawn, the column of each position, and what the columns are called."""
    modules = list(by_module(records))
    positions, xlabel = block_positions(records)
    columns = _columns(positions)
    return modules, positions, columns, {index: c for c, index in enumerate(columns)}, xlabel


def erank_heatmap_figure(
    analyses: Analysis | Sequence[Analysis],
    labels: Sequence[str] | None = None,
    *,
    metric: str = "erank",
    width: str | float = "column",
    vmin: float | None = None,
    vmax: float | None = None,
    ax: Axes | Sequence[Axes] | None = None,
) -> Figure:
    """One cell per layer: ``metric`` (``erank``, ``utilization``, ``stable_rank``, ``count_above[0.005]``, …)
    with the layer index across and the module type down; grey cells have no (valid) layer.

    ``analyses``: one analysis, or several — one panel per checkpoint (titled by ``labels``), on the same rows
    and columns and ONE colour bar; panels sit side by side where their cells stay readable (few layers), else
    one under the other. Colours run over ``vmin``…``vmax`` (default :func:`heatmap_limits` of all the
    analyses: fixed by the metric's meaning, so that a 0.3 % spread does not fill the whole scale, and equal
    colours mean equal values in every panel). ``ax``: one Axes per checkpoint to draw into (their figure is
    returned, the colour bar beside them); by default a new figure of ``width``.
    """
    analyses = [analyses] if hasattr(analyses, "layers") else list(analyses)
    labels = check_labels(analyses, labels)
    key, parameter, name = parse_metric(metric, analyses[0])
    for analysis in analyses:
        if not any(r.valid for r in analysis.layers):
            raise FigureInputError(f"{analysis.checkpoint.path}: no valid layer to draw")
    modules, positions, columns, column_of, xlabel = layer_columns([r for a in analyses for r in a.layers])
    matrices = [_metric_matrix(a.layers, modules, positions, column_of, key, parameter) for a in analyses]
    values = [v for matrix in matrices for row in matrix for v in row if v is not None]
    default_low, default_high = heatmap_limits(analyses, metric)
    low = default_low if vmin is None else float(vmin)
    high = default_high if vmax is None else float(vmax)
    if not high > low:
        raise FigureInputError(f"the colour range {low:g}…{high:g} is empty: vmax must be above vmin")
    integral = all(float(v).is_integer() for v in values)
    fmt = ".0f" if integral or high >= 100 else ".2f" if high < 1 else ".1f"
    titles = labels if len(analyses) > 1 else [""]
    block = Block(matrices, titles, low, high, name, fmt, integral)
    return draw_heatmaps([block], modules, columns, xlabel, width=width, given=axes_given(ax),
                         what="erank_heatmap_figure")  # fmt: skip


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
