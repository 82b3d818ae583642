"""Figures with a dozen checkpoints: legends outside the data, a dozen distinct series styles shared with the HTML
page, axis ranges that fit the data, multi-checkpoint heatmaps with one colour bar, and ``ax=`` on every public
figure function."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner

import rankscope

from .factories import llama_like, lora_config, write_lora
from .test_figures import composition, rank8_rank64

matplotlib = pytest.importorskip("matplotlib")

from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.collections import QuadMesh  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from rankscope import figures  # noqa: E402
from rankscope.figures import FigureInputError  # noqa: E402
from rankscope.figures.style import dash_pattern, series_style  # noqa: E402
from rankscope.measures.components import subspace_similarity_grid  # noqa: E402

COUNT = 12
SIZE = 48  # a 48×48 update of rank 48: its rank bound is far past where its energy saturates
DECAYS = [0.6 + 0.02 * i for i in range(COUNT)]  # σ_k = decay^k, exactly


def decaying_factors(decay: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A (rank SIZE) and B with orthonormal columns/rows, so that ΔW = B·A has σ_k = decay^k (k = 0…SIZE-1)."""
    generator = torch.Generator().manual_seed(seed)
    left, _ = torch.linalg.qr(torch.randn(SIZE, SIZE, generator=generator, dtype=torch.float64))
    right, _ = torch.linalg.qr(torch.randn(SIZE, SIZE, generator=generator, dtype=torch.float64))
    sigma = torch.tensor([decay**k for k in range(SIZE)], dtype=torch.float64)
    return right.T.float().contiguous(), (left * sigma).float().contiguous()


def checkpoint(directory: Path, index: int) -> Path:
    """q_proj and v_proj in two blocks; scale α/r = 1, so the analysed σ are the decay's own."""
    factors = {
        f"model.layers.{block}.self_attn.{module}": decaying_factors(DECAYS[index], 100 * index + 10 * block + j)
        for block in range(2)
        for j, module in enumerate(("q_proj", "v_proj"))
    }
    return write_lora(directory, factors, lora_config(r=SIZE, lora_alpha=SIZE))


