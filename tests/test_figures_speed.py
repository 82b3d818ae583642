"""What the report's speed-ups must not change (issue 15): PDFs embed TrueType fonts from shared subsets that still
hold every glyph a figure writes, and stay byte-for-byte deterministic; log axes are labelled as matplotlib's own
formatter would label them, as plain text."""

from __future__ import annotations

import io
import re
import zlib

import pytest
from fontTools.ttLib import TTFont  # matplotlib's PDF backend needs fontTools: installed with it

from rankscope.figures import fonts
from rankscope.figures._axes import decade_label
from rankscope.figures.output import figure_bytes


def _figure(text: str):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(2, 1))
    ax = fig.subplots()
    ax.plot([1, 2], [1, 3])
    ax.set_title(text)
    return fig


def _embedded_fonts(pdf: bytes) -> list[TTFont]:
    """Every /FontFile2 stream of the PDF, parsed by fontTools."""
    found = []
    for match in re.finditer(rb"/Length1 \d+[^>]*>>\s*stream\r?\n", pdf):
        start = match.end()
        end = pdf.index(b"endstream", start)
        header = pdf[max(0, match.start() - 200) : match.end()]
        data = pdf[start:end]
        if b"/FlateDecode" in header:
            data = zlib.decompressobj().decompress(data)
        found.append(TTFont(io.BytesIO(data)))
    return found


def test_pdfs_embed_every_glyph_they_write_even_outside_the_common_set():
    import matplotlib.backends._backend_pdf_ps as hook

    original = hook.get_glyphs_subset
    title = "σ₁ > τ — Жук"  # Cyrillic is not among fonts.COMMON: the subset is widened for this figure
    assert not set("Жук") <= set(fonts.COMMON)
    pdf = figure_bytes(_figure(title), "pdf")
    assert hook.get_glyphs_subset is original  # matplotlib is unchanged outside the save
    (font,) = _embedded_fonts(pdf)
    cmap = font.getBestCmap()
    assert all(ord(c) in cmap for c in set(title) - {" "})
    assert all(ord(c) in cmap for c in "0123456789")  # the shared part of the subset


def test_pdf_bytes_do_not_depend_on_what_was_rendered_before():
    first = figure_bytes(_figure("erank 7.7"), "pdf")
    figure_bytes(_figure("Жук ΔW"), "pdf")  # another subset in the cache between the two
    fonts._CACHE.clear()
    again = figure_bytes(_figure("erank 7.7"), "pdf")
    assert first == again and first.count(b"/FontFile2") == 1


def test_a_subset_kept_on_disk_gives_the_same_pdf_and_a_damaged_one_is_computed_again(tmp_path, monkeypatch):
    import matplotlib.backends._backend_pdf_ps as hook

    monkeypatch.setattr(fonts, "store_folder", lambda: tmp_path / "subsets")
    fonts._CACHE.clear()
    computed = figure_bytes(_figure("erank 7.7 σ₁"), "pdf")  # subset by fontTools, then stored
    (stored,) = (tmp_path / "subsets").glob("*.bin")
    fonts._CACHE.clear()  # as in the next process

    def refuse(*args):
        raise AssertionError("subset again although it is stored")

    with monkeypatch.context() as patch:
        patch.setattr(hook, "get_glyphs_subset", refuse)
        assert figure_bytes(_figure("erank 7.7 σ₁"), "pdf") == computed  # read from the disk
    stored.write_bytes(stored.read_bytes()[:-10] + b"0123456789")  # damaged: fails its SHA-256
    fonts._CACHE.clear()
    assert figure_bytes(_figure("erank 7.7 σ₁"), "pdf") == computed  # computed again …
    fonts._CACHE.clear()
    with monkeypatch.context() as patch:
        patch.setattr(hook, "get_glyphs_subset", refuse)
        assert figure_bytes(_figure("erank 7.7 σ₁"), "pdf") == computed  # … and stored again
    (tmp_path / "a file").write_text("")  # a cache folder that cannot be made costs only the time
    monkeypatch.setattr(fonts, "store_folder", lambda: tmp_path / "a file" / "subsets")
    fonts._CACHE.clear()
    assert figure_bytes(_figure("erank 7.7 σ₁"), "pdf") == computed


@pytest.mark.parametrize(
    ("value", "label"),
    [(1e-3, "10⁻³"), (1.0, "1"), (10.0, "10"), (100.0, "10²"), (1e-12, "10⁻¹²"), (0.02, "0.02"), (0.0, "")],
)
def test_decade_labels_are_plain_text(value, label):
    assert decade_label(value) == label


@pytest.mark.parametrize(("low", "high", "minor"), [(1e-3, 10.0, False), (0.5, 5.0, True)])
def test_log_axes_keep_minor_ticks_only_where_they_are_labelled(low, high, minor):
    """Over two decades or more the unlabelled minor ticks are left out (drawing time); over fewer they stay,
    labelled as matplotlib's own formatter would."""
    from matplotlib.figure import Figure

    from rankscope.figures._axes import plain_log_axis

    fig = Figure(figsize=(2, 2))
    ax = fig.subplots()
    ax.set_yscale("log")
    ax.set_ylim(low, high)
    plain_log_axis(ax.yaxis)
    figure_bytes(fig, "svg")
    locations = [v for v in ax.yaxis.get_minorticklocs() if low <= v <= high]
    assert bool(locations) is minor
    if minor:
        assert "2" in [t.get_text() for t in ax.yaxis.get_minorticklabels()]
    assert [t.get_text() for t in ax.yaxis.get_majorticklabels() if low <= t.get_position()[1] <= high]


def test_module_spectra_figure_is_a_panel_per_module_type_of_medians(tmp_path):
    """The report's per-module spectra in one figure (issue 15): a panel per module type in the model's order, each
    the checkpoint's median σ_i over that type's layers (numpy's median of the records' σ), quartiles shaded."""
    import numpy as np

    import rankscope
    from rankscope.figures import module_spectra_figure

    from .factories import llama_like

    analysis = rankscope.analyze(rankscope.load(llama_like(tmp_path / "a", layers=5, hidden=16, rank=4, seed=3)))
    fig = module_spectra_figure([analysis], ["a"])
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == ["q_proj", "v_proj"]
    for ax in panels:
        sigma = np.array([r.singular_values[:4] for r in analysis.layers if r.module_type == ax.get_title()])
        (line,) = [line for line in ax.get_lines() if line.get_label() == "a"]
        np.testing.assert_allclose(line.get_ydata(), np.median(sigma, axis=0), rtol=1e-12)
        assert ax.collections, "quartile band"
    assert len(fig.legends) == 1 and "median of 5 layers" in fig.legends[0].get_title().get_text()
    assert figure_bytes(fig, "svg") == figure_bytes(module_spectra_figure([analysis], ["a"]), "svg")
