"""What the figures' drawing shortcuts must not change (issue 15, round 5): a heatmap's cell values drawn as one
artist land exactly where matplotlib's own centred Text puts them, in every backend; the placements skipped at
render time (empty axis labels, titles of Axes with nothing at their top) leave every pixel where it was."""

from __future__ import annotations

import io

import numpy as np
import pytest

from rankscope.figures._cells import CellLabels
from rankscope.figures.output import figure_bytes, settled_positions
from rankscope.figures.style import paper_style

CELLS = [(0.5, 0.5, "0.12", "black"), (1.5, 0.5, "-3.4", "white"), (0.5, 1.5, "10.9", "#336699"), (1.5, 1.5, "7", "k")]


def _cells_figure(as_text: bool):
    from matplotlib.figure import Figure

    with paper_style():
        fig = Figure(figsize=(2, 1.5))
        ax = fig.subplots()
        ax.set_xlim(0, 2)
        ax.set_ylim(2, 0)  # inverted, as the heatmaps draw their rows
        xs, ys, texts, colors = (list(part) for part in zip(*CELLS, strict=True))
        if as_text:
            for x, y, text, color in CELLS:
                ax.text(x, y, text, ha="center", va="center", fontsize=7, color=color)
        else:
            ax.add_artist(CellLabels(xs, ys, texts, colors, fontsize=7, transform=ax.transData))
    return fig


def _recorded_text(fig, fmt: str, monkeypatch) -> list[tuple]:
    """Every draw_text call (string, x, y, colour) a save in ``fmt`` makes, in drawing order."""
    from matplotlib.backends.backend_agg import RendererAgg
    from matplotlib.backends.backend_pdf import RendererPdf
    from matplotlib.backends.backend_svg import RendererSVG

    renderer = {"png": RendererAgg, "pdf": RendererPdf, "svg": RendererSVG}[fmt]
    calls = []
    original = renderer.draw_text

    def record(self, gc, x, y, s, prop, angle, ismath=False, mtext=None):
        if s in {text for *_, text, _ in CELLS}:
            calls.append((s, round(float(x), 4), round(float(y), 4), gc.get_rgb()[:3], prop.get_size_in_points()))
        return original(self, gc, x, y, s, prop, angle, ismath=ismath, mtext=mtext)

    monkeypatch.setattr(renderer, "draw_text", record)
    figure_bytes(fig, fmt)
    monkeypatch.setattr(renderer, "draw_text", original)
    return calls


@pytest.mark.parametrize("fmt", ["png", "pdf", "svg"])
def test_cell_labels_are_drawn_where_centred_text_is(fmt, monkeypatch):
    """The reference is matplotlib's Text(ha="center", va="center"): the same string, position, colour and size
    reach the backend, in every backend (Agg and SVG count y from the top, PDF from the bottom)."""
    want = _recorded_text(_cells_figure(as_text=True), fmt, monkeypatch)
    got = _recorded_text(_cells_figure(as_text=False), fmt, monkeypatch)
    assert len(want) == len(CELLS)
    assert sorted(got) == sorted(want)  # positions to 1e-4 px


def test_cell_labels_take_no_part_in_the_layout():
    fig = _cells_figure(as_text=False)
    (labels,) = [a for a in fig.axes[0].get_children() if isinstance(a, CellLabels)]
    assert not labels.get_in_layout()
    with pytest.raises(ValueError, match="one x, y, text and colour"):
        CellLabels([0.0], [0.0, 1.0], ["a"], ["k"], fontsize=7, transform=fig.axes[0].transData)


