"""Figures: every kind renders to PDF/PNG/SVG, paper-ready (TrueType fonts, widths, 7–9 pt text), deterministic,
readable with hundreds of layers, and drawing exactly the records' numbers; the φ(i, j) grid against a dense
float64 reference computed here."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import rankscope
from rankscope.core.errors import RankscopeError
from rankscope.measures.components import subspace_similarity_grid

from .factories import llama_like, lora_config, random_factors, write_lora

matplotlib = pytest.importorskip("matplotlib")

from matplotlib.collections import QuadMesh  # noqa: E402
from matplotlib.text import Text  # noqa: E402

from rankscope import figures  # noqa: E402
from rankscope.figures import FigureInputError  # noqa: E402
from rankscope.figures.output import output_paths  # noqa: E402
from rankscope.figures.style import LINESTYLES, MARKERS, PALETTE, figure_width, series_style  # noqa: E402

TINY_LORA = Path(__file__).resolve().parent.parent / "examples" / "checkpoints" / "tiny-lora"
EXAMPLES = TINY_LORA.parent
MODULES = (
    ("self_attn", "q_proj"),
    ("self_attn", "k_proj"),
    ("self_attn", "v_proj"),
    ("self_attn", "o_proj"),
    ("mlp", "gate_proj"),
    ("mlp", "up_proj"),
    ("mlp", "down_proj"),
)


# -- checkpoints ---------------------------------------------------------------------------------------------
def many_layers(directory: Path, *, layers: int = 32, hidden: int = 8, rank: int = 4, seed: int = 0) -> Path:
    """A Llama-shaped LoRA on all seven projections of ``layers`` blocks (32 × 7 = 224 layers), tiny matrices."""
    factors = {}
    for i in range(layers):
        for j, (block, module) in enumerate(MODULES):
            factors[f"model.layers.{i}.{block}.{module}"] = random_factors(hidden, hidden, rank, seed + 100 * i + j)
    return write_lora(directory, factors, lora_config(r=rank, target_modules=[m for _, m in MODULES]))


def ranked_lora(directory: Path, ranks: list[int], *, hidden: int = 12, rank: int = 4) -> tuple[Path, dict]:
    """q_proj in len(ranks) blocks; block i's B has only ranks[i] nonzero columns, so ΔW_i has rank ranks[i]."""
    factors = {}
    for i, keep in enumerate(ranks):
        a, b = random_factors(hidden, hidden, rank, 7 + i)
        b[:, keep:] = 0.0
        factors[f"model.layers.{i}.self_attn.q_proj"] = (a, b)
    return write_lora(directory, factors, lora_config(r=rank, lora_alpha=2 * rank, target_modules=["q_proj"])), factors


def composition(directory: Path, *, mode: str = "sequential", weights=(0.6, 0.3, 0.1)) -> Path:
    """A composition.json over three LoRA directories of the same (Llama-shaped) base."""
    names = []
    for i in range(len(weights)):
        llama_like(directory / f"round{i}", layers=3, hidden=16, rank=4, seed=100 * i)
        names.append(f"round{i}")
    manifest = {"format": "rankscope.composition/1", "mode": mode, "components": names, "weights": list(weights)}
    (directory / "composition.json").write_text(json.dumps(manifest))
    return directory


def rank8_rank64(directory: Path) -> tuple[Path, Path]:
    """The same layer trained at r=8 and r=64 (random factors; the r=64 update shares the r=8 input directions)."""
    generator = torch.Generator().manual_seed(3)
    a8 = torch.randn(8, 80, generator=generator)
    a64 = torch.cat([4 * a8, torch.randn(56, 80, generator=generator)])
    name = "model.layers.0.self_attn.q_proj"
    small = write_lora(directory / "r8", {name: (a8, torch.randn(72, 8, generator=generator))}, lora_config(r=8))
    large = write_lora(directory / "r64", {name: (a64, torch.randn(72, 64, generator=generator))}, lora_config(r=64))
    return small, large


