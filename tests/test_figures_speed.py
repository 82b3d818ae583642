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
from rankscope.figures._common import decade_label
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


@pytest.mark.parametrize(
    ("value", "label"),
    [(1e-3, "10⁻³"), (1.0, "1"), (10.0, "10"), (100.0, "10²"), (1e-12, "10⁻¹²"), (0.02, "0.02"), (0.0, "")],
)
def test_decade_labels_are_plain_text(value, label):
    assert decade_label(value) == label
