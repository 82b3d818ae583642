"""Spectrum and cumulative energy figures: several checkpoints overlaid, layer by layer.

How many layers decides how a figure reads (never a legend with hundreds of entries):

- at most 8 curves in all (a few named layers): one curve per layer and checkpoint;
- one checkpoint: one curve per module type, the median over its layers (quartiles shaded when few types);
- several checkpoints: one panel per module type (up to 8 types), each overlaying the checkpoints' medians;
  more module types than that: one panel, each checkpoint's median over all layers.

The curves are the records' own numbers: σ_i as analysed, the cumulative energy Σ_{j≤k} σ_j² / Σ σ²; the median
and quartiles across layers are display summaries (``_curves``: over every layer, each taken past its numerical
rank as σᵢ = 0 and an energy share of 1).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from ._axes import guide_hline, guide_vline
from ._common import MAX_BOUND_LINES, cumulative_energy, saturation_extent, significant
from ._curves import CurveKind, Panel, curve_figure, drawn_lines

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from ..analysis.records import Analysis, LayerRecord


# -- spectrum ---------------------------------------------------------------------------------------------
def _spectrum_limits(panels: list[Panel], thresholds: Sequence[float]) -> tuple[float, float]:
    """One y range for every panel (they share the axis): from below the least to above the greatest value drawn
    in any of them (medians, and quartiles where shaded), and the thresholds τ in view."""
    values = [v for p in panels for c in p.curves for line in drawn_lines(p, c) for v in line if v > 0]
    if not values:
        return 1e-3, 1.0
    top = max(values) * 3  # room above the curves for the rank-bound labels
    # a median of layers 12 decades apart (σ₁·1e-12) would squash the scale: it falls off the bottom instead
    bottom = max(min(values) / 1.8, top * 1e-9)
    for tau in thresholds:
        if tau > 0:
            bottom, top = min(bottom, tau / 3), max(top, tau * 3)
    return bottom, top


def _drawn_bounds(panel: Panel) -> list[int]:
    """The rank bounds marked in a panel: up to ``MAX_BOUND_LINES`` distinct ones (more would be a thicket of
    lines and would stretch the axis far past the data)."""
    bounds = sorted({r.rank_bound for r in panel.records})
    return bounds if len(bounds) <= MAX_BOUND_LINES else []


SPECTRUM = CurveKind(
    "spectrum_figure",
    significant,
    start=1,
    log=True,
    xlabel="index i",
    ylabel="singular value σᵢ",
    fill=0.0,  # σᵢ beyond a layer's numerical rank (a zero layer's every σᵢ) is 0
    zero_counts=True,
    extent=lambda panel: max(_drawn_bounds(panel), default=0),  # the rank bounds drawn are in view
)


def spectrum_figure(
    analyses: Sequence[Analysis],
    labels: Sequence[str] | None = None,
    *,
    layers: Sequence[str] | None = None,
    thresholds: Sequence[float] | None = None,
    width: str | float = "column",
    ax: Axes | Sequence[Axes] | None = None,
) -> Figure:
    """Singular values σ_i of each layer's ΔW against i, log scale, checkpoints overlaid.

    The absolute thresholds τ (``thresholds``; default: the analyses', 0.005 unless set) are dashed lines, the
    layers' rank bounds dotted verticals; numerically zero values (beyond each layer's numerical rank) are not
    drawn. A median over layers counts every layer at every i, a layer's σᵢ beyond its numerical rank as 0 (a zero
    layer's all): it ends where fewer than half the layers have a σᵢ above 0, and the legend says how many layers
    are zero. Every panel has the same y range. ``layers``: names of the layers to draw (default: every valid
    layer, summarised as the module docstring says). ``ax``: draw into this Axes (one panel: the checkpoints'
    medians over all layers) or into one Axes per module-type panel, and return its figure; by default a new
    figure of ``width``.
    """
    return _spectrum(analyses, labels, layers, thresholds, width, ax, per_module=False)


def module_spectra_figure(
    analyses: Sequence[Analysis],
    labels: Sequence[str] | None = None,
    *,
    layers: Sequence[str] | None = None,
    thresholds: Sequence[float] | None = None,
    width: str | float = "full",
) -> Figure:
    """:func:`spectrum_figure` with one panel per module type whatever the number of checkpoints: in each panel,
    each checkpoint's median σ_i over its layers of that type (quartiles shaded when at most three curves share
    the panel), one legend. The report's per-module spectra, in one figure."""
    return _spectrum(analyses, labels, layers, thresholds, width, None, per_module=True)