def analyze(path: Path, base: Path | None = None, **options) -> rankscope.Analysis:
    return rankscope.analyze(rankscope.load(path, base=base), **options)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("figures")
    small, large = rank8_rank64(root)
    return SimpleNamespace(
        tiny=analyze(TINY_LORA),
        lora4=analyze(llama_like(root / "lora4", layers=3, hidden=16, rank=4, seed=1)),
        lora8=analyze(llama_like(root / "lora8", layers=3, hidden=16, rank=8, seed=2)),
        big=analyze(many_layers(root / "big")),
        big2=analyze(many_layers(root / "big2", rank=2, seed=5)),
        sequential=analyze(composition(root / "sequential")),
        summed=analyze(composition(root / "summed", mode="sum")),
        small=rankscope.load(small),
        large=rankscope.load(large),
        based=analyze(EXAMPLES / "adapters" / "lora-r8", base=EXAMPLES / "tiny-base"),
    )


def draw(kind: str, data: SimpleNamespace, **kwargs):
    """One figure of each kind from the fixtures."""
    if kind == "spectrum":
        return figures.spectrum_figure([data.lora4, data.lora8], ["r=4", "r=8"], **kwargs)
    if kind == "energy":
        return figures.energy_figure([data.tiny], ["tiny"], **kwargs)
    if kind == "count-above":
        return figures.count_above_figure([data.lora4, data.lora8], ["r=4", "r=8"], **kwargs)
    if kind == "erank-heatmap":
        return figures.erank_heatmap_figure(data.tiny, **kwargs)
    if kind == "alignment":
        return figures.alignment_figure(data.sequential.layers[0], **kwargs)
    if kind == "weights":
        return figures.weights_figure(data.sequential, **kwargs)
    if kind == "growth":
        return figures.growth_figure(data.sequential, **kwargs)
    if kind == "subspace-similarity":
        grid = subspace_similarity_grid(data.small.layers[0].update, data.large.layers[0].update)
        return figures.subspace_similarity_figure(grid, ["r=8", "r=64"], **kwargs)
    if kind == "resize":
        return figures.resize_figure(data.lora8, **kwargs)
    if kind == "base-heatmap":
        return figures.base_heatmap_figure(data.based, **kwargs)
    raise AssertionError(kind)


# -- reading rendered files -----------------------------------------------------------------------------------
def media_box(pdf: bytes) -> tuple[float, float]:
    match = re.search(rb"/MediaBox \[\s*0 0 ([\d.]+) ([\d.]+)\s*\]", pdf)
    assert match, "no MediaBox"
    return float(match.group(1)), float(match.group(2))


def png_pixels(png: bytes):
    import matplotlib.image

    return matplotlib.image.imread(io.BytesIO(png), format="png")


def visible_texts(fig) -> list[Text]:
    fig.draw_without_rendering()  # tick labels exist once the figure is laid out
    return [t for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]


