"""SVG on the page: matplotlib figures made inline-safe (:func:`inline_svg`), and each layer's small two-panel plot
(:func:`layer_svg`: σ_i on a log axis and the cumulative energy Σ_{i≤k} σ_i²/Σσ²).

The small plots are drawn here rather than by matplotlib because a 224-layer page needs 224 of them: a few kB
each, against tens of kB and a second or more for a matplotlib SVG. They draw each series in the same style as
the paper figures — colour, dash pattern (scaled by the line width, as matplotlib does) and marker, all from
``rankscope.figures.style`` — so a legend means the same on the page and in the PDFs.
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Sequence

from ...figures._common import MAX_BOUND_LINES, MAX_MARKED_POINTS, saturation_extent
from ...figures.style import dash_pattern, marked_points, series_colour, series_marker
from ..model import SeriesView

_MAX_POINTS = 256  # a dense spectrum (thousands of σ) is drawn from at most this many points
_STROKE = 1.6  # px: a series' line width
_W, _H, _L, _R, _T, _B = 330, 190, 48, 12, 14, 34  # one panel: size and margins (px)
_AXIS = 'fill="none" stroke="#9aa4b1"'
_GUIDE = 'stroke="#7b8794" stroke-dasharray="4 3"'
# matplotlib's marker shapes (figures.style.MARKERS) as paths in a 10×10 box centred on the point
_SHAPES = {
    "o": "M4 0A4 4 0 1 1-4 0A4 4 0 1 1 4 0Z",
    "s": "M-3.5-3.5H3.5V3.5H-3.5Z",
    "^": "M0-4.5L4 3H-4Z",
    "D": "M0-4.5L4 0L0 4.5L-4 0Z",
    "v": "M0 4.5L4-3H-4Z",
    "P": "M-1.5-4.5H1.5V-1.5H4.5V1.5H1.5V4.5H-1.5V1.5H-4.5V-1.5H-1.5Z",
    "X": "M-4.5-2.5L-2.5-4.5L0-2L2.5-4.5L4.5-2.5L2-0L4.5 2.5L2.5 4.5L0 2L-2.5 4.5L-4.5 2.5L-2 0Z",
    "*": "M0-5L1.2-1.6L4.8-1.5L1.9 0.6L2.9 4L0 2L-2.9 4L-1.9 0.6L-4.8-1.5L-1.2-1.6Z",
}


def colour(index: int) -> str:
    return series_colour(index)


def dasharray(index: int, width: float = _STROKE) -> str:
    """The series' dash pattern in px for a line ``width`` px wide (empty: solid)."""
    return " ".join(f"{length * width:g}" for length in dash_pattern(index))


def marker_def(index: int) -> str:
    """The series' marker as an SVG ``<marker>`` (``#mk-<index>``), placed on every vertex of a polyline."""
    shape = _SHAPES.get(series_marker(index), _SHAPES["o"])
    return (
        f'<marker id="mk-{index}" viewBox="-5 -5 10 10" markerWidth="7" markerHeight="7" '
        f'markerUnits="userSpaceOnUse" overflow="visible"><path d="{shape}" fill="{colour(index)}"/></marker>'
    )


def key_svg(index: int) -> str:
    """A legend key: a short line in the series' colour and dashes with its marker in the middle."""
    dash = dasharray(index)
    dashes = f' stroke-dasharray="{dash}"' if dash else ""
    return (
        f'<svg class="keyline" width="30" height="10" viewBox="0 0 30 10" aria-hidden="true"><path '
        f'd="M1 5H15H29" fill="none" stroke="{colour(index)}" stroke-width="{_STROKE}"{dashes} '
        f'marker-mid="url(#mk-{index})"/></svg>'
    )


# -- matplotlib's SVG, inline ---------------------------------------------------------------------------------
_SVG_ID = re.compile(r'\bid="([^"]+)"')
_CLUTTER = re.compile(r"<\?xml.*?\?>|<!DOCTYPE.*?>|<!--.*?-->", re.S)
# an id's definition or a reference to it (matplotlib refers by url(#…) and href="#…"; colours are #… too): the
# name runs to the closing quote or parenthesis
_ID_OR_REFERENCE = re.compile(r'(\bid="|url\(#|href="#)([^"()#\s]+)(?=["\)])')


