"""A zero update (every σ = 0) and layers of different numerical rank in the figures' summaries: the median at
index i is over every layer, a σᵢ beyond a layer's rank counting as 0 (it was over the layers still having a σᵢ,
which dropped the zero layer and raised the tail); the legend says how many layers are zero, and in which panel;
every panel's y range holds every value drawn in any panel (medians and quartile bands)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import rankscope

from .factories import lora_config, random_factors, write_lora

matplotlib = pytest.importorskip("matplotlib")

from rankscope import figures  # noqa: E402

NAMES = [f"model.layers.{i}.self_attn.q_proj" for i in range(3)]


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    factors = {}
    for i, name in enumerate(NAMES):
        a, b = random_factors(24, 24, 4, seed=i)
        if i == 1:
            b[:, 2:] = 0  # numerical rank 2
        if i == 2:
            b.zero_()  # a zero update
        factors[name] = (a, b)
    directory = write_lora(tmp_path_factory.mktemp("zero") / "adapter", factors, lora_config(r=4, lora_alpha=4))
    return rankscope.analyze(rankscope.load(directory)), factors


def _texts(fig) -> list[str]:
    return [t.get_text() for ax in fig.axes for t in ax.texts]


def _legend(fig) -> list[str]:
    legends = [*fig.legends, *(ax.get_legend() for ax in fig.axes if ax.get_legend() is not None)]
    return [t.get_text() for legend in legends for t in legend.get_texts()]


def test_the_median_spectrum_counts_every_layer(adapter):
    analysis, factors = adapter
    fig = figures.module_spectra_figure([analysis], ["adapter"])
    (line,) = [line for line in fig.axes[0].get_lines() if line.get_label() == "adapter"]
    padded = []
    for name in NAMES:  # σ of B·A in float64, numerically zero ones (below 1e-10·σ₁) as 0
        a, b = factors[name]
        sigma = torch.linalg.svdvals(b.double() @ a.double())[:4]
        padded.append(torch.where(sigma > 1e-10 * max(float(sigma[0]), 1e-300), sigma, 0.0).tolist())
    expected = np.median(np.array(padded), axis=0)
    drawn = np.nan_to_num(np.asarray(line.get_ydata(), dtype=float))  # a median of 0 is a gap on the log axis
    assert drawn.tolist() == pytest.approx(expected.tolist())
    assert expected[2] == 0 and expected[1] > 0  # past the rank-2 layer's rank, two of three layers are 0
    assert "adapter (1 layer all σ = 0)" in _legend(fig), _legend(fig)


def test_the_energy_median_leaves_the_zero_layer_out(tmp_path):
    """Energy shares of a zero update are 0/0: the median (10 layers: one curve, their median) is over the other
    layers, each at 1 past its numerical rank."""
    factors = {}
    for i in range(10):
        a, b = random_factors(24, 24, 4, seed=30 + i)
        b[:, 4 - i % 4 :] = 0  # numerical ranks 4, 3, 2, 1, 4, …
        factors[f"model.layers.{i}.self_attn.q_proj"] = (a, b.zero_() if i == 5 else b)
    directory = write_lora(tmp_path / "ten", factors, lora_config(r=4, lora_alpha=4, target_modules=["q_proj"]))
    fig = figures.energy_figure([rankscope.analyze(rankscope.load(directory))], ["ten"])
    (line,) = [line for line in fig.axes[0].get_lines() if line.get_label() == "q_proj"]
    curves = []
    for i, (a, b) in enumerate(factors.values()):
        if i != 5:
            squares = torch.linalg.svdvals(b.double() @ a.double())[:4] ** 2
            squares = torch.where(squares > 1e-20 * squares[0], squares, 0.0)
            curves.append([0.0, *(squares.cumsum(0) / squares.sum()).tolist()])
    assert list(line.get_ydata()) == pytest.approx(np.median(np.array(curves), axis=0).tolist(), abs=1e-6)
    assert "q_proj (1 layer all σ = 0, left out)" in _legend(fig), _legend(fig)


def test_a_zero_layer_drawn_by_name_is_said_in_the_legend(adapter):
    """``rankscope plot spectrum --layer A --layer B`` with B a zero update: B's entry says why it has no line."""
    analysis, _ = adapter
    for draw in (figures.spectrum_figure, figures.energy_figure):
        fig = draw([analysis], ["adapter"], layers=[NAMES[0], NAMES[2]])
        assert _legend(fig)[:2] == ["0 q_proj", "2 q_proj (all σ = 0)"], _legend(fig)
    alone = figures.spectrum_figure([analysis], ["adapter"], layers=[NAMES[2]])
    assert "all singular values are 0" in _texts(alone)