@pytest.fixture(scope="module")
def many(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("many")
    paths = [checkpoint(root / f"checkpoint-{500 * (i + 1)}", i) for i in range(COUNT)]
    small, large = rank8_rank64(root)
    return SimpleNamespace(
        paths=paths,
        analyses=[rankscope.analyze(rankscope.load(p)) for p in paths],
        labels=[p.name for p in paths],
        sequential=rankscope.analyze(rankscope.load(composition(root / "sequential", weights=(0.33, 0.34, 0.33)))),
        ranked=[
            rankscope.analyze(rankscope.load(llama_like(root / f"ranked{r}", layers=2, hidden=16, rank=r, seed=r)))
            for r in (2, 4, 8)
        ],
        small=rankscope.load(small),
        large=rankscope.load(large),
    )


def drawn(fig):
    FigureCanvasAgg(fig)
    fig.canvas.draw()
    return fig


def legends(fig) -> list:
    return list(fig.legends) + [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]


CURVES = {
    "spectrum": figures.spectrum_figure,
    "energy": figures.energy_figure,
    "count-above": figures.count_above_figure,
}


# -- 1. legends outside the data ------------------------------------------------------------------------------
LEGEND_CASES = [(kind, layers) for kind in CURVES for layers in (None, "model.layers.0.self_attn.q_proj")
                if kind != "count-above" or layers is None]  # fmt: skip


@pytest.mark.parametrize("width", ["column", "full"])
@pytest.mark.parametrize(
    ("kind", "layer"), LEGEND_CASES, ids=[f"{k} {layer or 'all layers'}" for k, layer in LEGEND_CASES]
)
def test_a_dozen_checkpoints_legend_covers_no_axes(kind, layer, width, many):
    options = {"layers": [layer]} if layer else {}  # one layer: 12 curves in one panel; all: a panel per type
    fig = drawn(CURVES[kind](many.analyses, many.labels, width=width, **options))
    (legend,) = legends(fig)
    assert len(legend.get_texts()) >= COUNT  # every checkpoint named
    box = legend.get_window_extent()
    page = fig.bbox
    assert page.x0 - 1 <= box.x0 and box.x1 <= page.x1 + 1 and page.y0 - 1 <= box.y0 and box.y1 <= page.y1 + 1
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert panels
    for ax in panels:
        assert not box.overlaps(ax.get_window_extent()), (kind, width, ax.get_title())
        assert ax.get_window_extent().height > 0.6 * fig.dpi  # panels keep a readable height (> 0.6 in)


# -- 2. a dozen distinct styles, the same on the page -----------------------------------------------------------
def test_a_dozen_series_have_distinct_styles():
    styles = [series_style(i) for i in range(COUNT)]
    triples = [(s["color"], s["marker"], str(s["linestyle"])) for s in styles]
    assert len(set(triples)) == COUNT
    for i in range(COUNT):  # any two differ in colour, and in dash or marker (so also in black and white)
        for j in range(i):
            a, b = triples[i], triples[j]
            assert a[0] != b[0] or (a[1] != b[1] and a[2] != b[2]), (i, j)
            assert a[1] != b[1] or a[2] != b[2], (i, j)


def test_figure_legend_and_html_legend_use_the_same_style_per_checkpoint(many):
    from rankscope.report.html.svg import _SHAPES, _STROKE, key_svg, marker_def

    fig = drawn(figures.spectrum_figure(many.analyses, many.labels, layers=["model.layers.0.self_attn.q_proj"]))
    (legend,) = legends(fig)
    handles = dict(zip([t.get_text() for t in legend.get_texts()], legend.legend_handles, strict=True))
    seen = set()
    for index, label in enumerate(many.labels):
        line = handles[label]
        colour, marker = matplotlib.colors.to_hex(line.get_color()).upper(), line.get_marker()
        _, dashes = line._unscaled_dash_pattern
        figure_dashes = tuple(dashes or ())
        key = key_svg(index)
        html_colour = re.search(r'stroke="(#[0-9A-Fa-f]{6})"', key).group(1).upper()
        found = re.search(r'stroke-dasharray="([^"]+)"', key)
        html_dashes = tuple(float(v) / _STROKE for v in found.group(1).split()) if found else ()
        shape = re.search(r'<path d="([^"]+)" fill="(#[0-9A-Fa-f]{6})"', marker_def(index))
        assert html_colour == colour == shape.group(2).upper()
        assert html_dashes == pytest.approx(figure_dashes) and figure_dashes == pytest.approx(dash_pattern(index))
        assert shape.group(1) == _SHAPES[marker]
        assert f"url(#mk-{index})" in key
        seen.add((colour, marker, figure_dashes))
    assert len(seen) == COUNT


def test_long_series_keep_their_markers_on_the_page_and_in_figures():
    from rankscope.report.html.svg import _line

    points = [(float(i), float(i)) for i in range(40)]
    svg = _line(points, 3)
    moves = re.search(r'<path d="([^"]+)" fill="none" stroke="none"', svg).group(1)
    marked = [tuple(map(float, m.split())) for m in re.findall(r"M([\d.]+ [\d.]+)", moves)]
    from rankscope.figures.style import marked_points

    assert [x for x, _ in marked] == [float(i) for i in marked_points(40)]
    assert 4 <= len(marked) <= 10 and "url(#mk-3)" in svg


def test_html_layer_plot_fits_the_energy_axis_and_marks_few_rank_bounds():
    from rankscope.figures._common import cumulative_energy
    from rankscope.report.html.svg import layer_svg
    from rankscope.report.model import SeriesView

    series = []
    for index, (decay, bound) in enumerate(zip((0.5, 0.6, 0.7, 0.8), (48, 32, 16, 8), strict=True)):
        sigma = [decay**k for k in range(SIZE)]
        series.append(SeriesView(f"c{index}", index, tuple(sigma), tuple(cumulative_energy(sigma)), bound))
    svg = layer_svg(series, [0.005], [0.9])
    ticks = re.findall(r'<text x="([\d.]+)" y="171" text-anchor="middle">(\d+)</text>', svg)
    spectrum_ticks = [int(t) for x, t in ticks if float(x) < 330]  # the left panel is 330 px wide
    energy_ticks = [int(t) for x, t in ticks if float(x) >= 330]
    assert max(spectrum_ticks) >= 40  # the spectrum panel shows every index (1…48) …
    assert 10 <= max(energy_ticks) < SIZE / 2  # … the energy panel stops where the curves level off (0.8^k: k ≈ 16)
    assert "r≤" not in svg  # four distinct rank bounds: no thicket of lines (the figures' rule)
    two = layer_svg(series[:2], [0.005], [0.9])
    assert "r≤48" in two and "r≤32" in two


# -- 3. axis ranges that fit the data -------------------------------------------------------------------------
def test_energy_axis_ends_just_past_saturation_not_at_the_rank_bound(many):
    fig = drawn(figures.energy_figure(many.analyses, many.labels))
    # independently: the last k at which a checkpoint's cumulative energy Σ_{j≤k} σ_j²/Σσ² is below 0.999
    last_below = 0
    for decay in DECAYS:
        squares = torch.tensor([decay ** (2 * k) for k in range(SIZE)], dtype=torch.float64)
        cumulative = torch.cumsum(squares, 0) / squares.sum()
        last_below = max(last_below, int((cumulative < 0.999).nonzero().max()) + 1)  # k counts values
    assert 10 < last_below < 25 < SIZE
    for ax in fig.axes:
        if ax.get_visible() and ax.lines:
            high = ax.get_xlim()[1]
            assert last_below < high <= last_below * 1.3 + 2
            assert high < 0.6 * SIZE  # not the rank bound


def test_weights_near_a_third_have_enough_ticks(many):
    fig = drawn(figures.weights_figure(many.sequential))
    top = fig.axes[0]
    weights = [w for r in many.sequential.layers if r.composition for w in r.composition["weights"]["normalized"]]
    assert min(weights) > 0.3
    low, high = 0.0, max(weights)
    labelled = [t for t in top.get_yticklabels() if t.get_text() and low - 1e-9 <= t.get_position()[1] <= high]
    assert len(labelled) >= 3
    assert top.get_ylim()[1] >= high


def test_count_above_axis_fits_the_counts_when_rank_bounds_are_not_drawn(many):
    analyses = [*many.analyses, *many.ranked]  # rank bounds 2, 4, 8 and 48: too many to draw as lines
    fig = drawn(figures.count_above_figure(analyses))
    counts = [r.metrics["count_above"]["0.005"] for a in analyses for r in a.layers]
    assert max(counts) < 0.7 * SIZE
    for ax in fig.axes:
        if ax.get_visible() and ax.lines:
            assert max(counts) <= ax.get_ylim()[1] <= 1.2 * max(counts) + 1


# -- 4. heatmaps of several checkpoints -------------------------------------------------------------------------
def test_heatmaps_of_two_checkpoints_share_limits_and_one_colour_bar(many):
    fig = drawn(figures.erank_heatmap_figure([many.analyses[0], many.sequential], ["a", "b"]))
    colour_bars = [ax for ax in fig.axes if hasattr(ax, "_colorbar")]
    (block,) = [ax for ax in fig.axes if ax not in colour_bars]  # the two panels are one Axes (issue 15)
    (mesh,) = [c for c in block.collections if isinstance(c, QuadMesh)]
    assert len(colour_bars) == 1 and len(fig.axes) == 2
    assert colour_bars[0]._colorbar.mappable is mesh
    assert mesh.get_clim() == (0.0, float(SIZE))  # one norm for both panels: 0 … the largest rank bound
    assert [t.get_text() for t in block.texts] == ["a", "b"]  # a title over each panel
    utilisation = figures.erank_heatmap_figure(many.analyses[:2], metric="utilization", vmax=0.5)
    clims = {c.get_clim() for c in utilisation.findobj(QuadMesh)}
    assert clims == {(0.0, 0.5)}


def test_plot_erank_heatmap_takes_several_checkpoints(many, tmp_path):
    from rankscope.cli import main

    out = tmp_path / "heat.svg"
    args = ["plot", "erank-heatmap", str(many.paths[0]), str(many.paths[1]), "-o", str(out), "-q", "--vmax", "40"]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert out.read_bytes().startswith(b"<?xml")
    assert out.read_text().count(many.paths[0].name) == 1  # each panel titled by its checkpoint


# -- 5. ax= on every public figure function ---------------------------------------------------------------------
def user_axes(count: int):
    fig = Figure(figsize=(3 * count, 3))
    axes = fig.subplots(1, count, squeeze=False)[0]
    return fig, list(axes)


def content(ax) -> int:
    return len(ax.lines) + len(ax.collections) + len(ax.patches) + len(ax.images)


def calls(many):
    grid = subspace_similarity_grid(many.small.layers[0].update, many.large.layers[0].update)
    a, b = many.analyses[:3], many.labels[:3]  # 12 layers of 2 module types: a panel per type
    return {
        "spectrum_figure": (1, lambda ax: figures.spectrum_figure(a, b, ax=ax)),
        "spectrum_figure (panels)": (2, lambda ax: figures.spectrum_figure(a, b, ax=ax)),
        "energy_figure": (1, lambda ax: figures.energy_figure(a, b, ax=ax)),
        "count_above_figure": (1, lambda ax: figures.count_above_figure(a, b, ax=ax)),
        "count_above_figure (panels)": (2, lambda ax: figures.count_above_figure(a, b, ax=ax)),
        "erank_heatmap_figure": (1, lambda ax: figures.erank_heatmap_figure(a[0], ax=ax)),
        "erank_heatmap_figure (panels)": (3, lambda ax: figures.erank_heatmap_figure(a, b, ax=ax)),
        "growth_figure": (1, lambda ax: figures.growth_figure(many.sequential, ax=ax)),
        "alignment_figure": (3, lambda ax: figures.alignment_figure(many.sequential.layers[0], ax=ax)),
        "subspace_similarity_figure": (1, lambda ax: figures.subspace_similarity_figure(grid, ["r8", "r64"], ax=ax)),
        "weights_figure": (2, lambda ax: figures.weights_figure(many.sequential, ax=ax)),
    }


NAMES = [
    "spectrum_figure", "spectrum_figure (panels)", "energy_figure", "count_above_figure",
    "count_above_figure (panels)", "erank_heatmap_figure", "erank_heatmap_figure (panels)", "growth_figure",
    "alignment_figure", "subspace_similarity_figure", "weights_figure",
]  # fmt: skip


@pytest.mark.parametrize("name", NAMES)
def test_every_figure_function_draws_into_given_axes(name, many):
    count, call = calls(many)[name]
    fig, axes = user_axes(count)
    returned = call(axes[0] if count == 1 else axes)
    assert returned is fig
    assert all(content(ax) > 0 for ax in axes), [content(ax) for ax in axes]
    extra = [ax for ax in fig.axes if ax not in axes]
    assert all(hasattr(ax, "_colorbar") for ax in extra)  # nothing but a colour bar beside them
    assert tuple(fig.get_size_inches()) == (3.0 * count, 3.0)  # the caller's figure keeps its size
    drawn(fig)


def test_public_figure_functions_are_the_top_level_ones():
    for name in ("spectrum_figure", "energy_figure", "count_above_figure", "erank_heatmap_figure", "growth_figure",
                 "alignment_figure", "subspace_similarity_figure", "weights_figure"):  # fmt: skip
        assert getattr(rankscope, name) is getattr(figures, name)


def test_wrong_number_of_axes_is_one_clear_error(many):
    _, axes = user_axes(2)
    with pytest.raises(FigureInputError, match="draws 3 panels here; ax= gave 2 axes"):
        figures.alignment_figure(many.sequential.layers[0], ax=axes)
    with pytest.raises(FigureInputError, match="ax must be a matplotlib Axes"):
        figures.spectrum_figure(many.analyses[:1], ax=["not an axes"])