def _scope_css(css: str, scope: str) -> str:
    """Rules of a figure's own ``<style>`` limited to that figure (matplotlib writes ``*{stroke-linecap: butt}``,
    which inline would restyle the whole page)."""

    def scoped(rule: re.Match) -> str:
        selectors = ", ".join(f".{scope} {selector.strip()}" for selector in rule.group(1).split(","))
        return f"{selectors}{{{rule.group(2)}}}"

    return re.sub(r"([^{}]+)\{([^{}]*)\}", scoped, css)


def inline_svg(svg: str, prefix: str, caption: str) -> str:
    """An SVG document as an element of the page: prolog, doctype and comments dropped, its ids prefixed and its
    style rules scoped to it (two figures from one renderer share clip-path and glyph ids), labelled for screen
    readers."""
    text = _CLUTTER.sub("", svg).strip()
    ids = set(_SVG_ID.findall(text))
    if ids:  # one fixed pattern, the name checked against the ids (an alternation of hundreds of ids is slow)
        text = _ID_OR_REFERENCE.sub(lambda m: f"{m[1]}{prefix}{m[2]}" if m[2] in ids else m[0], text)
    scope = prefix.rstrip("-")
    text = re.sub(
        r"(<style[^>]*>)(.*?)(</style>)",
        lambda m: m.group(1) + _scope_css(m.group(2), scope) + m.group(3),
        text,
        flags=re.S,
    )
    opening = re.search(r"<svg\b[^>]*>", text)
    if opening is None:
        return ""
    tag = opening.group(0)
    if re.search(r'\sclass="', tag):
        tag = re.sub(r'(\sclass=")', rf"\g<1>{scope} ", tag, count=1)
    else:
        tag = tag.replace("<svg", f'<svg class="{scope}"', 1)
    tag = tag.replace("<svg", f'<svg role="img" aria-label="{html.escape(caption, quote=True)}"', 1)
    return text[: opening.start()] + tag + text[opening.end() :]


# -- per-layer spectrum and cumulative energy -----------------------------------------------------------------
def _sample(n: int) -> list[int]:
    """Indices drawn for an n-value spectrum: all of them up to _MAX_POINTS, else the first 64 and log-spaced
    ones after (a dense tail is smooth)."""
    if n <= _MAX_POINTS:
        return list(range(n))
    picked = set(range(64))
    steps = _MAX_POINTS - 64
    for k in range(steps + 1):
        picked.add(min(n - 1, round(64 * (n / 64) ** (k / steps)) - 1))
    return sorted(picked)


def _nice_ticks(n: int, most: int = 6) -> list[int]:
    step = 1
    for candidate in (1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000, 2000, 5000, 10000):
        step = candidate
        if n / candidate <= most:
            break
    ticks = [1, *range(step, n + 1, step)] if step > 1 else list(range(1, n + 1))
    return sorted(set(ticks))


