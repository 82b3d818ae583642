"""Heatmaps of a metric over layer index × module type (the alignment and φ(i, j) heatmaps are in ``alignment``).

Cells are vector patches (``pcolormesh``), so PDFs and SVGs stay vector; values are written in the cells when
the cells are large enough to hold 7 pt text, which also keeps the figures readable in black and white.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ._axes import axes_given, check_axes, fitting_chars, new_figure, root_figure
from ._blocks import GAP_X, cell_texts, draw_block, row_gap
from ._common import (
    FigureInputError,
    block_of,
    block_positions,
    by_module,
    check_labels,
    ellipsize,
    metric_value,
    parse_metric,
)
from .style import MISSING_COLOR, SEQUENTIAL_CMAP, figure_width, paper_style

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from ..analysis.records import Analysis, LayerRecord

MIN_ANNOTATED_CELL = 0.22  # inches: a cell this wide holds "0.12" at 7 pt


def _annotate(ax: Axes, matrix, mesh, *, fmt: str, xs: Sequence[float], ys: Sequence[float]) -> None:
    """Write each defined value in its cell: one :class:`~._cells.CellLabels` artist for the whole panel, not a
    Text per cell (half of a heatmap's drawing)."""
    from ._cells import CellLabels

    cells = cell_texts(matrix, mesh.get_cmap(), mesh.norm, fmt=fmt, xs=xs, ys=ys)
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


def _panel(ax: Axes, b: Block, matrix, title: str, modules: list[str], columns: list[int], *, shown: list[int],
           title_chars: int, annotate: bool, linewidth: float):  # fmt: skip
    """One panel in a caller's Axes (``ax=``): its own ticks, title and grey ground. Returns its mesh."""
    ax.set_facecolor(MISSING_COLOR)
    mesh = ax.pcolormesh(_edges(len(columns), -0.5), _edges(len(modules), -0.5), _masked(matrix), cmap=SEQUENTIAL_CMAP,
                         vmin=b.low, vmax=b.high, edgecolors="white", linewidth=linewidth)  # fmt: skip
    ax.set_ylim(len(modules) - 0.5, -0.5)
    ax.set_yticks(range(len(modules)), [ellipsize(m, 24) for m in modules])
    ax.tick_params(axis="y", length=0)
    ax.set_xticks(shown, [str(columns[c]) for c in shown])
    for side in ("top", "right", "left", "bottom"):
        ax.spines[side].set_visible(False)
    if title:
        ax.set_title(ellipsize(title, title_chars), fontsize=7, loc="left")
    if annotate:
        _annotate(ax, matrix, mesh, fmt=b.fmt, xs=range(len(columns)), ys=range(len(modules)))
    return mesh


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
    shown = list(range(len(columns)))
    most = 12 if per_row == 1 else max(2, int(cell * len(columns) / 0.25))  # tick labels a panel holds
    if len(columns) > most:
        step = math.ceil(len(columns) / (8 if per_row == 1 else most))
        shown = [c for c in range(len(columns)) if columns[c] % step == 0] or shown[::step]
    title_chars = max(8, int(cell * len(columns) / 0.045))  # 7 pt: ~0.045 in a character
    annotate = cell >= MIN_ANNOTATED_CELL and len(modules) <= 12
    with paper_style():
        if given is not None:
            axes = check_axes(given, sum(len(b.matrices) for b in blocks), what)
            fig = root_figure(axes[0])
            grids = []
            for b in blocks:
                grids.append(axes[: len(b.matrices)])
                axes = axes[len(b.matrices) :]
        else:
            panel = 0.17 * len(modules) + (0.22 if titled else 0.0)  # rows, and the panel's title
            height = min(
                24.0, 0.68 + panel * rows * len(blocks) + (0.2 if missing else 0.0) + (0.45 if beneath else 0.0)
            )
            fig = new_figure(width, height / inches)
            # one Axes per block (issue 15): its panels are one mesh with masked gaps, their titles text artists;
            # the gaps' inches become data units through a cell's expected size once laid out (the layout leaves
            # ~0.47 in above and below the stack of blocks, and a row gap between blocks)
            block_axes = fig.subplots(len(blocks), 1, squeeze=False)[:, 0]
            gap = row_gap(titled, rows > 1 and count % per_row != 0)
            stack = height - 0.47 - (0.2 if missing else 0.0) - (0.45 if beneath else 0.0)
            block_height = (stack - (len(blocks) - 1) * row_gap(titled, True)) / len(blocks)
            cell_height = max(0.05, (block_height - (rows - 1) * gap) / (rows * len(modules)))
            cell_width = (inches - label_room - (0.1 if beneath else 0.75) - GAP_X * (per_row - 1)) / (
                per_row * len(columns)
            )
            grids, meshes = [], []
            for block_ax, b in zip(block_axes, blocks, strict=True):
                mesh = draw_block(block_ax, b, modules, columns, grid=(rows, per_row), cell=(cell_width, cell_height),
                                  shown=shown, title_chars=title_chars, annotate=annotate, cmap=SEQUENTIAL_CMAP,
                                  linewidth=0.4 if cell > 0.08 else 0.0,
                                  missing_color=MISSING_COLOR)  # fmt: skip
                meshes.append(mesh)
                grids.append([block_ax])
        for number, (b, panel_axes) in enumerate(zip(blocks, grids, strict=True)):
            if given is None:
                mesh = meshes[number]
            else:
                for panel_ax, matrix, title in zip(panel_axes, b.matrices, b.titles, strict=True):
                    mesh = _panel(panel_ax, b, matrix, title, modules, columns, shown=shown, title_chars=title_chars,
                                  annotate=annotate, linewidth=0.4 if cell > 0.08 else 0.0)  # fmt: skip
            if beneath:
                colorbar = fig.colorbar(mesh, ax=panel_axes, orientation="horizontal", fraction=0.12, aspect=35,
                                        pad=0.03)  # fmt: skip
            else:
                tall = len(modules) * (rows if given is None else len(panel_axes))
                colorbar = fig.colorbar(mesh, ax=panel_axes, fraction=0.05, pad=0.02, aspect=min(40, max(8, 4 * tall)))
            if b.name:
                colorbar.set_label(_bar_label(b.name, panel_axes, beneath))
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


def _bar_label(name: str, panel_axes: Sequence[Axes], beneath: bool) -> str:
    """A colour bar's label, wrapped onto lines no longer than the bar (about its panels' extent): a vertical bar
    beside one row of panels is shorter than "intruder dimensions (of the top 10)", which would run off the
    figure."""
    import textwrap

    from .style import TEXT_SIZE

    fig = root_figure(panel_axes[0])
    boxes = [ax.get_position() for ax in panel_axes]
    if beneath:
        inches = (max(b.x1 for b in boxes) - min(b.x0 for b in boxes)) * fig.get_figwidth()
    else:
        inches = (max(b.y1 for b in boxes) - min(b.y0 for b in boxes)) * fig.get_figheight()
    return textwrap.fill(name, fitting_chars(inches, TEXT_SIZE), break_long_words=False)


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
