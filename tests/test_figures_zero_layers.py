"""A zero update (every σ = 0) and layers of different numerical rank in the figures' summaries: the median at
index i is over every layer, a σᵢ beyond a layer's rank counting as 0 (it was over the layers still having a σᵢ,
which dropped the zero layer and raised the tail); the panel says which layer is zero."""

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
    assert any(t.endswith(": every σ is 0\n(as 0 in the median)") for t in _texts(fig)), _texts(fig)


def test_the_energy_figure_says_the_zero_layer_has_no_fractions(adapter):
    fig = figures.energy_figure([adapter[0]], ["adapter"])
    assert any(t.endswith("every σ is 0\n(no fractions: left out)") for t in _texts(fig)), _texts(fig)


def test_a_zero_layer_alone_is_said_in_the_panel(adapter):
    fig = figures.spectrum_figure([adapter[0]], ["adapter"], layers=[NAMES[2]])
    assert any(t.endswith("every σ is 0") for t in _texts(fig))


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