def test_heatmap_cells_carry_the_matrix_values():
    from types import SimpleNamespace

    from rankscope.figures import alignment_figure

    record = SimpleNamespace(
        name="model.layers.0.q_proj",
        alignment={
            "left_overlap": [[1.0, 0.25], [0.25, 1.0]],
            "left_baseline": [[1.0, 0.1], [0.1, 1.0]],
            "right_overlap": [[1.0, -0.5], [-0.5, 1.0]],
            "right_baseline": [[1.0, 0.1], [0.1, 1.0]],
            "cosine": [[1.0, None], [0.125, 1.0]],
        },
    )
    fig = alignment_figure(record, labels=["a", "b"], width=6.75)
    panels = [ax for ax in fig.axes if not hasattr(ax, "_colorbar")]
    written = [next(a for a in ax.get_children() if isinstance(a, CellLabels)) for ax in panels]
    assert [c.texts for c in written] == [
        ["1.00", "0.25", "0.25", "1.00"],
        ["1.00", "-0.50", "-0.50", "1.00"],
        ["1.00", "0.12", "1.00"],  # the missing cell is left empty (grey)
    ]
    assert (written[2].xs, written[2].ys) == ([0, 0, 1], [0, 1, 1])
    # dark text on light cells, white on dark ones (the diverging map is dark at ±1)
    assert written[0].colors == ["white", "black", "black", "white"]


def _panels_figure(top: bool):
    from matplotlib.figure import Figure

    with paper_style():
        fig = Figure(figsize=(3, 2), layout="constrained")
        axes = fig.subplots(2, 2, sharex=True, sharey=True)
        for i, ax in enumerate(axes.flat):
            ax.plot([0, 1, 2], [i, 2, 1])
            ax.set_title(f"panel {i}", fontsize=7, loc="left")
        axes[1, 0].set_xlabel("layer index")
        if top:
            axes[0, 1].xaxis.tick_top()
            axes[0, 1].tick_params(labeltop=True)
    return fig


def _png(fig) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(figure_bytes(fig, "png"))))


@pytest.mark.parametrize("top", [False, True])
def test_settled_positions_draw_the_same_pixels(top):
    """Against matplotlib's own placement: the same figure saved with the automatic placements still on."""
    from matplotlib.figure import Figure

    plain = _panels_figure(top)
    buffer = io.BytesIO()
    with paper_style():
        plain.savefig(buffer, format="png", dpi=300, metadata={"Software": None})
    from PIL import Image

    want = np.asarray(Image.open(buffer))
    settled = _panels_figure(top)
    with settled_positions(settled):
        assert isinstance(settled, Figure)
        automatic = [ax._autotitlepos for ax in settled.axes]
        assert automatic == ([False, True, False, False] if top else [False] * 4)  # ticks at the top keep theirs
        assert [ax.xaxis._autolabelpos for ax in settled.axes] == [False, False, True, False]  # the labelled one
    assert all(ax._autotitlepos and ax.xaxis._autolabelpos for ax in settled.axes)  # as it was, after the save
    got = _png(settled)
    assert got.shape == want.shape and np.array_equal(got, want)
    # a label set between two saves is placed below the tick labels again, as on a figure never saved
    settled.axes[0].set_xlabel("added")
    fresh = _panels_figure(top)
    fresh.axes[0].set_xlabel("added")
    assert np.array_equal(_png(settled), _png(fresh))


def test_log_labels_and_ligatures_share_the_common_pdf_font_subset():
    """A figure writing "effective rank" (shaped with the ﬀ ligature) and 10⁻⁴ … 10⁻⁹ needs no subset of its own:
    every glyph it draws is in the shared set (a subset per figure was ~0.3 s)."""
    from matplotlib.figure import Figure

    from rankscope.figures import fonts

    fig = Figure(figsize=(4, 1))
    ax = fig.subplots()
    ax.set_title("effective rank (erank) 10⁻⁴ 10⁻⁵ 10⁻⁶ 10⁻⁷ 10⁻⁸ 10⁻⁹", fontsize=7)
    fonts._CACHE.clear()
    figure_bytes(fig, "pdf")
    (key,) = fonts._CACHE
    fontfile, _, wanted = key
    assert wanted == fonts._common_glyphs(fontfile)  # nothing beyond the shared set


