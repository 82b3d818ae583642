"""The paper style every figure is drawn in: sizes, fonts, palette, and how a series looks in black and white.

Paper-ready by default: a column (3.25 in) or full width (6.75 in) figure, 7–9 pt DejaVu Sans text (ships with
matplotlib; no LaTeX), TrueType fonts embedded in PDFs (``pdf.fonttype`` 42: the PDF holds ``/FontFile2``, never
Type 3 bitmaps), thin lines, and the Okabe–Ito palette (safe for the common colour-vision deficiencies), each
series also set apart by line style and marker so that it survives black-and-white print.

This module imports matplotlib only inside :func:`paper_style`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

COLUMN_WIDTH = 3.25  # inches: one column of a two-column paper (ACL, NeurIPS-style two-column, IEEE)
FULL_WIDTH = 6.75  # inches: the full text width of the same
WIDTHS = {"column": COLUMN_WIDTH, "full": FULL_WIDTH}
MIN_WIDTH, MAX_WIDTH = 1.5, 20.0

# Okabe & Ito (2008), ordered so the first series are the most distinct; their yellow (#F0E442) is left out: a
# thin yellow line on white is barely visible. Seven colours, six dash patterns and eight markers: the periods are
# coprime, so series i and j < 42 differ in colour and in at least one of dash and marker (a dozen stay distinct).
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000")
LINESTYLES = ("-", (0, (4, 1.5)), (0, (1, 1.2)), (0, (5, 1.5, 1, 1.5)), (0, (2, 1)), (0, (6, 1.5, 1, 1.5, 1, 1.5)))
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
HATCHES = ("", "////", "....", "xxxx", "\\\\\\\\", "oo", "++", "--")
GUIDE_COLOR = "#555555"  # thresholds, rank bounds, reference lines
MISSING_COLOR = "#e6e6e6"  # heatmap cells with no layer
SEQUENTIAL_CMAP = "viridis"  # perceptually uniform, colour-blind safe, monotone in grey
DIVERGING_CMAP = "PuOr_r"  # ColorBrewer PuOr: colour-blind safe; values are also written in the cells

TEXT_SIZE = 8.0
SMALL_SIZE = 7.0
FONT = "DejaVu Sans"
SVG_SALT = "rankscope"  # fixed ids in SVG output: same figure, same bytes

PAPER_RC = {
    "font.family": "sans-serif",
    "font.sans-serif": [FONT],
    "mathtext.fontset": "dejavusans",
    "text.usetex": False,
    "font.size": TEXT_SIZE,
    "axes.titlesize": TEXT_SIZE,
    "axes.labelsize": TEXT_SIZE,
    "figure.titlesize": 9.0,
    "figure.labelsize": TEXT_SIZE,
    "xtick.labelsize": SMALL_SIZE,
    "ytick.labelsize": SMALL_SIZE,
    "legend.fontsize": SMALL_SIZE,
    "legend.title_fontsize": SMALL_SIZE,
    "axes.linewidth": 0.6,
    "axes.edgecolor": "#222222",
    "axes.labelpad": 2.0,
    "axes.titlepad": 3.0,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": False,
    "grid.color": "#dddddd",
    "grid.linewidth": 0.4,
    "lines.linewidth": 1.0,
    "lines.markersize": 3.0,
    "lines.markeredgewidth": 0.6,
    "patch.linewidth": 0.5,
    "hatch.linewidth": 0.4,
    "xtick.major.width": 0.6,
    "ytick.major.width": 0.6,
    "xtick.minor.width": 0.4,
    "ytick.minor.width": 0.4,
    "xtick.major.size": 2.5,
    "ytick.major.size": 2.5,
    "xtick.minor.size": 1.5,
    "ytick.minor.size": 1.5,
    "xtick.major.pad": 2.0,
    "ytick.major.pad": 2.0,
    "legend.frameon": False,
    "legend.handlelength": 2.4,
    "legend.handletextpad": 0.5,
    "legend.columnspacing": 1.2,
    "legend.borderaxespad": 0.3,
    "legend.labelspacing": 0.3,
    "image.cmap": SEQUENTIAL_CMAP,
    "figure.dpi": 100,
    "savefig.dpi": 300,
    "figure.constrained_layout.h_pad": 0.02,
    "figure.constrained_layout.w_pad": 0.02,
    "pdf.fonttype": 42,
    "ps.fonttype": 42,
    "svg.fonttype": "path",
    "svg.hashsalt": SVG_SALT,
    "axes.unicode_minus": True,
    "path.simplify": True,
}


@contextlib.contextmanager
def paper_style() -> Iterator[None]:
    """Draw and save figures inside this context: the rcParams above, restored on exit."""
    import matplotlib

    with matplotlib.rc_context(PAPER_RC):
        yield


def figure_width(width: str | float) -> float:
    """Inches for ``"column"`` (3.25), ``"full"`` (6.75), or a number of inches (a string such as ``"4.5"`` too)."""
    if isinstance(width, str):
        if width in WIDTHS:
            return WIDTHS[width]
        try:
            value = float(width)
        except ValueError:
            raise ValueError(f"width must be column, full or a number of inches, got {width!r}") from None
    else:
        value = float(width)
    if not MIN_WIDTH <= value <= MAX_WIDTH:
        raise ValueError(f"width {value:g} in is outside {MIN_WIDTH:g}–{MAX_WIDTH:g} in")
    return value


def figure_size(width: str | float, aspect: float) -> tuple[float, float]:
    """(width, height) in inches, height = width × ``aspect``."""
    inches = figure_width(width)
    return inches, inches * aspect


def series_colour(index: int) -> str:
    """The ``index``-th series' colour (components of a composition and checkpoints alike)."""
    return PALETTE[index % len(PALETTE)]


def series_marker(index: int) -> str:
    """The ``index``-th series' marker (a matplotlib marker name; the HTML draws the same shapes)."""
    return MARKERS[index % len(MARKERS)]


def series_style(index: int, *, marker: bool = True) -> dict:
    """Colour, line style and marker of the ``index``-th series: distinct in colour and in black and white.
    The one definition of a series' look: the figures and the HTML page's plots both read it."""
    style = {"color": series_colour(index), "linestyle": LINESTYLES[index % len(LINESTYLES)]}
    if marker:
        style["marker"] = series_marker(index)
    return style


def marked_points(count: int, most: int = 16) -> list[int]:
    """Which of a ``count``-point series' points carry its marker: all up to ``most``, else about ``most`` // 2
    evenly spaced ones (always the first) — a marker on every point of a long series would be a smear, none at all
    would lose the series' black-and-white identity."""
    if count <= most:
        return list(range(count))
    step = -(-count // (most // 2))
    return list(range(0, count, step))


def dash_pattern(index: int) -> tuple[float, ...]:
    """The ``index``-th series' dash pattern as on/off lengths in line widths (empty: solid) — matplotlib scales
    ``LINESTYLES`` by the line width, and so must any other drawing of the same series (the HTML's SVG)."""
    style = LINESTYLES[index % len(LINESTYLES)]
    return () if isinstance(style, str) else tuple(style[1])


__all__ = [
    "COLUMN_WIDTH",
    "FULL_WIDTH",
    "PALETTE",
    "PAPER_RC",
    "dash_pattern",
    "figure_size",
    "figure_width",
    "marked_points",
    "paper_style",
    "series_colour",
    "series_marker",
    "series_style",
]
