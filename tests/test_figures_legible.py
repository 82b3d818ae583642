"""Texts of the figures that must not run into each other or off the figure, measured once laid out: long module
types' panel titles and legend entries (ellipsized, as heatmap rows), the count-above axis' rank-bound ticks,
the resize figure's "now" label beside the rules' markers, the base heatmap's colour-bar labels."""

from __future__ import annotations

from itertools import combinations
from pathlib import Path

import pytest

import rankscope

from .factories import lora_config, random_factors, write_lora

matplotlib = pytest.importorskip("matplotlib")

from rankscope import figures  # noqa: E402

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "checkpoints"
LONG = ("cross_attention_projection_for_conditioning_tokens_number_zero",
        "cross_attention_projection_for_conditioning_tokens_number_one", "short")  # fmt: skip


def _laid_out(fig):
    """Lay the figure out on an Agg canvas (the figures are drawn without pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig).draw()
    return fig


def _boxes(fig, texts):
    renderer = fig.canvas.get_renderer()
    return [t.get_window_extent(renderer) for t in texts if t.get_visible() and t.get_text()]


def _apart(boxes) -> bool:
    return not any(a.overlaps(b) for a, b in combinations(boxes, 2))


def _inside(fig, boxes) -> bool:
    whole = fig.bbox
    return all(b.x0 >= whole.x0 - 1 and b.x1 <= whole.x1 + 1 and b.y0 >= whole.y0 - 1 and b.y1 <= whole.y1 + 1
               for b in boxes)  # fmt: skip


@pytest.fixture(scope="module")
def long_names(tmp_path_factory) -> rankscope.Analysis:
    """Three module types, two of 60-odd characters that differ only at their end, in three blocks."""
    factors = {f"encoder.{i}.{name}": random_factors(24, 24, 4, seed=3 * i + j)
               for i in range(3) for j, name in enumerate(LONG)}  # fmt: skip
    config = lora_config(r=4, target_modules=list(LONG))
    return rankscope.analyze(rankscope.load(write_lora(tmp_path_factory.mktemp("long") / "a", factors, config)))


@pytest.mark.parametrize("kind", ["count-above", "spectrum-modules", "spectrum", "energy"])
def test_long_module_types_keep_titles_and_legend_apart_and_inside(kind, long_names):
    draw = {
        "count-above": figures.count_above_figure,
        "spectrum-modules": figures.module_spectra_figure,
        "spectrum": figures.spectrum_figure,
        "energy": figures.energy_figure,
    }[kind]
    fig = draw([long_names, long_names], ["one", "two"]) if kind == "count-above" else draw([long_names], ["one"])
    _laid_out(fig)
    titles = [ax.title for ax in fig.axes if ax.get_title()]
    entries = [t for legend in fig.legends for t in legend.get_texts()]
    assert len(titles) == (0 if kind in ("spectrum", "energy") else 3)
    assert len(entries) >= 2
    assert _apart(_boxes(fig, titles)), [t.get_text() for t in titles]
    assert _inside(fig, _boxes(fig, titles + entries)), [t.get_text() for t in titles + entries]
    shown = [t.get_text() for t in titles + entries]
    assert "short" in shown and all(name not in shown for name in LONG[:2])  # ellipsized, the ends kept apart
    assert len({text for text in shown if "…" in text}) == len([text for text in shown if "…" in text])


def test_count_above_rank_bound_ticks_do_not_overlap(tmp_path):
    """Rank bounds 4 and 64 on one axis: tick labels at 4 and 64 (0 would sit on the 4) that do not overlap."""
    name = "model.layers.0.self_attn.q_proj"
    small = write_lora(tmp_path / "r4", {name: random_factors(80, 80, 4, 1)}, lora_config(r=4))
    large = write_lora(tmp_path / "r64", {name: random_factors(80, 80, 64, 2)}, lora_config(r=64))
    analyses = [rankscope.analyze(rankscope.load(path)) for path in (small, large)]
    fig = figures.count_above_figure(analyses, ["r4", "r64"])
    _laid_out(fig)
    (ax,) = fig.axes
    labels = [t for t in ax.get_yticklabels() if t.get_text()]
    assert {4.0, 64.0} <= set(ax.get_yticks())
    assert _apart(_boxes(fig, labels)), [t.get_text() for t in labels]


def test_resize_present_size_label_clear_of_the_rule_markers():
    analysis = rankscope.analyze(rankscope.load(EXAMPLES / "adapters" / "lora-r8"))
    fig = figures.resize_figure(analysis)
    _laid_out(fig)
    (ax,) = fig.axes
    (now,) = [t for t in ax.texts if t.get_text().startswith("now: ")]
    (box,) = _boxes(fig, [now])
    markers = [line for line in ax.get_lines() if line.get_linestyle() == "None"]
    assert len(markers) == 5
    for line in markers:
        x, y = ax.transData.transform((line.get_xdata()[0], line.get_ydata()[0]))
        assert not box.expanded(1.0, 1.0).padded(4).contains(x, y), line.get_label()


def test_base_heatmap_colour_bar_labels_fit_and_read_plainly():
    base = EXAMPLES / "tiny-base"
    analyses = [rankscope.analyze(rankscope.load(EXAMPLES / "adapters" / n, base=base)) for n in ("lora-r8", "dora-r8")]
    fig = figures.base_heatmap_figure(analyses, ["lora-r8", "dora-r8"])
    _laid_out(fig)
    bars = [ax for ax in fig.axes if ax.get_ylabel()]
    labels = [ax.yaxis.label for ax in bars]
    assert [t.get_text().replace("\n", " ") for t in labels] == [
        "‖ΔW‖ / ‖W₀‖ (Frobenius)",
        "intruder dimensions (of the top 10)",
    ]
    assert _inside(fig, _boxes(fig, labels))
    for bar, box in zip(bars, _boxes(fig, labels), strict=True):  # no longer than its bar
        assert box.height <= bar.get_window_extent(fig.canvas.get_renderer()).height + 1