def test_alignment_inner_panels_draw_as_shared_ones(monkeypatch):
    """The reference is matplotlib's shared y axes (what alignment_figure drew before): its inner panels held
    every row's tick, label hidden and mark of length 0; unshared and tickless, they draw the same pixels."""
    from types import SimpleNamespace

    from matplotlib.figure import Figure

    from rankscope.figures import alignment_figure

    square = [[1.0, 0.25, -0.5], [0.25, 1.0, None], [-0.5, 0.125, 1.0]]
    keys = ("left_overlap", "left_baseline", "right_overlap", "right_baseline", "cosine")
    record = SimpleNamespace(name="model.layers.0.q_proj", alignment=dict.fromkeys(keys, square))
    labels = ["first", "a longer component", "c"]
    fig = alignment_figure(record, labels=labels)
    panels = [ax for ax in fig.axes if not hasattr(ax, "_colorbar")]
    assert [len(ax.get_yticks()) for ax in panels] == [3, 0, 0]
    assert [t.get_text() for t in panels[0].get_yticklabels()] == ["1: first", "2: a lo…component", "3: c"]
    got = _png(fig)
    subplots = Figure.subplots

    def shared(self, *args, **kwargs):
        axes = subplots(self, *args, sharey=True, **kwargs)
        for ax in axes[1:]:  # the shared ticks are the first panel's; an empty set would clear them all
            ax.set_yticks = lambda *_, **__: None
        return axes

    monkeypatch.setattr(Figure, "subplots", shared)
    reference = alignment_figure(record, labels=labels)
    assert [len(ax.get_yticks()) for ax in reference.axes[:3]] == [3, 3, 3]  # really shared
    want = _png(reference)
    assert got.shape == want.shape
    assert np.array_equal(got, want)


def _texts_figure():
    """Texts of every kind a layout depends on: rotated, multi-line, aligned, mathtext, a legend, a wrapped one
    (laid out anew each time), the same string in two sizes."""
    from matplotlib.figure import Figure

    with paper_style():
        fig = Figure(figsize=(4, 3), layout="constrained")
        axes = fig.subplots(1, 2)
        for i, ax in enumerate(axes):
            ax.plot([0, 1, 2], [1, 3, 2], label=f"series {i}")
            ax.set_xticks([0, 1, 2], ["zero", "one\nline two", "two"], rotation=35 * i, ha="right")
            ax.set_ylabel(r"$\sigma_i / \sigma_1$ (log)")
            ax.legend(fontsize=6, title="legend")
            ax.text(0.5, 0.5, "same", fontsize=6 + 3 * i, ha="center", va="baseline", transform=ax.transAxes)
        axes[1].text(0.1, 0.2, "a long wrapped note " * 4, wrap=True, transform=axes[1].transAxes)
        fig.suptitle("effective rank, multi-\nline", fontsize=8)
    return fig


@pytest.mark.parametrize("fmt", ["svg", "pdf", "png"])
def test_shared_text_layouts_give_the_same_bytes(fmt, monkeypatch):
    """The reference is matplotlib laying out every text at every measurement: the same bytes either way."""
    import contextlib

    from matplotlib.text import Text

    from rankscope.figures import _text_layout, output

    original = Text._get_layout
    shared = figure_bytes(_texts_figure(), fmt)
    assert Text._get_layout is original  # put back after the save
    keys = []
    key = _text_layout._key
    monkeypatch.setattr(_text_layout, "_key", lambda text, renderer: keys.append(key(text, renderer)) or keys[-1])
    assert figure_bytes(_texts_figure(), fmt) == shared
    assert None in keys and len(set(keys)) < len(keys)  # the wrapped note laid out anew; the rest shared
    monkeypatch.setattr(output, "shared_layouts", contextlib.nullcontext)
    assert figure_bytes(_texts_figure(), fmt) == shared
