"""A block of heatmap panels drawn in ONE Axes (issue 15): the panels side by side and one under the other in one
``pcolormesh`` whose gap rows and columns are masked (drawn in no colour), the panels' titles and the x tick
labels under panels inside the stack as text artists, every value in one :class:`~._cells.CellLabels`.

A panel per Axes cost each panel its own layout, axis, ticks and spines in every layout pass and draw (22 Axes in
the demo's base heatmap); the reader sees the same cells, colours (one norm per block, as before), values, titles
and tick labels. The gaps are sized in inches, as the constrained layout left them between panel Axes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.collections import QuadMesh

    from .heatmaps import Block

GAP_X = 0.04  # inches between panels side by side (the constrained layout's padding between untitled Axes)
TITLE_ROOM = 0.156  # inches over a panel for its 7 pt title (text line 0.114 + title pad 3 pt)
TICK_ROOM = 0.168  # inches under a panel for x tick labels (2.5 pt mark + 2 pt pad + a 7 pt line)


def cell_texts(matrix, cmap, norm, *, fmt: str, xs: Sequence[float], ys: Sequence[float], into=None):
    """(x, y, text, colour) lists of each defined value of ``matrix``, dark text on light cells and white on dark
    ones (luminance 0.2126 r + 0.7152 g + 0.0722 b > 0.45), appended to ``into`` when given."""
    cells: tuple[list, list, list, list] = into if into is not None else ([], [], [], [])
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
    return cells


def row_gap(titled: bool, hanging: bool) -> float:
    """Inches between two rows of panels: the lower row's titles and the upper row's hanging x tick labels."""
    return max(GAP_X, (TITLE_ROOM if titled else 0.0) + (TICK_ROOM if hanging else 0.0))


def draw_block(
    ax: Axes,
    block: Block,
    modules: list[str],
    columns: list[int],
    *,
    grid: tuple[int, int],
    cell: tuple[float, float],
    shown: list[int],
    title_chars: int,
    annotate: bool,
    linewidth: float,
    cmap: str,
    missing_color: str,
) -> QuadMesh:
    """Draw ``block``'s panels into ``ax`` on a ``grid`` of (rows, per_row) panels; ``cell``: the expected
    (width, height) of a cell in inches, which turns the gaps' inches into data units; ``linewidth``: the white
    lines between cells. Panel i's cell (row m, column c) is at data (x₀ + c, y₀ + m) with
    x₀ = (i mod per_row)·(C + gx), y₀ = ⌊i / per_row⌋·(M + gy).
    Returns the block's mesh (for its colour bar)."""
    import matplotlib
    import numpy as np
    from matplotlib.collections import PolyCollection
    from matplotlib.lines import Line2D
    from matplotlib.markers import TICKDOWN
    from matplotlib.transforms import ScaledTranslation

    from ._cells import CellLabels
    from ._common import ellipsize

    rows, per_row = grid
    count, n_rows, n_cols = len(block.matrices), len(modules), len(columns)
    used_rows = math.ceil(count / per_row)
    titled = any(block.titles)
    hanging = count % per_row != 0 and used_rows > 1  # panels above an empty slot label their own x ticks
    gx = GAP_X / cell[0]
    gy = row_gap(titled, hanging) / cell[1]
    origins = [((i % per_row) * (n_cols + gx), (i // per_row) * (n_rows + gy)) for i in range(count)]
    x_edges = [c * (n_cols + gx) - 0.5 + j for c in range(per_row) for j in range(n_cols + 1)]
    y_edges = [r * (n_rows + gy) - 0.5 + j for r in range(rows) for j in range(n_rows + 1)]
    # one value per cell of the whole grid: the panels' cells, and a masked cell between two panels' edges
    values = np.full((rows * (n_rows + 1) - 1, per_row * (n_cols + 1) - 1), np.nan)
    for i, matrix in enumerate(block.matrices):
        r, c = divmod(i, per_row)
        panel = np.array([[math.nan if v is None else float(v) for v in row] for row in matrix], dtype=float)
        values[r * (n_rows + 1) : r * (n_rows + 1) + n_rows, c * (n_cols + 1) : c * (n_cols + 1) + n_cols] = panel
    mesh = ax.pcolormesh(x_edges, y_edges, np.ma.masked_invalid(values), cmap=cmap, vmin=block.low,
                         vmax=block.high, edgecolors="white", linewidth=linewidth)  # fmt: skip
    # each panel's grey ground (its missing cells), as its Axes' face colour was
    grounds = [[(x - 0.5, y - 0.5), (x + n_cols - 0.5, y - 0.5), (x + n_cols - 0.5, y + n_rows - 0.5),
                (x - 0.5, y + n_rows - 0.5)] for x, y in origins]  # fmt: skip
    ax.add_collection(PolyCollection(grounds, facecolors=missing_color, linewidths=0, zorder=0.5), autolim=False)
    for side in ("top", "right", "left", "bottom"):
        ax.spines[side].set_visible(False)
    # module names left of each row of panels; x ticks under the panels of the lowest row, as the axis's ticks
    ax.set_yticks([y + m for _, y in origins[::per_row] for m in range(n_rows)],
                  [ellipsize(m, 24) for _ in origins[::per_row] for m in modules])  # fmt: skip
    ax.tick_params(axis="y", length=0)
    ax.tick_params(axis="x", length=2.5)
    bottom = [i for i in range(count) if i // per_row == rows - 1]
    ax.set_xticks([origins[i][0] + s for i in bottom for s in shown], [str(columns[s]) for _ in bottom for s in shown])
    rc = matplotlib.rcParams
    fig = ax.get_figure(root=True)
    down = ax.transData + ScaledTranslation(0, -(rc["xtick.major.size"] + rc["xtick.major.pad"]) / 72,
                                            fig.dpi_scale_trans)  # fmt: skip
    label_colour = rc["xtick.color"] if rc["xtick.labelcolor"] == "inherit" else rc["xtick.labelcolor"]
    for i in range(count):
        x, y = origins[i]
        if i + per_row < count or i // per_row == rows - 1:
            continue
        # inside the stack, above an empty slot: the same marks and labels an axis would draw there
        marks = Line2D([x + s for s in shown], [y + n_rows - 0.5] * len(shown), linestyle="none", marker=TICKDOWN,
                       markersize=rc["xtick.major.size"], markeredgewidth=rc["xtick.major.width"],
                       color=rc["xtick.color"], clip_on=False)  # fmt: skip
        marks.set_in_layout(False)
        ax.add_line(marks)
        for s in shown:
            ax.text(x + s, y + n_rows - 0.5, str(columns[s]), transform=down, ha="center", va="top",
                    fontsize=rc["xtick.labelsize"], color=label_colour, clip_on=False, in_layout=False)  # fmt: skip
    up = ax.transData + ScaledTranslation(0, rc["axes.titlepad"] / 72, fig.dpi_scale_trans)
    for i, title in enumerate(block.titles):
        if title:  # as Axes.set_title(loc="left"): baseline a title pad over the panel's top left corner
            x, y = origins[i]
            ax.text(x - 0.5, y - 0.5, ellipsize(title, title_chars), transform=up, ha="left", va="baseline",
                    fontsize=7, clip_on=False, in_layout=i < per_row)  # fmt: skip
    if annotate:
        cells: tuple[list, list, list, list] = ([], [], [], [])
        for (x, y), matrix in zip(origins, block.matrices, strict=True):
            cell_texts(matrix, mesh.get_cmap(), mesh.norm, fmt=block.fmt, xs=[x + c for c in range(n_cols)],
                       ys=[y + m for m in range(n_rows)], into=cells)  # fmt: skip
        if cells[0]:
            ax.add_artist(CellLabels(*cells, fontsize=7, transform=ax.transData))
    ax.set_xlim(-0.5, x_edges[-1])
    ax.set_ylim(y_edges[-1], -0.5)
    return mesh
