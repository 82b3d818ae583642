"""Paper-ready figures of analysis records: spectra, effective-rank heatmaps, counts above τ, cumulative energy,
alignment and weights of compositions, growth of sequential compositions, the LoRA paper's φ(i, j) grid, energy
kept against total rank under rank rules (``resize_figure``) and measures against a base weight
(``base_heatmap_figure``, ``base_spectrum_figure``).

Every function returns a matplotlib ``Figure`` built without pyplot (no GUI, no global state, never shown; PNGs
are drawn by Agg); :func:`save_figure` writes PDF/PNG/SVG with deterministic bytes and :func:`svg_text` gives
inline SVG for HTML. Figures read records and draw them — they compute nothing new. Importing this package does
not import matplotlib; the drawing functions do.

>>> import rankscope
>>> from rankscope.figures import spectrum_figure, save_figure
>>> analysis = rankscope.analyze(rankscope.load("examples/checkpoints/tiny-lora"))   # doctest: +SKIP
>>> save_figure(spectrum_figure([analysis], ["lora"]), "spectrum", ("pdf", "png"))    # doctest: +SKIP
[PosixPath('spectrum.pdf'), PosixPath('spectrum.png')]
"""

from __future__ import annotations

from ._common import FigureInputError
from .alignment import alignment_figure, subspace_similarity_figure
from .base import base_heatmap_figure, base_spectrum_figure
from .composition import growth_figure, weights_figure
from .counts import count_above_figure
from .heatmaps import erank_heatmap_figure, heatmap_limits
from .output import FORMATS, figure_bytes, save_figure, svg_text
from .resize import resize_figure
from .spectra import energy_figure, module_spectra_figure, spectrum_figure
from .style import figure_size, paper_style

KINDS = (
    "spectrum",
    "erank-heatmap",
    "count-above",
    "energy",
    "alignment",
    "weights",
    "growth",
    "subspace-similarity",
    "resize",
    "base-heatmap",
)

__all__ = [
    "FORMATS",
    "KINDS",
    "FigureInputError",
    "alignment_figure",
    "base_heatmap_figure",
    "base_spectrum_figure",
    "count_above_figure",
    "energy_figure",
    "erank_heatmap_figure",
    "figure_bytes",
    "figure_size",
    "growth_figure",
    "heatmap_limits",
    "module_spectra_figure",
    "paper_style",
    "resize_figure",
    "save_figure",
    "spectrum_figure",
    "subspace_similarity_figure",
    "svg_text",
    "weights_figure",
]