def legend_entries(fig) -> int:
    legends = list(fig.legends) + [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    return sum(len(legend.get_texts()) for legend in legends)


# -- every kind, every format ---------------------------------------------------------------------------------
def test_importing_rankscope_does_not_import_matplotlib():
    code = "import rankscope, rankscope.cli, rankscope.figures, sys; assert 'matplotlib' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.parametrize("kind", figures.KINDS)
def test_every_kind_renders_paper_ready(kind, data):
    fig = draw(kind, data, width="column")
    pdf = figures.figure_bytes(fig, "pdf")
    assert pdf.startswith(b"%PDF")
    # TrueType fonts embedded (the font dictionaries are not compressed), never Type 3 bitmaps
    assert b"/FontFile2" in pdf and b"/Type3" not in pdf
    assert b"DejaVuSans" in pdf
    assert media_box(pdf)[0] == pytest.approx(234.0)
    assert not re.search(rb"/(CreationDate|Producer|Creator)", pdf)

    pixels = png_pixels(figures.figure_bytes(fig, "png"))
    assert pixels.shape[1] == 975  # 3.25 in at 300 dpi
    assert float(pixels[..., :3].var()) > 1e-3  # not blank

    svg = figures.svg_text(fig)
    assert svg.startswith("<svg") and "<?xml" not in svg and "DOCTYPE" not in svg
    assert 'width="234pt"' in svg
    assert "<dc:date>" not in svg

    sizes = {round(t.get_fontsize(), 2) for t in visible_texts(fig)}
    assert sizes and all(7.0 <= s <= 9.0 for s in sizes), sizes


@pytest.mark.parametrize("kind", figures.KINDS)
def test_same_input_same_bytes(kind, data):
    first, second = draw(kind, data), draw(kind, data)
    assert figures.figure_bytes(first, "pdf") == figures.figure_bytes(second, "pdf")
    assert figures.figure_bytes(first, "svg") == figures.figure_bytes(second, "svg")
    assert figures.svg_text(first) == figures.svg_text(second)


@pytest.mark.parametrize(("width", "points"), [("column", 234.0), ("full", 486.0), (4.5, 324.0), ("2.5", 180.0)])
def test_widths(width, points, data):
    assert media_box(figures.figure_bytes(draw("spectrum", data, width=width), "pdf"))[0] == pytest.approx(points)


def test_weights_default_to_full_width(data):
    assert media_box(figures.figure_bytes(figures.weights_figure(data.sequential), "pdf"))[0] == pytest.approx(486.0)


@pytest.mark.parametrize("width", ["half", "0.5", 40, "nan"])
def test_bad_widths(width):
    with pytest.raises(ValueError):
        figure_width(width)


def test_series_survive_black_and_white():
    styles = [series_style(i) for i in range(6)]
    assert len({s["color"] for s in styles}) == 6
    assert len({(str(s["linestyle"]), s["marker"]) for s in styles}) == 6
    assert len(set(PALETTE)) == len(PALETTE) and len(set(MARKERS)) == len(MARKERS)
    assert len({str(s) for s in LINESTYLES}) == len(LINESTYLES)


# -- many layers ----------------------------------------------------------------------------------------------
def test_224_layers_stay_readable(data):
    assert len(data.big.layers) == 224
    for fig in (
        figures.spectrum_figure([data.big], ["r=4"]),
        figures.spectrum_figure([data.big, data.big2], ["r=4", "r=2"]),
        figures.energy_figure([data.big, data.big2], ["r=4", "r=2"]),
        figures.count_above_figure([data.big, data.big2], ["r=4", "r=2"]),
        figures.count_above_figure([data.big], ["r=4"]),
    ):
        assert 1 <= legend_entries(fig) <= 10
        for ax in fig.axes:
            assert len(ax.get_lines()) <= 10  # curves summarised, never one per layer
        sizes = {round(t.get_fontsize(), 2) for t in visible_texts(fig)}
        assert all(7.0 <= s <= 9.0 for s in sizes)
    heatmap = figures.erank_heatmap_figure(data.big)
    (mesh,) = [c for c in heatmap.axes[0].collections if isinstance(c, QuadMesh)]
    assert mesh.get_array().shape == (7, 32)
    ytick_labels = [t.get_text() for t in heatmap.axes[0].get_yticklabels()]
    assert ytick_labels == [m for _, m in MODULES]  # attention first, then the MLP


# -- the figures draw the records' numbers ------------------------------------------------------------------
def test_spectrum_draws_the_singular_values(data):
    name = "model.layers.1.self_attn.v_proj"
    fig = figures.spectrum_figure([data.lora4, data.lora8], ["r=4", "r=8"], layers=[name])
    lines = [line for line in fig.axes[0].get_lines() if line.get_label() in ("r=4", "r=8")]
    assert [line.get_label() for line in lines] == ["r=4", "r=8"]
    for line, analysis in zip(lines, (data.lora4, data.lora8), strict=True):
        record = next(r for r in analysis.layers if r.name == name)
        assert list(line.get_xdata()) == list(range(1, record.rank_bound + 1))
        assert list(line.get_ydata()) == pytest.approx(record.singular_values)
    assert fig.axes[0].get_yscale() == "log"
    assert legend_entries(fig) == 2


def test_energy_curve_is_the_cumulative_share_of_sigma_squared(data):
    record = data.tiny.layers[4]
    fig = figures.energy_figure([data.tiny], ["tiny"], layers=[record.name])
    (line,) = [line for line in fig.axes[0].get_lines() if len(line.get_xdata()) > 2]
    sigma = torch.tensor(record.singular_values, dtype=torch.float64)
    expected = torch.cat([torch.zeros(1, dtype=torch.float64), (sigma**2).cumsum(0) / (sigma**2).sum()])
    assert list(line.get_ydata()) == pytest.approx(expected.tolist())


def _guide_levels(ax) -> list[float]:
    """The y of each horizontal guide line (two x points spanning the axes) drawn in ``ax``."""
    return sorted(
        line.get_ydata()[0]
        for line in ax.get_lines()
        if len(line.get_xdata()) == 2 and line.get_ydata()[0] == line.get_ydata()[1]
    )


def test_guides_are_the_given_thresholds_and_levels(data):
    name = "model.layers.1.self_attn.v_proj"
    default = figures.spectrum_figure([data.lora4], ["r=4"], layers=[name])
    assert _guide_levels(default.axes[0]) == pytest.approx(sorted(data.lora4.options.thresholds))
    chosen = figures.spectrum_figure([data.lora4], ["r=4"], layers=[name], thresholds=[0.02, 0.001, 0])
    assert _guide_levels(chosen.axes[0]) == pytest.approx([0.001, 0.02])  # τ = 0 draws nothing on a log axis
    energy = figures.energy_figure([data.tiny], ["tiny"], layers=[name], levels=[0.5, 0.8])
    assert _guide_levels(energy.axes[0]) == pytest.approx([0.5, 0.8])
    with pytest.raises(ValueError, match="levels"):
        figures.energy_figure([data.tiny], ["tiny"], levels=[1.5])


def test_count_above_matches_an_independent_count(tmp_path):
    ranks = [1, 3, 2, 4, 4]
    path, factors = ranked_lora(tmp_path / "ranked", ranks)
    fig = figures.count_above_figure([analyze(path)], ["ranked"])
    (ax,) = fig.axes
    (line,) = [line for line in ax.get_lines() if len(line.get_xdata()) == len(ranks)]
    expected = []
    for i in range(len(ranks)):
        a, b = factors[f"model.layers.{i}.self_attn.q_proj"]
        expected.append(int((torch.linalg.svdvals(2.0 * b.double() @ a.double()) > 0.005).sum()))
    assert expected == ranks
    assert list(line.get_xdata()) == list(range(len(ranks)))
    assert list(line.get_ydata()) == expected
    assert ax.get_xlabel() == "layer index" and ax.get_ylabel() == "count σ > 0.005"


def test_count_above_needs_a_computed_threshold(data):
    with pytest.raises(FigureInputError, match="thresholds or energies"):
        figures.count_above_figure([data.tiny], threshold=0.01)
    fig = figures.count_above_figure([analyze(TINY_LORA, thresholds=(0.005, 1.0))], threshold=1.0)
    assert "count σ > 1" in [t.get_text() for t in visible_texts(fig)]


def test_heatmap_cells_are_the_metric(data):
    fig = figures.erank_heatmap_figure(data.tiny, metric="utilization")
    (mesh,) = [c for c in fig.axes[0].collections if isinstance(c, QuadMesh)]
    values = mesh.get_array()
    rows = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    for record in data.tiny.layers:
        assert values[rows.index(record.module_type), record.layer_index] == pytest.approx(
            record.metrics["utilization"]
        )
    with pytest.raises(FigureInputError, match="unknown metric"):
        figures.erank_heatmap_figure(data.tiny, metric="nonsense")


def test_heatmap_colours_are_fixed_by_meaning_and_shareable(data):
    """utilisation spans 0–1 and erank 0 … the rank bound, whatever the data's spread; a report passes one range."""

    def limits(fig):
        (mesh,) = [c for c in fig.axes[0].collections if isinstance(c, QuadMesh)]
        return mesh.get_clim()

    assert limits(figures.erank_heatmap_figure(data.tiny, metric="utilization")) == (0.0, 1.0)
    assert limits(figures.erank_heatmap_figure(data.lora4)) == (0.0, 4.0)
    assert limits(figures.erank_heatmap_figure(data.lora8)) == (0.0, 8.0)
    shared = figures.heatmap_limits([data.lora4, data.lora8])
    assert shared == (0.0, 8.0)
    assert limits(figures.erank_heatmap_figure(data.lora4, vmin=shared[0], vmax=shared[1])) == shared
    with pytest.raises(FigureInputError, match="colour range"):
        figures.erank_heatmap_figure(data.lora4, vmin=3, vmax=2)


def test_heatmap_marks_missing_layers(tmp_path):
    factors = {f"model.layers.{i}.self_attn.q_proj": random_factors(8, 8, 2, i) for i in range(3)}
    factors["model.layers.0.self_attn.v_proj"] = random_factors(8, 8, 2, 9)
    analysis = analyze(write_lora(tmp_path / "gappy", factors, lora_config(r=2)))
    fig = figures.erank_heatmap_figure(analysis)
    (mesh,) = [c for c in fig.axes[0].collections if isinstance(c, QuadMesh)]
    mask = mesh.get_array().mask
    assert mask.shape == (2, 3) and mask.sum() == 2  # v_proj only in block 0
    assert any("no layer" in t.get_text() for t in visible_texts(fig))


def test_alignment_draws_the_records_matrices(data):
    record = data.sequential.layers[0]
    fig = figures.alignment_figure(record)
    meshes = [c for ax in fig.axes[:3] for c in ax.collections if isinstance(c, QuadMesh)]
    assert len(meshes) == 3
    for mesh, key in zip(meshes, ("left_overlap", "right_overlap", "cosine"), strict=True):
        assert mesh.get_array().ravel().tolist() == pytest.approx([v for row in record.alignment[key] for v in row])
    names = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert names == ["1: round0", "2: round1", "3: round2"]
    with pytest.raises(FigureInputError, match="no alignment"):
        figures.alignment_figure(data.tiny.layers[0])


def test_weights_draw_weights_and_energy_shares(data):
    records = [r for r in data.sequential.layers if r.composition]
    fig = figures.weights_figure(data.sequential)
    top, bottom = fig.axes[:2]
    weights = [line.get_ydata().tolist() for line in top.get_lines() if len(line.get_xdata()) == len(records)]
    assert weights == [[0.6] * len(records), [0.3] * len(records), [0.1] * len(records)]
    heights = [[bar.get_height() for bar in container] for container in bottom.containers]
    for i in range(3):
        assert heights[i] == pytest.approx([r.composition["energy_shares"]["values"][i] for r in records])
    assert sum(heights[i][0] for i in range(3)) == pytest.approx(1.0)
    with pytest.raises(FigureInputError, match="no composed layers"):
        figures.weights_figure(data.tiny)


def test_growth_draws_the_growth_records(data):
    records = [r for r in data.sequential.layers if r.composition]
    fig = figures.growth_figure(data.sequential)
    (ax,) = fig.axes
    curves = [line for line in ax.get_lines() if line.get_label() != "rank bound" and len(line.get_xdata()) == 3]
    assert len(curves) == len(records)  # six layers: one curve each
    for line, record in zip(curves, records, strict=True):
        assert list(line.get_ydata()) == pytest.approx([g["metrics"]["erank"] for g in record.composition["growth"]])
    with pytest.raises(FigureInputError, match="sequential"):
        figures.growth_figure(data.summed)
    with pytest.raises(FigureInputError, match="no composed layers"):
        figures.growth_figure(data.tiny)


def test_spectrum_rejects_unknown_layers(data):
    with pytest.raises(FigureInputError, match="no layer named 'nope'"):
        figures.spectrum_figure([data.tiny], layers=["nope"])
    with pytest.raises(FigureInputError, match="labels"):
        figures.spectrum_figure([data.tiny, data.lora4], ["same", "same"])


# -- the φ(i, j) grid -----------------------------------------------------------------------------------------
def reference_phi(w_a: torch.Tensor, w_b: torch.Tensor, side: str) -> torch.Tensor:
    """φ(i, j) = ‖U_iᵀV_j‖_F²/min(i, j) from float64 SVDs of the dense matrices, by the definition, in loops."""
    bases = []
    for w in (w_a, w_b):
        u, _, vh = torch.linalg.svd(w, full_matrices=False)
        rank = int(torch.linalg.matrix_rank(w.float()))
        bases.append((u if side == "left" else vh.mT)[:, :rank])
    a, b = bases
    grid = torch.empty(a.shape[1], b.shape[1], dtype=torch.float64)
    for i in range(1, a.shape[1] + 1):
        for j in range(1, b.shape[1] + 1):
            grid[i - 1, j - 1] = (a[:, :i].mT @ b[:, :j]).pow(2).sum() / min(i, j)
    return grid


@pytest.mark.parametrize("side", ["right", "left"])
def test_subspace_similarity_grid_against_dense_svd(side, data):
    a, b = data.small.layers[0].update, data.large.layers[0].update
    grid = subspace_similarity_grid(a, b, side=side)
    expected = reference_phi(a.materialize(), b.materialize(), side)
    assert grid.shape == expected.shape == (8, 64)
    assert torch.allclose(grid, expected, atol=1e-9)
    assert float(grid.min()) >= -1e-12 and float(grid.max()) <= 1 + 1e-12
    if side == "right":
        assert float(grid[7, 7]) > 0.9  # r=64 holds r=8's input directions, scaled up: they lead its spectrum


def test_subspace_similarity_grid_properties(data):
    update = data.small.layers[0].update
    same = subspace_similarity_grid(update, update)
    assert torch.allclose(torch.diagonal(same), torch.ones(8, dtype=torch.float64), atol=1e-10)
    zero = rankscope.FactoredUpdate(torch.zeros(72, 8), torch.zeros(8, 80))
    assert subspace_similarity_grid(update, zero).shape == (8, 0)
    with pytest.raises(ValueError, match="side"):
        subspace_similarity_grid(update, update, side="up")
    other = rankscope.FactoredUpdate(torch.randn(72, 2), torch.randn(2, 40))
    with pytest.raises(ValueError, match="right spaces differ"):
        subspace_similarity_grid(update, other)
    with pytest.raises(FigureInputError, match="zero"):
        figures.subspace_similarity_figure(subspace_similarity_grid(update, zero), ["a", "b"])


def test_subspace_figure_draws_the_grid(data):
    grid = subspace_similarity_grid(data.small.layers[0].update, data.large.layers[0].update)
    fig = figures.subspace_similarity_figure(grid, ["r=8", "r=64"])
    (mesh,) = [c for c in fig.axes[0].collections if isinstance(c, QuadMesh)]
    assert mesh.get_array().ravel().tolist() == pytest.approx(grid.reshape(-1).tolist())
    assert "r=64" in fig.axes[0].get_xlabel() and "r=8" in fig.axes[0].get_ylabel()


# -- saving ----------------------------------------------------------------------------------------------------
def test_save_figure_writes_each_format_atomically(data, tmp_path):
    fig = draw("growth", data)
    written = figures.save_figure(fig, tmp_path / "growth", ("pdf", "png", "svg"))
    assert written == [tmp_path / "growth.pdf", tmp_path / "growth.png", tmp_path / "growth.svg"]
    assert written[0].read_bytes().startswith(b"%PDF")
    assert written[1].read_bytes().startswith(b"\x89PNG")
    assert b"<svg" in written[2].read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["growth.pdf", "growth.png", "growth.svg"]
    assert output_paths("a/FIG.PDF", ["pdf", "png"]) == [Path("a/FIG.PDF"), Path("a/FIG.png")]
    assert output_paths("fig.v2", ["svg"]) == [Path("fig.v2.svg")]
    with pytest.raises(RankscopeError, match="cannot write"):
        figures.save_figure(fig, tmp_path / "missing" / "fig", ("pdf",))
    with pytest.raises(ValueError, match="formats"):
        figures.save_figure(fig, tmp_path / "fig", ("jpg",))
    assert not (tmp_path / "missing").exists()
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*"))


def test_quartiles_per_position_over_ragged_vectors():
    """The quartile bands: at each position, numpy's 25/50/75 % over the vectors long enough to have it."""
    import numpy as np

    from rankscope.figures._common import quartiles

    rng = np.random.default_rng(3)
    for count in (0, 1, 2, 7):
        vectors = [list(rng.standard_normal(int(rng.integers(0, 30)))) for _ in range(count)]
        length = max((len(v) for v in vectors), default=0)
        expected = [np.percentile([v[i] for v in vectors if len(v) > i], [25, 50, 75]) for i in range(length)]
        low, mid, high = quartiles(vectors)
        assert len(low) == len(mid) == len(high) == length
        for i, (q1, q2, q3) in enumerate(expected):
            assert (low[i], mid[i], high[i]) == (q1, q2, q3), i


def test_count_above_of_one_layer_index_ticks_at_it(tmp_path):
    """Layers all at one index (one block): the x axis is one integer tick at it over [i − 1, i + 1], not
    autoscaled fractions around it."""
    from tests.factories import lora_config, random_factors, write_lora

    factors = {
        f"model.layers.0.self_attn.{m}": random_factors(12, 12, 3, seed) for seed, m in enumerate(["q_proj", "v_proj"])
    }
    path = write_lora(tmp_path / "one", factors, lora_config(r=3))
    fig = figures.count_above_figure([analyze(path)], ["one"])
    for ax in fig.axes:
        if ax.get_xticks().size:
            assert list(ax.get_xticks()) == [0.0] and ax.get_xlim() == (-1.0, 1.0)
