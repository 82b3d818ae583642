"""Heatmaps drawn as one Axes per block of panels (issue 15, round 5 part 3): the panels of one colour scale are one
mesh with masked gaps in one Axes; what a reader sees must stay what the per-panel Axes showed — each panel's
cells are its checkpoint's record values (read here from the records, not from the figure code), one norm and
colour bar per block, titles over each panel's top-left corner, module names left of every row of panels, layer
ticks under the lowest panel of each column (inside the stack too), panels evenly sized and spaced."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import QuadMesh

import rankscope
from rankscope import figures

ADAPTERS = Path(__file__).resolve().parent.parent / "examples" / "checkpoints" / "adapters"
BASE = ADAPTERS.parent / "tiny-base"
NAMES = sorted(p.name for p in ADAPTERS.iterdir() if p.is_dir())


@pytest.fixture(scope="module")
def eleven():
    assert len(NAMES) == 11, NAMES  # 11 panels: rows of 6 + 5 at the report's width, one above an empty slot
    return [rankscope.analyze(rankscope.load(ADAPTERS / n, base=BASE)) for n in NAMES]


def drawn(fig):
    FigureCanvasAgg(fig)
    fig.canvas.draw()
    return fig


def panel_grid(ax, mesh, modules: int, columns: int) -> list[tuple[int, int]]:
    """(row, column) index of each panel's first cell in the mesh: the mesh's rows and columns of cells that
    start a panel, read from the cell edges (a gap column is narrower than a cell)."""
    coordinates = mesh.get_coordinates()
    widths = np.diff(coordinates[0, :, 0])
    heights = np.diff(coordinates[:, 0, 1])
    starts_x = [i for i in range(len(widths)) if i % (columns + 1) == 0]
    starts_y = [i for i in range(len(heights)) if i % (modules + 1) == 0]
    # every cell of a panel is one data unit; every gap cell is narrower and wholly masked
    gaps_x = [i for i in range(len(widths)) if i % (columns + 1) == columns]
    gaps_y = [i for i in range(len(heights)) if i % (modules + 1) == modules]
    assert all(abs(widths[i] - 1) < 1e-9 for i in range(len(widths)) if i not in gaps_x)
    assert all(0 < widths[i] < 1 for i in gaps_x) and all(0 < heights[i] < 3 for i in gaps_y)
    values = mesh.get_array()
    assert all(values.mask[:, i].all() for i in gaps_x) and all(values.mask[i, :].all() for i in gaps_y)
    return [(y, x) for y in starts_y for x in starts_x]


def check_block(ax, mesh, analyses, labels, value, modules, columns):
    names = [t.get_text() for t in ax.get_yticklabels()]
    assert names == modules * (len(names) // len(modules))  # the module names left of every row of panels
    starts = panel_grid(ax, mesh, len(modules), len(columns))
    values = mesh.get_array()
    for (y, x), analysis in zip(starts, analyses, strict=False):
        panel = values[y : y + len(modules), x : x + len(columns)]
        want = np.full(panel.shape, np.nan)
        for record in analysis.layers:
            if record.valid and value(record) is not None:
                want[modules.index(record.module_type), columns.index(record.layer_index)] = value(record)
        assert np.array_equal(np.isnan(want), panel.mask)
        np.testing.assert_allclose(panel.filled(np.nan)[~panel.mask], want[~np.isnan(want)], rtol=1e-12)
    # the titles: one text a title pad over each panel's top-left corner, in the order of the checkpoints
    titles = [t for t in ax.texts if t.get_text() in labels]
    assert [t.get_text() for t in titles] == labels
    corners = ax.transData.transform([(mesh.get_coordinates()[y, x]) for y, x in starts[: len(labels)]])
    for title, (cx, cy) in zip(titles, corners, strict=True):
        tx, ty = title.get_transform().transform(title.get_position())
        assert tx == pytest.approx(cx) and ty == pytest.approx(cy + 3.0 / 72 * ax.figure.dpi)  # axes.titlepad 3 pt
        assert (title.get_ha(), title.get_va(), title.get_fontsize()) == ("left", "baseline", 7.0)
    return starts


def test_erank_heatmap_of_eleven_checkpoints_is_one_block(eleven):
    fig = drawn(figures.erank_heatmap_figure(eleven, NAMES, width=6.75))
    bars = [ax for ax in fig.axes if hasattr(ax, "_colorbar")]
    (ax,) = [a for a in fig.axes if a not in bars]
    assert len(bars) == 1
    (mesh,) = [c for c in ax.collections if isinstance(c, QuadMesh)]
    assert bars[0]._colorbar.mappable is mesh and mesh.get_clim() == (0.0, figures.heatmap_limits(eleven)[1])
    modules = [m for m in ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj")]
    starts = check_block(ax, mesh, eleven, NAMES, lambda r: r.metrics["erank"], modules, [0, 1])
    assert len({y for y, _ in starts}) == 2 and len({x for _, x in starts}) == 6  # 6 + 5
    # panels evenly sized, 0.04 in apart side by side (as the constrained layout spaced panel Axes)
    inches = ax.transData.transform(mesh.get_coordinates().reshape(-1, 2)).reshape(mesh.get_coordinates().shape)
    inches = inches / fig.dpi
    lefts = sorted({round(float(inches[0, x, 0]), 6) for _, x in starts})
    rights = sorted({round(float(inches[0, x + 2, 0]), 6) for _, x in starts})
    assert max(np.diff(lefts)) - min(np.diff(lefts)) < 1e-5
    assert all(0.03 < left - right < 0.05 for left, right in zip(lefts[1:], rights[:-1], strict=True))
    # layer ticks: the axis's under the five panels of the lower row, texts (and marks) under the sixth above
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "1"] * 5
    hanging = [t for t in ax.texts if t.get_text() in ("0", "1")]
    assert [t.get_text() for t in hanging] == ["0", "1"] and all(t.get_va() == "top" for t in hanging)
    sixth_bottom = ax.transData.transform(mesh.get_coordinates()[starts[5][0] + len(modules), starts[5][1]])[1]
    assert all(t.get_window_extent().y1 < sixth_bottom for t in hanging)
    # the values written in the cells: every defined cell once, at its cell's centre
    (labels,) = [a for a in ax.get_children() if type(a).__name__ == "CellLabels"]
    assert len(labels.texts) == int((~mesh.get_array().mask).sum())


def test_base_heatmap_blocks_keep_one_scale_and_colour_bar_each(eleven):
    fig = drawn(figures.base_heatmap_figure(eleven, NAMES, width=6.75))
    bars = [ax for ax in fig.axes if hasattr(ax, "_colorbar")]
    blocks = [a for a in fig.axes if a not in bars]
    assert len(blocks) == 2 and len(bars) == 2
    meshes = [next(c for c in ax.collections if isinstance(c, QuadMesh)) for ax in blocks]
    assert [bar._colorbar.mappable for bar in bars] == meshes  # each block's colour bar is its own scale
    top = max(r.base["relative_update"] for a in eleven for r in a.layers if r.valid)
    assert meshes[0].get_clim() == (0.0, pytest.approx(top)) and meshes[1].get_clim() == (0.0, 10.0)
    modules = [t.get_text() for t in blocks[0].get_yticklabels()][:6]
    check_block(blocks[0], meshes[0], eleven, NAMES, lambda r: r.base["relative_update"], modules, [0, 1])
    intruders = lambda r: float(r.base["intruders"]["count"])  # noqa: E731
    check_block(blocks[1], meshes[1], eleven, NAMES, intruders, modules, [0, 1])
    # the blocks are stacked: the second block's top under the first block's x tick labels
    first_ticks = max(t.get_window_extent().y0 for t in blocks[0].get_xticklabels())
    assert blocks[1].get_window_extent().y1 < first_ticks


def test_one_checkpoint_heatmap_is_its_single_panel(eleven):
    """One checkpoint: one panel, no gaps — the mesh is the module × layer matrix itself."""
    fig = drawn(figures.erank_heatmap_figure(eleven[0]))
    (mesh,) = fig.axes[0].findobj(QuadMesh)
    assert mesh.get_array().shape == (6, 2) and not fig.axes[0].texts