def test_the_zero_layers_panel_is_named_in_the_legend(adapter, tmp_path):
    """Two checkpoints, one panel per module type: the legend names the panel holding the zero layer."""
    analysis, _ = adapter
    factors = {name.replace("q_proj", "v_proj"): random_factors(24, 24, 4, seed=9 + i) for i, name in enumerate(NAMES)}
    factors.update({name: random_factors(24, 24, 4, seed=20 + i) for i, name in enumerate(NAMES)})
    other = write_lora(tmp_path / "other", factors, lora_config(r=4, target_modules=["q_proj", "v_proj"]))
    fig = figures.spectrum_figure([analysis, rankscope.analyze(rankscope.load(other))], ["adapter", "other"])
    assert [ax.get_title() for ax in fig.axes if ax.get_title()] == ["q_proj", "v_proj"]
    assert _legend(fig)[:2] == ["adapter (1 layer all σ = 0 in q_proj)", "other"], _legend(fig)


def _drawn_values(ax) -> np.ndarray:
    """Every y drawn in ``ax`` by the curves (lines of more than two points) and their quartile bands."""
    ys = [np.asarray(line.get_ydata(), dtype=float) for line in ax.get_lines() if len(line.get_ydata()) > 2]
    ys += [path.vertices[:, 1] for band in ax.collections for path in band.get_paths()]
    ys = np.concatenate(ys)
    return ys[np.isfinite(ys) & (ys > 0)]


def test_a_median_with_a_zero_layer_is_inside_the_axis(adapter):
    """The median of a layer and a zero layer is σᵢ/2, its lower quartile σᵢ/4: under the smallest σ of the
    records, which had set the bottom of the axis (no τ line here to lower it). Where a lower quartile is 0 (two
    of three layers past their rank) the band reaches down to the bottom of the log axis, not a gap."""
    analysis, _ = adapter
    fig = figures.module_spectra_figure([analysis], ["adapter"], layers=[NAMES[0], NAMES[2]], thresholds=[])
    (ax,) = fig.axes
    low, high = ax.get_ylim()
    drawn = _drawn_values(ax)
    assert low <= drawn.min() and drawn.max() <= high
    assert drawn.min() == pytest.approx(analysis.layers[0].singular_values[3] / 4)
    fig = figures.module_spectra_figure([analysis], ["adapter"], thresholds=[])
    (ax,) = fig.axes
    (band,) = ax.collections
    vertices = band.get_paths()[0].vertices
    lower = {x: y for x, y in vertices[: len(vertices) // 2]}  # fill_between: the lower edge, then the upper
    assert lower[3.0] == lower[4.0] == ax.get_ylim()[0] and lower[2.0] > ax.get_ylim()[0]


def test_every_panel_holds_every_panels_curves_and_bands():
    """The bundled LoRA, BoRA and DoRA adapters (6 module-type panels, quartiles shaded): one y range that holds
    every panel's medians and quartile bands (the last panel's limits had won: DoRA's tail fell below q_proj's)."""
    from pathlib import Path

    examples = Path(__file__).resolve().parent.parent / "examples" / "checkpoints"
    base = examples / "tiny-base"
    names = ("lora-r8", "bora-r8-b4", "dora-r8")
    analyses = [rankscope.analyze(rankscope.load(examples / "adapters" / n, base=base)) for n in names]
    fig = figures.spectrum_figure(analyses, list(names))
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert len(panels) == 6 and len({ax.get_ylim() for ax in panels}) == 1
    for ax in panels:
        low, high = ax.get_ylim()
        drawn = _drawn_values(ax)
        assert low <= drawn.min() and drawn.max() <= high, ax.get_title()


def test_facets_sharing_the_y_axis_show_every_panels_values(tmp_path):
    """Panels of very different σ ranges (rank 4 against a rank-16 layer of tiny σ) share one y axis: it spans
    every panel's plotted values (the last panel's limits had won, dropping the others' below the axis)."""
    a, b = random_factors(24, 24, 16, seed=5)
    small = {
        NAMES[0]: (a, b * torch.logspace(0, -4, 16)),
        "model.layers.0.self_attn.v_proj": random_factors(24, 24, 16, 6),
    }
    directory = write_lora(tmp_path / "ranges", small, lora_config(r=16, lora_alpha=16))
    fig = figures.module_spectra_figure([rankscope.analyze(rankscope.load(directory))], ["adapter"])
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert len(panels) == 2
    for ax in panels:
        low, high = ax.get_ylim()
        drawn = np.concatenate([np.asarray(line.get_ydata(), dtype=float) for line in ax.get_lines()
                                if line.get_label() == "adapter"])  # fmt: skip
        drawn = drawn[np.isfinite(drawn) & (drawn > 0)]
        assert drawn.size and low <= drawn.min() and drawn.max() <= high, ax.get_title()