def _superscript(exponent: int) -> str:
    return "10" + str(exponent).translate(str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹"))


def _c(value: float) -> str:
    """A coordinate, to 0.1 px."""
    return f"{value:.1f}".removesuffix(".0")


def _x(x0: float, index: int, n: int) -> float:
    """Index i (1-based) of n on a panel's x axis, half a step in from either edge."""
    return x0 + _L + (_W - _L - _R) * (index - 0.5) / n


def _x_ticks(x0: float, n: int) -> list[str]:
    """Ticks 1..n along the bottom of a panel whose left edge is at x0."""
    bottom, parts = _H - _B, []
    for tick in _nice_ticks(n):
        x = _c(_x(x0, tick, n))
        parts.append(
            f'<path d="M{x} {bottom}v4" {_AXIS}/><text x="{x}" y="{bottom + 15}" text-anchor="middle">{tick}</text>'
        )
    return parts


def _panel_frame(x0: float, n: int | None, xlabel: str, ylabel: str) -> list[str]:
    """Axes box, x ticks 1..n (None: the plot draws its own) and the axis labels of a panel whose left edge is
    at x0."""
    middle = (_T + _H - _B) / 2
    parts = [f'<rect x="{x0 + _L}" y="{_T}" width="{_W - _L - _R}" height="{_H - _T - _B}" {_AXIS}/>']
    if n is not None:
        parts += _x_ticks(x0, n)
    parts.append(f'<text x="{_c(x0 + (_W + _L - _R) / 2)}" y="{_H - 4}" text-anchor="middle">{xlabel}</text>')
    parts.append(
        f'<text x="{x0 + 12}" y="{_c(middle)}" text-anchor="middle" '
        f'transform="rotate(-90 {x0 + 12} {_c(middle)})">{ylabel}</text>'
    )
    return parts


def _energy_y(fraction: float) -> float:
    return _T + (_H - _T - _B) * (1 - fraction)


def frame_def(n: int, energies: Sequence[float]) -> str:
    """What every n-value layer plot shares — both panels' boxes, the spectrum's x ticks, labels, the energy
    panel's y ticks and energy-fraction lines — defined once per page as ``#frame-<n>`` (most layers share one
    n). The energy panel's k axis fits each plot's curves, so each plot draws its ticks."""
    parts = _panel_frame(0, n, "index i", "σᵢ") + _panel_frame(_W, None, "components k", "energy")
    for fraction in (0.0, 0.5, 1.0):
        parts.append(
            f'<text x="{_W + _L - 6}" y="{_c(_energy_y(fraction) + 3.5)}" text-anchor="end">{fraction:.0%}</text>'
        )
    for p in energies:
        parts.append(f'<path d="M{_W + _L} {_c(_energy_y(p))}H{2 * _W - _R}" {_GUIDE}/>')
    if energies:  # the fractions sit close together: one label, where a rising curve leaves room
        fractions = ", ".join(f"{p:.0%}" for p in energies)
        parts.append(
            f'<text x="{2 * _W - _R - 4}" y="{_H - _B - 6}" text-anchor="end" fill="#5b6675">dashed: {fractions}</text>'
        )
    return f'<g id="frame-{n}">{"".join(parts)}</g>'


def _line(points: list[tuple[float, float]], style: int) -> str:
    """A series as a polyline in its style, its marker where the figures put it (``style.marked_points``): on
    every point when there are few, on evenly spaced ones when many (of the points drawn, for a sampled spectrum)."""
    dash = dasharray(style)
    extra = f' stroke-dasharray="{dash}"' if dash else ""
    ends = "".join(f' marker-{at}="url(#mk-{style})"' for at in ("start", "mid", "end"))
    few = len(points) <= MAX_MARKED_POINTS
    line = (
        f'<polyline points="{" ".join(f"{_c(x)},{_c(y)}" for x, y in points)}" fill="none" '
        f'stroke="{colour(style)}" stroke-width="{_STROKE}"{extra}{ends if few else ""}/>'
    )
    if few:
        return line
    # a path of bare moves: its markers stand on the vertices, and no line joins them
    moves = "".join(f"M{_c(points[i][0])} {_c(points[i][1])}" for i in marked_points(len(points), MAX_MARKED_POINTS))
    return line + f'<path d="{moves}" fill="none" stroke="none"{ends}/>'


def _spectrum_panel(series: Sequence[SeriesView], thresholds: Sequence[float], n: int) -> list[str]:
    """log σ_i against i: decades, each τ as a dashed line, each rank bound as a vertical line, the series."""
    positive = [v for s in series for v in s.sigma if v > 0]
    if not positive:
        return [f'<text x="{_W / 2}" y="{_H / 2}" text-anchor="middle">zero update: every σ is 0</text>']
    top = max(positive) * 1.6
    bottom = max(min(positive + [t for t in thresholds if t > 0]) / 1.6, top * 1e-10)
    lo, hi = math.log10(bottom), math.log10(top)

    def y(value: float) -> float:
        v = math.log10(max(value, bottom))
        return _T + (_H - _T - _B) * (hi - v) / (hi - lo)

    parts = []
    decades = list(range(math.ceil(lo), math.floor(hi) + 1))
    stride = max(1, math.ceil(len(decades) / 6))
    for exponent in decades[::stride]:
        yy = _c(y(10.0**exponent))
        label = f'<text x="{_L - 6}" y="{_c(float(yy) + 3.5)}" text-anchor="end">{_superscript(exponent)}</text>'
        parts.append(f'<path d="M{_L - 4} {yy}H{_W - _R}" stroke="#e6e9ed"/>{label}')
    points = [(_x(0, i + 1, n), y(s.sigma[i])) for s in series for i in _sample(len(s.sigma))]
    for tau in thresholds:
        if bottom < tau < top:
            yy = y(tau)

            def crowded(left: float, yy: float = yy) -> bool:  # a curve through the label's box (60 × 12 px)
                return any(left <= px <= left + 60 and yy - 13 <= py <= yy + 1 for px, py in points)

            # at the left, where spectra start, unless curves cross there; then the right end
            label = (
                f'x="{_L + 4}"'
                if not crowded(_L + 4) or crowded(_W - _R - 64)
                else f'x="{_W - _R - 4}" text-anchor="end"'
            )
            parts.append(
                f'<path d="M{_L} {_c(yy)}H{_W - _R}" {_GUIDE}/>'
                f'<text {label} y="{_c(yy - 3)}" class="an">τ = {tau:g}</text>'
            )
    bounds = sorted({s.rank_bound for s in series if 0 < s.rank_bound <= n})
    labelled = -math.inf
    for bound in bounds if len(bounds) <= MAX_BOUND_LINES else []:  # the figures' rule: a few, or none
        xx = _x(0, bound, n)
        parts.append(f'<path d="M{_c(xx)} {_T}V{_H - _B}" stroke="#b54708" stroke-dasharray="5 3"/>')
        if xx - labelled >= 30:  # a label ~26 px wide, right-aligned at its line: close bounds share one
            parts.append(f'<text x="{_c(xx - 3)}" y="{_T + 11}" text-anchor="end" class="an">r≤{bound}</text>')
            labelled = xx
    for s in series:
        parts.append(_line([(_x(0, i + 1, n), y(s.sigma[i])) for i in _sample(len(s.sigma))], s.style))
    return parts


def _energy_panel(series: Sequence[SeriesView], n: int) -> list[str]:
    """Cumulative energy Σ_{i≤k} σ_i²/Σσ² against k = 1…m, m a little past where every curve has levelled off
    (the figures' ``saturation_extent``), and the k ticks; the frame holds the energy-fraction lines."""
    curves = [s.energy for s in series if s.energy]
    m = min(n, saturation_extent(curves, start=1)) if curves else n
    parts = _x_ticks(_W, m)
    for s in series:
        shown = s.energy[:m]
        if shown:
            parts.append(_line([(_x(_W, i + 1, m), _energy_y(shown[i])) for i in _sample(len(shown))], s.style))
    return parts


def layer_svg(
    series: Sequence[SeriesView], thresholds: Sequence[float], energies: Sequence[float], *, shared_frame: bool = False
) -> str:
    """Two panels: the spectrum (rank bounds and thresholds marked) and the cumulative energy. With
    ``shared_frame`` the axes and markers are the page's (``#frame-<n>``, ``#mk-<i>``: see :func:`frame_def`)."""
    n = max((len(s.sigma) for s in series), default=0)
    if n == 0:
        return ""
    if shared_frame:
        frame = f'<use href="#frame-{n}"/>'
    else:
        markers = "".join(marker_def(s.style) for s in series)
        frame = f"<defs>{markers}</defs>" + frame_def(n, energies).replace(f' id="frame-{n}"', "")
    body = [frame, *_spectrum_panel(series, thresholds, n), *_energy_panel(series, n)]
    return (
        f'<svg class="mini" viewBox="0 0 {2 * _W} {_H}" role="img" aria-label="spectrum and cumulative energy">'
        + "".join(body)
        + "</svg>"
    )