def _spectrum(analyses, labels, layers, thresholds, width, ax, *, per_module: bool) -> Figure:
    if thresholds is None:
        thresholds = [t for a in analyses for t in a.options.thresholds]
    thresholds = sorted({float(t) for t in thresholds if t > 0})

    def guides(ax: Axes, panel: Panel, inline: bool) -> dict:
        marks = {}
        for tau in thresholds:  # labelled at the left: spectra fall from there, so the corner is empty
            marks[f"τ = {tau:g}"] = guide_hline(ax, tau, f"τ = {tau:g}" if inline else "", side="left")
        for bound in _drawn_bounds(panel):
            marks["rank bound"] = guide_vline(ax, bound, f"r = {bound}" if inline else "")
        return marks

    def limits(panels: list[Panel]) -> tuple[float, float]:
        return _spectrum_limits(panels, thresholds)

    return curve_figure(SPECTRUM, limits, guides, analyses, labels, layers, width, ax, per_module)


# -- cumulative energy ------------------------------------------------------------------------------------
def _cumulative_energy(record: LayerRecord) -> list[float]:
    """0, then Σ_{j≤k} σ_j² / Σσ² for k = 1..K, K the numerical rank; empty for a zero update (its fractions are
    undefined: left out of the medians, and said in the legend)."""
    curve = cumulative_energy(significant(record))
    return [0.0, *curve] if curve else []


def _saturation(panel: Panel) -> int:
    """The last k worth showing: past where every drawn line (median, and the quartiles where shaded) has
    levelled off (``saturation_extent``)."""
    return saturation_extent([line for curve in panel.curves for line in drawn_lines(panel, curve)], start=0)


ENERGY = CurveKind(
    "energy_figure",
    _cumulative_energy,
    start=0,
    log=False,
    xlabel="number of singular values k",
    ylabel="cumulative energy",
    fill="last",  # a curve that has reached 1 at its numerical rank stays there
    zero_counts=False,  # a zero layer's shares are 0/0
    fit=_saturation,
)


def energy_figure(
    analyses: Sequence[Analysis],
    labels: Sequence[str] | None = None,
    *,
    layers: Sequence[str] | None = None,
    levels: Sequence[float] | None = None,
    width: str | float = "column",
    ax: Axes | Sequence[Axes] | None = None,
) -> Figure:
    """Cumulative energy Σ_{j≤k} σ_j² / Σσ² against k; the energy levels p dashed (``levels``; default: the
    analyses', 0.9 and 0.99 unless set; of more than two only the lowest and highest). The k axis ends a little
    past the last k at which a drawn curve is still below 0.999, not at the rank bound. A median over layers
    counts a layer past its numerical rank as 1 (all its energy counted); a zero layer, whose shares are
    undefined, is left out of it, as the legend says. ``layers`` and ``ax`` as for :func:`spectrum_figure`."""
    if levels is None:
        levels = [p for a in analyses for p in a.options.energies]
    elif any(not 0 < p <= 1 for p in levels):
        raise ValueError(f"levels: energy fractions must be in (0, 1], got {list(levels)}")
    levels = sorted({float(p) for p in levels})
    if len(levels) > 2:  # labels of close levels would collide: the lowest and highest say enough
        levels = [levels[0], levels[-1]]

    def guides(ax: Axes, panel: Panel, inline: bool) -> dict:
        marks = {}
        for p in levels:  # labelled outside the right edge, like tick labels: curves crowd both ends inside
            marks["energy " + ", ".join(f"{100 * q:g}%" for q in levels)] = guide_hline(
                ax, p, f"{100 * p:g}%" if inline else "", side="outside"
            )
        return marks

    return curve_figure(ENERGY, lambda panels: (0.0, 1.04), guides, analyses, labels, layers, width, ax)
