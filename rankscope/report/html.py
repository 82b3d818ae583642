"""The HTML report: one self-contained page (inline CSS, a small inline script, figures as inline SVG).

Nothing on the page is fetched: a Content-Security-Policy forbids every network request and allows only the
page's own script (by its SHA-256), so even a string that slipped past escaping could not run. Every string
that comes from a checkpoint (layer names, labels, config values, errors, tensor keys) goes through
``html.escape``. The renderer computes nothing new: it lays out the records' values, and draws each layer's
spectrum and cumulative energy Σ_{i≤k} σ_i²/Σσ² as a small SVG (a few kB, so a 224-layer page stays small).
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .. import __version__
from ..core.naming import model_order_key
from ..measures.components import off_diagonal_mean
from ..measures.metrics import parameter_key

if TYPE_CHECKING:
    from ..analysis.analyze import Analysis, LayerRecord
    from ..analysis.comparison import Comparison

# Okabe–Ito (colour-blind safe), each with a dash pattern so series survive grey-scale printing
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442")
DASHES = ("", "6 3", "2 2", "8 3 2 3")
_MAX_POINTS = 256  # a dense spectrum (thousands of σ) is drawn from at most this many points
_MAX_SKIPPED = 200  # skipped tensors listed on the page; summary.json has them all
_TALL = 40  # tables with more rows scroll in a box of their own


def _e(value: object) -> str:
    """Checkpoint-provided text as HTML text or attribute value."""
    return html.escape(str(value), quote=True)


def _name(value: object) -> str:
    """A layer name that may break after its dots (long module paths in narrow columns)."""
    return _e(value).replace(".", ".<wbr>")


def _num(value: float | int | None, spec: str = ".3g") -> str:
    if value is None:
        return "—"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return format(value, spec)


def _slug(text: str) -> str:
    """A file-name-safe id fragment (checkpoint strings may hold anything)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-.")[:48] or "x"


# -- figures: which ones the page shows, and where ------------------------------------------------------------
@dataclass(frozen=True)
class FigureSlot:
    """One figure of the report: ``id`` is also its file name under ``figures/``; ``kind`` one of
    ``rankscope.figures.KINDS``; ``checkpoint`` an index into the analyses (None: all of them overlaid);
    ``layers`` the layer names it covers (None: all); ``layer`` the one composed layer it shows."""

    id: str
    kind: str
    section: str  # "overview", "composition", "comparison", "modules"
    caption: str
    checkpoint: int | None = None
    module: str | None = None
    layers: tuple[str, ...] | None = None
    layer: str | None = None
    wide: bool = False


class _Ids:
    """Unique ids: two module types or labels that slug alike get ``-2``, ``-3`` …"""

    def __init__(self) -> None:
        self.used: set[str] = set()

    def __call__(self, base: str) -> str:
        candidate, n = base, 1
        while candidate in self.used:
            n += 1
            candidate = f"{base}-{n}"
        self.used.add(candidate)
        return candidate


def module_types(analyses: Sequence[Analysis]) -> dict[str, list[str]]:
    """Module type → layer names of that type (union over the checkpoints; types in order of first appearance,
    names in model order)."""
    module_of: dict[str, str] = {}
    for analysis in analyses:
        for record in analysis.layers:
            module_of.setdefault(record.name, record.module_type)
    groups: dict[str, list[str]] = {module: [] for module in module_of.values()}
    for name in sorted(module_of, key=model_order_key):
        groups[module_of[name]].append(name)
    return groups


def _composed(analysis: Analysis) -> list[LayerRecord]:
    return [record for record in analysis.layers if record.composition is not None]


def _most_aligned(records: list[LayerRecord]) -> LayerRecord | None:
    """The composed layer whose components overlap most (mean off-diagonal |cosine|), for the alignment figure."""
    scored = []
    for record in records:
        if record.alignment:
            values = [
                abs(v)
                for i, row in enumerate(record.alignment["cosine"])
                for j, v in enumerate(row)
                if i != j and v is not None
            ]
            if values:
                scored.append((sum(values) / len(values), record))
    return max(scored, key=lambda pair: pair[0])[1] if scored else None


def figure_slots(
    analyses: Sequence[Analysis], labels: Sequence[str], comparison: Comparison | None = None
) -> list[FigureSlot]:
    """The figures a report holds, in page order. A checkpoint's figures carry its label in the id when there
    are several. One spectrum figure per module type (not per layer), so a 224-layer report stays small."""
    ids = _Ids()
    several = len(analyses) > 1
    tau = analyses[0].options.thresholds[0]
    slots = []
    for index, label in enumerate(labels):
        suffix = f"-{_slug(label)}" if several else ""
        of = f" — {label}" if several else ""
        slots.append(
            FigureSlot(
                ids(f"erank-heatmap{suffix}"),
                "erank-heatmap",
                "overview",
                f"Effective rank (erank) by layer index and module type{of}",
                checkpoint=index,
            )
        )
    slots += [
        FigureSlot(
            ids("spectrum"),
            "spectrum",
            "overview",
            "Singular values by module type (log scale), thresholds τ and rank bounds marked",
        ),
        FigureSlot(ids("count-above"), "count-above", "overview", f"Singular values above τ = {tau:g} per layer"),
        FigureSlot(ids("energy"), "energy", "overview", "Cumulative energy Σ_{i≤k} σ_i² / Σ σ² by module type"),
    ]
    for index, (analysis, label) in enumerate(zip(analyses, labels, strict=True)):
        composed = _composed(analysis)
        if not composed:
            continue
        suffix = f"-{_slug(label)}" if several else ""
        of = f" — {label}" if several else ""
        slots.append(
            FigureSlot(
                ids(f"weights{suffix}"),
                "weights",
                "composition",
                f"Composition weights and energy shares per composed layer{of}",
                checkpoint=index,
                wide=True,
            )
        )
        if any("growth" in record.composition for record in composed):
            slots.append(
                FigureSlot(
                    ids(f"growth{suffix}"),
                    "growth",
                    "composition",
                    f"Effective rank as components are added (sequential){of}",
                    checkpoint=index,
                )
            )
        shown = [composed[0]]
        most = _most_aligned(composed)
        if most is not None and most is not composed[0]:
            shown.append(most)
        for record in shown:
            if record.alignment:
                slots.append(
                    FigureSlot(
                        ids(f"alignment-{_slug(record.name)}{suffix}"),
                        "alignment",
                        "composition",
                        f"Alignment of the components of {record.name}{of}",
                        checkpoint=index,
                        layer=record.name,
                    )
                )
    if comparison is not None:
        matched = next((layer for layer in comparison.layers if layer.alignment), None)
        if matched is not None:
            first, second = comparison.labels[:2]
            slots.append(
                FigureSlot(
                    ids("subspace-similarity"),
                    "subspace-similarity",
                    "comparison",
                    f"Subspace similarity φ(i, j) of the input (right) singular vectors of {matched.name}: "
                    f"top-i of {first} against top-j of {second}",
                    layer=matched.name,
                )
            )
    for module, names in module_types(analyses).items():
        slots.append(
            FigureSlot(
                ids(f"spectrum-{_slug(module)}"),
                "spectrum",
                "modules",
                f"Singular values of the {module} layers",
                module=module,
                layers=tuple(names),
            )
        )
    return slots


_SVG_ID = re.compile(r'\bid="([^"]+)"')


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
    text = re.sub(r"<\?xml.*?\?>|<!DOCTYPE.*?>|<!--.*?-->", "", svg, flags=re.S).strip()
    ids = set(_SVG_ID.findall(text))
    if ids:
        pattern = re.compile(
            r'(\bid="|#)(' + "|".join(re.escape(i) for i in sorted(ids, key=len, reverse=True)) + r')(?=["\)])'
        )
        text = pattern.sub(lambda m: f"{m.group(1)}{prefix}{m.group(2)}", text)
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
    tag = tag.replace("<svg", f'<svg role="img" aria-label="{_e(caption)}"', 1)
    return text[: opening.start()] + tag + text[opening.end() :]


# -- per-layer spectrum and cumulative energy (small SVG) ----------------------------------------------------
@dataclass(frozen=True)
class _Series:
    label: str
    sigma: list[float]
    rank_bound: int
    colour: str
    dash: str


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


_W, _H, _L, _R, _T, _B = 330, 190, 48, 12, 14, 34  # one panel: size and margins (px)
_AXIS = 'fill="none" stroke="#9aa4b1"'
_GUIDE = 'stroke="#7b8794" stroke-dasharray="4 3"'


def _c(value: float) -> str:
    """A coordinate, to 0.1 px."""
    return f"{value:.1f}".removesuffix(".0")


def _x(x0: float, index: int, n: int) -> float:
    """Index i (1-based) of n on a panel's x axis, half a step in from either edge."""
    return x0 + _L + (_W - _L - _R) * (index - 0.5) / n


def _panel_frame(x0: float, n: int, xlabel: str, ylabel: str) -> list[str]:
    """Axes box, x ticks 1..n and the axis labels of a panel whose left edge is at x0."""
    bottom, middle = _H - _B, (_T + _H - _B) / 2
    parts = [f'<rect x="{x0 + _L}" y="{_T}" width="{_W - _L - _R}" height="{_H - _T - _B}" {_AXIS}/>']
    for tick in _nice_ticks(n):
        x = _c(_x(x0, tick, n))
        parts.append(f'<path d="M{x} {bottom}v4" {_AXIS}/><text x="{x}" y="{bottom + 15}" text-anchor="middle">'
                     f"{tick}</text>")  # fmt: skip
    parts.append(f'<text x="{_c(x0 + (_W + _L - _R) / 2)}" y="{_H - 4}" text-anchor="middle">{xlabel}</text>')
    parts.append(f'<text x="{x0 + 12}" y="{_c(middle)}" text-anchor="middle" '
                 f'transform="rotate(-90 {x0 + 12} {_c(middle)})">{ylabel}</text>')  # fmt: skip
    return parts


def _energy_y(fraction: float) -> float:
    return _T + (_H - _T - _B) * (1 - fraction)


def frame_def(n: int, energies: Sequence[float]) -> str:
    """What every n-value layer plot shares — both panels' boxes, x ticks, labels, the energy panel's y ticks and
    energy-fraction lines — defined once per page as ``#frame-<n>`` (most layers share one n)."""
    parts = _panel_frame(0, n, "index i", "σᵢ") + _panel_frame(_W, n, "components k", "energy")
    for fraction in (0.0, 0.5, 1.0):
        parts.append(f'<text x="{_W + _L - 6}" y="{_c(_energy_y(fraction) + 3.5)}" text-anchor="end">'
                     f"{fraction:.0%}</text>")  # fmt: skip
    for p in energies:
        parts.append(f'<path d="M{_W + _L} {_c(_energy_y(p))}H{2 * _W - _R}" {_GUIDE}/>')
    if energies:  # the fractions sit close together: one label, where a rising curve leaves room
        fractions = ", ".join(f"{p:.0%}" for p in energies)
        parts.append(f'<text x="{2 * _W - _R - 4}" y="{_H - _B - 6}" text-anchor="end" fill="#5b6675">dashed: '
                     f"{fractions}</text>")  # fmt: skip
    return f'<g id="frame-{n}">{"".join(parts)}</g>'


def _line(points: list[tuple[float, float]], s: _Series, dots: bool) -> str:
    """A series as a polyline, and its points as round dots (zero-length segments with round caps)."""
    dash = f' stroke-dasharray="{s.dash}"' if s.dash else ""
    out = (f'<polyline points="{" ".join(f"{_c(x)},{_c(y)}" for x, y in points)}" fill="none" stroke="{s.colour}" '
           f'stroke-width="1.6"{dash}/>')  # fmt: skip
    if dots:
        out += (f'<path d="{"".join(f"M{_c(x)} {_c(y)}h.01" for x, y in points)}" stroke="{s.colour}" '
                'stroke-width="4.5" style="stroke-linecap:round"/>')  # fmt: skip
    return out


def _spectrum_panel(series: list[_Series], thresholds: Sequence[float], n: int) -> list[str]:
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
        parts.append(f'<path d="M{_L - 4} {yy}H{_W - _R}" stroke="#e6e9ed"/>{label}')  # fmt: skip
    for tau in thresholds:
        if bottom < tau < top:
            yy = y(tau)
            parts.append(f'<path d="M{_L} {_c(yy)}H{_W - _R}" {_GUIDE}/><text x="{_L + 4}" y="{_c(yy - 3)}" '
                         f'class="an">τ = {tau:g}</text>')  # fmt: skip
    for bound in sorted({s.rank_bound for s in series if 0 < s.rank_bound <= n}):
        xx = _x(0, bound, n)
        parts.append(f'<path d="M{_c(xx)} {_T}V{_H - _B}" stroke="#b54708" stroke-dasharray="5 3"/>'
                     f'<text x="{_c(xx - 3)}" y="{_T + 11}" text-anchor="end" class="an">r≤{bound}</text>')  # fmt: skip
    for s in series:
        indices = _sample(len(s.sigma))
        parts.append(_line([(_x(0, i + 1, n), y(s.sigma[i])) for i in indices], s, len(s.sigma) <= 64))
    return parts


def _energy_panel(series: list[_Series], n: int) -> list[str]:
    """Cumulative energy Σ_{i≤k} σ_i²/Σσ² against k (the frame holds the energy-fraction lines)."""
    parts = []
    for s in series:
        squares = [v * v for v in s.sigma]
        total = sum(squares)
        if total <= 0:
            continue
        cumulative, running = [], 0.0
        for value in squares:
            running += value
            cumulative.append(running / total)
        points = [(_x(_W, i + 1, n), _energy_y(cumulative[i])) for i in _sample(len(cumulative))]
        parts.append(_line(points, s, dots=False))
    return parts


def layer_svg(series: list[_Series], thresholds: Sequence[float], energies: Sequence[float], *,
              shared_frame: bool = False) -> str:  # fmt: skip
    """Two panels: the spectrum (rank bounds and thresholds marked) and the cumulative energy. With
    ``shared_frame`` the axes are a ``<use>`` of the page's ``#frame-<n>`` (see :func:`frame_def`)."""
    n = max((len(s.sigma) for s in series), default=0)
    if n == 0:
        return ""
    frame = f'<use href="#frame-{n}"/>' if shared_frame else frame_def(n, energies).replace(f' id="frame-{n}"', "")
    body = [frame, *_spectrum_panel(series, thresholds, n), *_energy_panel(series, n)]
    return (f'<svg class="mini" viewBox="0 0 {2 * _W} {_H}" role="img" aria-label="spectrum and cumulative energy">'
            + "".join(body) + "</svg>")  # fmt: skip


# -- page pieces ----------------------------------------------------------------------------------------------
def _table(headers: Sequence[tuple[str, str]], rows: Sequence[str], *, table_id: str, caption: str = "") -> str:
    """A sortable table: headers are (text, "num"|"text"); rows are pre-rendered ``<tr>`` strings. A long one
    scrolls in its own box under a header that stays put."""
    head = "".join(f'<th scope="col" data-type="{kind}" tabindex="0">{text}</th>' for text, kind in headers)
    cap = f"<caption>{caption}</caption>" if caption else ""
    box = "scroll tall" if len(rows) > _TALL else "scroll"
    return (
        f'<div class="{box}"><table class="sortable" id="{table_id}">{cap}<thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table></div>"
    )


def _filter(table_id: str, placeholder: str, total: int) -> str:
    return (
        f'<div class="filter"><input type="search" data-filter="{table_id}" placeholder="{placeholder}" '
        f'aria-label="{placeholder}"><span class="count" data-count="{table_id}">{total} rows</span></div>'
    )


def _td(value: float | int | None, spec: str = ".3g") -> str:
    """A numeric cell: shown formatted, sorted by the exact value (``data-v``)."""
    sort = "" if value is None else f' data-v="{value!r}"'
    return f'<td class="n"{sort}>{_num(value, spec)}</td>'


def _kpi(value: str, label: str, detail: str = "") -> str:
    sub = f"<small>{detail}</small>" if detail else ""
    return f'<div class="kpi"><b>{value}</b><span>{label}</span>{sub}</div>'


def _bounds(analysis: Analysis) -> str:
    bounds = sorted({r.rank_bound for r in analysis.layers if r.valid})
    if not bounds:
        return "—"
    return str(bounds[0]) if len(bounds) == 1 else f"{bounds[0]}–{bounds[-1]}"


def _stat(block: dict, key: str) -> float | None:
    entry = block["metrics"].get(key)
    return entry["mean"] if entry else None


def _config_rows(config: dict) -> str:
    rows = []
    for key, value in config.items():
        if value in (None, {}, [], ""):
            continue
        shown = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
        rows.append(f"<tr><th>{_e(key)}</th><td><code>{_e(shown)}</code></td></tr>")
    return "".join(rows)


def _checkpoint_card(analysis: Analysis, label: str, several: bool) -> str:
    ckpt, options = analysis.checkpoint, analysis.options
    summary = analysis.summary()
    tau = options.thresholds[0]
    key = f"count_above[{parameter_key(tau)}]"
    erank, util = _stat(summary, "erank"), _stat(summary, "utilization")
    modules = [(name, _stat(block, "utilization")) for name, block in summary["by_module"].items()]
    modules = [(name, u) for name, u in modules if u is not None]
    title = f"<h3>{_e(label)}</h3>" if several else ""
    exact = sum(r.exact for r in analysis.layers if r.valid)
    scaling = "B·A without α/r (--unscaled)" if options.unscaled else "ΔW as the model applies it (α/r included)"
    spectra = "all spectra exact" if exact == summary["valid_layers"] else f"{exact} of {summary['valid_layers']} exact"
    lines = [
        f'<div class="card">{title}<p class="meta"><code>{_e(ckpt.path)}</code> · {_e(ckpt.adapter_type)} '
        f"({_e(ckpt.family)}) · singular values of {_e(scaling)} · "
        f"{spectra}</p>",
        '<div class="kpis">',
        _kpi(f"{summary['valid_layers']}/{summary['layers']}", "layers analysed"),
        _kpi(f"{ckpt.params:,}", "adapter parameters"),
        _kpi(_bounds(analysis), "rank bound r"),
        _kpi(_num(_stat(summary, key), ".2f"), f"mean #σ > {tau:g}"),
        _kpi(_num(erank, ".2f"), "mean erank", f"{_num(util, '.0%')} of the bound" if util is not None else ""),
        _kpi(_num(_stat(summary, "stable_rank"), ".2f"), "mean stable rank"),
        "</div>",
    ]
    if erank is not None and len(modules) > 1:
        low, high = min(modules, key=lambda m: m[1]), max(modules, key=lambda m: m[1])
        lines.append(
            f'<p class="headline">Layers use {_num(util, ".0%")} of their rank bound on average (erank / '
            f"r); <b>{_e(low[0])}</b> uses the least ({_num(low[1], '.0%')}), <b>{_e(high[0])}</b> the most "
            f"({_num(high[1], '.0%')}).</p>"
        )
    lines.append(_problems(analysis))
    config = _config_rows(ckpt.config or {})
    if config:
        lines.append(
            f'<details class="config"><summary>Configuration</summary><table class="kv">{config}</table></details>'
        )
    lines.append("</div>")
    return "".join(lines)


def _problems(analysis: Analysis) -> str:
    ckpt = analysis.checkpoint
    parts = []
    for message in [*ckpt.warnings, *analysis.warnings]:
        parts.append(f'<p class="warn">⚠ {_e(message)}</p>')
    for record in analysis.invalid:
        parts.append(f'<p class="warn">⚠ layer <code>{_e(record.name)}</code> is invalid: {_e(record.error)}</p>')
    for message in ckpt.notes:
        parts.append(f'<p class="note">{_e(message)}</p>')
    if ckpt.skipped:
        items = "".join(f"<li><code>{_e(s.key)}</code> — {_e(s.reason)}</li>" for s in ckpt.skipped[:_MAX_SKIPPED])
        more = (
            f"<li>… and {len(ckpt.skipped) - _MAX_SKIPPED} more (summary.json)</li>"
            if len(ckpt.skipped) > _MAX_SKIPPED
            else ""
        )
        parts.append(
            f"<details><summary>{len(ckpt.skipped)} stored tensors not used</summary><ul>{items}{more}</ul></details>"
        )
    return "".join(parts)


def _module_table(analysis: Analysis, table_id: str, caption: str) -> str:
    summary = analysis.summary()
    tau = analysis.options.thresholds[0]
    key = f"count_above[{parameter_key(tau)}]"
    rows = []
    for name, block in [*summary["by_module"].items(), ("all", summary)]:
        cls = ' class="total"' if name == "all" and block is summary else ""
        rows.append(
            f"<tr{cls}><td>{_e(name)}</td>{_td(block['layers'], 'd')}{_td(block['params'], ',')}"
            f"{_td(_stat(block, key), '.2f')}{_td(_stat(block, 'energy'), '.4g')}{_td(_stat(block, 'erank'), '.2f')}"
            f"{_td(_stat(block, 'stable_rank'), '.2f')}{_td(_stat(block, 'utilization'), '.0%')}</tr>"
        )
    headers = [
        ("module", "text"),
        ("layers", "num"),
        ("params", "num"),
        (f"mean #σ&gt;{tau:g}", "num"),
        ("mean Σσ²", "num"),
        ("mean erank", "num"),
        ("mean stable rank", "num"),
        ("mean utilisation", "num"),
    ]
    return _table(headers, rows, table_id=table_id, caption=_e(caption))


def _layer_headers(tau: float, several: bool) -> list[tuple[str, str]]:
    headers = [("layer", "text"), ("module", "text"), ("index", "num")]
    if several:
        headers.insert(0, ("checkpoint", "text"))
    return [
        *headers,
        ("m×n", "num"),
        ("r≤", "num"),
        ("σ₁", "num"),
        ("‖ΔW‖<sub>F</sub>", "num"),
        (f"#σ&gt;{tau:g}", "num"),
        ("erank", "num"),
        ("stable rank", "num"),
        ("90% energy", "num"),
        ("utilisation", "num"),
        ("status", "text"),
    ]


def _layer_row(record: LayerRecord, label: str | None, anchor: str, tau: float) -> str:
    search = " ".join(x for x in (record.name, record.module_type, label or "") if x).lower()
    m = record.metrics or {}
    size = record.matrix_shape[0] * record.matrix_shape[1] if len(record.matrix_shape) == 2 else None
    shape = "×".join(map(str, record.matrix_shape)) or "—"
    status = "ok" if record.valid else "invalid"
    if record.valid and not record.exact:
        status = "approximate"
    cells = [f"<td>{_e(label)}</td>"] if label is not None else []
    cells += [
        f'<td class="name"><a href="#{anchor}">{_name(record.name)}</a></td>',
        f"<td>{_e(record.module_type)}</td>",
        _td(record.layer_index, "d"),
        f'<td class="n" data-v="{size}">{shape}</td>' if size is not None else '<td class="n">—</td>',
        _td(record.rank_bound, "d"),
        _td(m.get("sigma_max"), ".4g"),
        _td(m.get("frobenius"), ".4g"),
        _td((m.get("count_above") or {}).get(parameter_key(tau)), "d"),
        _td(m.get("erank"), ".2f"),
        _td(m.get("stable_rank"), ".2f"),
        _td((m.get("energy_rank") or {}).get("0.9"), "d"),
        _td(m.get("utilization"), ".0%"),
        f'<td class="{status}" title="{_e(record.error or "")}">{status}</td>',
    ]
    return f'<tr data-search="{_e(search)}">{"".join(cells)}</tr>'


def _layers_section(analyses: Sequence[Analysis], labels: Sequence[str], anchors: dict[str, str]) -> str:
    several = len(analyses) > 1
    tau = analyses[0].options.thresholds[0]
    rows = [
        _layer_row(record, label if several else None, anchors[record.name], tau)
        for analysis, label in zip(analyses, labels, strict=True)
        for record in analysis.layers
    ]
    return (
        '<section id="layers"><h2>Layers</h2>'
        '<p class="hint">Click a header to sort, type to filter; a layer\'s name opens its spectrum below. '
        "90% energy: the fewest singular values holding 90% of Σσ². Utilisation: erank / r.</p>"
        + _filter("layer-table", "filter layers (name, module" + (", checkpoint" if several else "") + ")", len(rows))
        + _table(_layer_headers(tau, several), rows, table_id="layer-table")
        + "</section>"
    )


def _detail(name: str, anchor: str, analyses: Sequence[Analysis], labels: Sequence[str], frames: set[int]) -> str:
    """One layer (in every checkpoint that has it): key numbers, components, and the two-panel SVG."""
    several = len(analyses) > 1
    options = analyses[0].options
    series, facts = [], []
    for index, (analysis, label) in enumerate(zip(analyses, labels, strict=True)):
        record = next((r for r in analysis.layers if r.name == name), None)
        if record is None:
            continue
        colour, dash = PALETTE[index % len(PALETTE)], DASHES[index % len(DASHES)]
        who = (
            (
                f'<span class="swatch" style="border-color:{colour};border-style:{"solid" if not dash else "dashed"}">'
                f"</span>{_e(label)}: "
            )
            if several
            else ""
        )
        if not record.valid:
            facts.append(f'<p class="warn">{who}invalid — {_e(record.error)}</p>')
            continue
        series.append(_Series(label, record.singular_values, record.rank_bound, colour, dash))
        m = record.metrics or {}
        counts = ", ".join(f"{v} above {float(k):g}" for k, v in m["count_above"].items())
        energy = ", ".join(f"{float(k):.0%}: {v}" for k, v in m["energy_rank"].items())
        scale = f" · scale {_num(record.scale, '.4g')}" if record.scale is not None else ""
        facts.append(
            f"<p>{who}{'×'.join(map(str, record.matrix_shape))} · r≤{record.rank_bound}{scale} · "
            f"{'exact' if record.exact else 'approximate'} · σ₁ {_num(m['sigma_max'], '.4g')} · "
            f"‖ΔW‖<sub>F</sub> {_num(m['frobenius'], '.4g')} · σ: {counts} · erank {_num(m['erank'], '.2f')} · "
            f"stable rank {_num(m['stable_rank'], '.2f')} · numerical rank {m['numerical_rank']} · "
            f"energy rank {energy}</p>"
        )
        if record.components:
            facts.append(_components_table(record, label if several else None))
    figure = layer_svg(series, options.thresholds, options.energies, shared_frame=True)
    if series:
        frames.add(max(len(s.sigma) for s in series))
    return (
        f'<details class="layer" id="{anchor}"><summary><code>{_e(name)}</code></summary>'
        f'<div class="facts">{"".join(facts)}</div>{figure}</details>'
    )


def _components_table(record: LayerRecord, label: str | None) -> str:
    """A composed layer's components (weight, energy share, spectrum metrics) and its cosine matrix."""
    fields = record.composition or {}
    weights = (fields.get("weights") or {}).get("normalized") or [None] * len(record.components or [])
    shares = (fields.get("energy_shares") or {}).get("values") or [None] * len(record.components or [])
    rows = []
    for component, weight, share in zip(record.components or [], weights, shares, strict=True):
        m = component.metrics or {}
        rows.append(
            f"<tr><td>{_e(component.name)}</td>{_td(weight, '.3g')}{_td(share, '.1%')}"
            f"{_td(component.rank_bound, 'd')}{_td(m.get('erank'), '.2f')}{_td(m.get('sigma_max'), '.4g')}"
            "</tr>"
        )
    of = f" ({_e(label)})" if label else ""
    table = (
        '<table class="plain"><caption>Components' + of + "</caption><thead><tr><th>component</th><th>weight</th>"
        "<th>energy share</th><th>r≤</th><th>erank</th><th>σ₁</th></tr></thead><tbody>"
        + "".join(rows)
        + "</tbody></table>"
    )
    cosine = (record.alignment or {}).get("cosine")
    matrix = _matrix(cosine, [c.name for c in record.components or []], "Update cosine") if cosine else ""
    return f'<div class="row">{table}{matrix}</div>'


def _matrix(matrix: list[list[float | None]], names: list[str], caption: str) -> str:
    """A k×k matrix as a small heatmap table (|value| sets the shade)."""
    head = "".join(f"<th>{_e(n)}</th>" for n in names)
    rows = []
    for name, row in zip(names, matrix, strict=True):
        cells = []
        for value in row:
            shade = 0 if value is None else min(1.0, abs(value))
            cells.append(
                f'<td style="background:rgba(0,114,178,{shade * 0.8:.2f});'
                f'color:{"#fff" if shade > 0.55 else "inherit"}">{_num(value, ".2f")}</td>'
            )
        rows.append(f"<tr><th>{_e(name)}</th>{''.join(cells)}</tr>")
    return (
        f'<table class="matrix"><caption>{caption}</caption><thead><tr><th></th>{head}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def _figure(slot: FigureSlot, svg: str, number: int, formats: Sequence[str]) -> str:
    links = " · ".join(f'<a href="figures/{_e(slot.id)}.{fmt}">{fmt.upper()}</a>' for fmt in formats)
    links = f' <span class="dl">{links}</span>' if links else ""
    cls = "fig wide" if slot.wide else "fig"
    return (
        f'<figure class="{cls}">{inline_svg(svg, f"f{number}-", slot.caption)}'
        f"<figcaption>{_e(slot.caption)}{links}</figcaption></figure>"
    )


def _bar(values: Sequence[float | None], names: Sequence[str], what: str) -> str:
    """Shares as one stacked bar (|x_i| / Σ|x|), each component in its palette colour."""
    magnitudes = [abs(v) if v is not None else 0.0 for v in values]
    total = sum(magnitudes)
    if total <= 0:
        return "—"
    segments = []
    for index, (value, name, size) in enumerate(zip(values, names, magnitudes, strict=True)):
        segments.append(
            f'<span style="width:{100 * size / total:.2f}%;background:{PALETTE[index % len(PALETTE)]}" '
            f'title="{_e(name)}: {what} {_num(value, ".3g")}"></span>'
        )
    return f'<div class="bar">{"".join(segments)}</div>'


def _composition_section(analyses, labels, figures, slots, formats, numbers) -> str:
    parts = []
    several = len(analyses) > 1
    for index, (analysis, label) in enumerate(zip(analyses, labels, strict=True)):
        composed = _composed(analysis)
        if not composed:
            continue
        stats = analysis.summary()["composition"]
        of = f" — {_e(label)}" if several else ""
        parts.append(f"<h3>Composition{of}</h3>" if several else "")
        parts.append(
            '<div class="kpis">'
            + _kpi(f"{stats['layers']}", "composed layers", f"{stats['collapsed']} collapsed")
            + _kpi(_num(stats["mean_components"], ".3g"), "components per layer")
            + _kpi(_num(stats["mean_effective_components"], ".2f"), "effective components", "by energy share")
            + _kpi(_num(stats["mean_rank_gain"], ".2f"), "rank gain", "erank / best component's")
            + _kpi(_num(stats["mean_interference"], ".3f"), "interference", "0 when orthogonal")
            + _kpi(
                _num(stats["mean_left_overlap"], ".3f"),
                "left overlap",
                f"random {_num(stats['mean_left_baseline'], '.3f')}",
            )
            + _kpi(
                _num(stats["mean_right_overlap"], ".3f"),
                "right overlap",
                f"random {_num(stats['mean_right_baseline'], '.3f')}",
            )
            + "</div>"
        )
        names = [c.name for c in composed[0].components or []]
        legend = "".join(
            f'<span class="key"><span class="dot" style="background:{PALETTE[i % len(PALETTE)]}"></span>{_e(n)}</span>'
            for i, n in enumerate(names)
        )
        rows = []
        for record in composed:
            fields = record.composition
            members = [c.name for c in record.components or []]
            growth = fields.get("growth")
            path = " → ".join(_num(g["metrics"]["erank"], ".2f") for g in growth) if growth else "—"
            alignment = record.alignment or {}
            rows.append(
                f'<tr data-search="{_e(record.name.lower())}"><td class="name">{_name(record.name)}</td>'
                f"{_td(len(members), 'd')}"
                f"<td>{_bar(fields['weights']['normalized'], members, 'weight')}</td>"
                f"<td>{_bar(fields['energy_shares']['values'], members, 'energy share')}</td>"
                f"{_td(fields['energy_shares']['concentration']['effective_number'], '.2f')}"
                f"{_td(fields['rank_gain'], '.2f')}{_td(fields['interference'], '.3f')}"
                f"<td>{'yes' if fields['collapsed'] else 'no'}</td>"
                f"{_td(off_diagonal_mean(alignment['cosine']) if alignment else None, '.3f')}"
                f"{_td(off_diagonal_mean(alignment['left_overlap']) if alignment else None, '.3f')}"
                f"{_td(off_diagonal_mean(alignment['right_overlap']) if alignment else None, '.3f')}"
                f'<td class="wrap">{path}</td></tr>'
            )
        table_id = f"composition-table-{index}"
        headers = [
            ("layer", "text"),
            ("k", "num"),
            ("weights", "text"),
            ("energy shares", "text"),
            ("effective components", "num"),
            ("rank gain", "num"),
            ("interference", "num"),
            ("collapsed", "text"),
            ("mean cos", "num"),
            ("overlap L", "num"),
            ("overlap R", "num"),
            ("erank by round", "text"),
        ]
        parts.append(f'<p class="legend">{legend}</p>')
        parts.append(_table(headers, rows, table_id=table_id))
        mine = [s for s in slots if s.section == "composition" and s.checkpoint == index and s.id in figures]
        if mine:
            parts.append(
                '<div class="figs">'
                + "".join(_figure(s, figures[s.id], numbers[s.id], formats) for s in mine)
                + "</div>"
            )
    if not parts:
        return ""
    return (
        '<section id="composition"><h2>Composition</h2><p class="hint">Each composed layer is Σ w_i·ΔW_i. Bars: '
        "each component's share of |w| and of the energy ‖w_iΔW_i‖² (what the weights do in fact); hover for "
        "values. Overlaps are means over pairs of components, against their random baseline.</p>"
        + "".join(parts)
        + "</section>"
    )


def _comparison_section(comparison: Comparison, figures, slots, formats, numbers) -> str:
    summary = comparison.summary()
    tau = comparison.threshold
    labels = comparison.labels
    headlines = "".join(f"<li>{_e(line)}</li>" for line in summary["headlines"])
    rows = []
    for name, block in [*summary["by_module"].items(), ("all", summary)]:
        for label in labels:
            v = block["per_label"][label]
            cls = ' class="total"' if block is summary else ""
            rows.append(
                f"<tr{cls}><td>{_e(name)}</td><td>{_e(label)}</td>{_td(v['params'], ',')}"
                f"{_td(v['mean_count_above'], '.2f')}{_td(v['mean_energy'], '.4g')}{_td(v['mean_erank'], '.2f')}"
                f"{_td(v['mean_stable_rank'], '.2f')}{_td(v['mean_utilization'], '.0%')}"
                f"{_td(v['mean_erank_per_kparam'], '.3g')}</tr>"
            )
    headers = [
        ("module", "text"),
        ("checkpoint", "text"),
        ("params", "num"),
        (f"mean #σ&gt;{tau:g}", "num"),
        ("mean Σσ²", "num"),
        ("mean erank", "num"),
        ("mean stable rank", "num"),
        ("mean utilisation", "num"),
        ("erank per 1k params", "num"),
    ]
    by_module = _table(headers, rows, table_id="comparison-modules", caption="Means by module type")
    layer_rows = []
    for layer in comparison.layers:
        cells = [f'<td class="name">{_name(layer.name)}</td>']
        for record in layer.records:
            values = comparison.values(record)
            cells += [_td(values["count_above"], "d"), _td(values["erank"], ".2f"), _td(values["utilization"], ".0%")]
        alignment = layer.alignment or {}
        for key in ("cosine", "left_overlap", "right_overlap"):
            cells.append(_td(off_diagonal_mean(alignment[key]) if alignment else None, ".3f"))
        layer_rows.append(f'<tr data-search="{_e(layer.name.lower())}">{"".join(cells)}</tr>')
    layer_headers = [("layer", "text")]
    for label in labels:
        layer_headers += [
            (f"{_e(label)} #σ&gt;{tau:g}", "num"),
            (f"{_e(label)} erank", "num"),
            (f"{_e(label)} util", "num"),
        ]
    layer_headers += [("cos", "num"), ("overlap L", "num"), ("overlap R", "num")]
    alignment = summary["alignment"]
    aligned = ""
    if alignment["mean_left_overlap"] is not None:
        a = {k: _num(v, ".3f") for k, v in alignment.items()}
        aligned = (
            f"<p>Across checkpoints (mean over matched layers and pairs): update cosine {a['mean_cosine']}; "
            f"left-subspace overlap {a['mean_left_overlap']} (random {a['mean_left_baseline']}); right-subspace "
            f"overlap {a['mean_right_overlap']} (random {a['mean_right_baseline']}).</p>"
        )
    unmatched = "".join(
        f'<p class="note">Only in {_e(label)}: {len(names)} layers ('
        f"{', '.join(_e(n) for n in names[:5])}{', …' if len(names) > 5 else ''})</p>"
        for label, names in comparison.unmatched.items()
    )
    return (
        '<section id="comparison"><h2>Comparison</h2>'
        f'<ul class="headlines">{headlines}</ul>{aligned}{unmatched}{by_module}'
        + "".join(
            f'<div class="figs">{_figure(slot, figures[slot.id], numbers[slot.id], formats)}</div>'
            for slot in slots
            if slot.section == "comparison" and slot.id in figures
        )
        + "<h3>Matched layers</h3>"
        + _filter("comparison-layers", "filter matched layers", len(layer_rows))
        + _table(layer_headers, layer_rows, table_id="comparison-layers")
        + "</section>"
    )


def _details_section(analyses, labels, anchors, figures, slots, formats, numbers) -> str:
    parts = [
        '<section id="detail"><h2>Per-layer detail</h2><p class="hint">First the spectra of each module type '
        "together, then every layer: its singular values σᵢ (log scale; dashed: the thresholds τ and the rank bound "
        "r) and its cumulative energy (dashed: the energy fractions).</p>"
    ]
    mine = [s for s in slots if s.section == "modules" and s.id in figures]
    if mine:
        figs = "".join(_figure(s, figures[s.id], numbers[s.id], formats) for s in mine)
        parts.append(f'<div class="figs small">{figs}</div>')
    if len(analyses) > 1:
        keys = "".join(
            f'<span class="key"><span class="swatch" style="border-color:{PALETTE[i % len(PALETTE)]};'
            f'border-style:{"solid" if not DASHES[i % len(DASHES)] else "dashed"}"></span>{_e(label)}</span>'
            for i, label in enumerate(labels)
        )
        parts.append(f'<p class="legend">{keys}</p>')
    frames: set[int] = set()
    for module, names in module_types(analyses).items():
        count = f"{len(names)} layer{'' if len(names) == 1 else 's'}"
        parts.append(f"<h3>{_e(module)} <small>{count}</small></h3>")
        parts += [_detail(name, anchors[name], analyses, labels, frames) for name in names]
    energies = analyses[0].options.energies
    defs = "".join(frame_def(n, energies) for n in sorted(frames))
    parts.insert(1, f'<svg class="defs" width="0" height="0" aria-hidden="true"><defs>{defs}</defs></svg>')
    return "".join(parts) + "</section>"


def report_html(
    analyses: Sequence[Analysis],
    labels: Sequence[str],
    comparison: Comparison | None = None,
    figures: Mapping[str, str] | None = None,
    *,
    figure_formats: Sequence[str] = (),
    companions: bool = False,
) -> str:
    """The whole report as one HTML document.

    ``figures`` maps the ids of :func:`figure_slots` to SVG text (figures that are missing are left out).
    ``figure_formats`` links each figure's files under ``figures/``; ``companions`` links layers.csv,
    summary.json and summary.md (both for a report folder, not for a page on its own).
    """
    figures = dict(figures or {})
    labels = list(labels)
    several = len(analyses) > 1
    slots = figure_slots(analyses, labels, comparison)
    numbers = {slot.id: n for n, slot in enumerate(slots, 1)}
    names = [name for group in module_types(analyses).values() for name in group]
    anchors = {name: f"layer-{n}" for n, name in enumerate(names, 1)}
    title = " vs ".join(labels) if several else labels[0]
    overview = [s for s in slots if s.section == "overview" and s.id in figures]
    nav = [
        ("summary", "Summary"),
        ("figures", "Figures"),
        ("composition", "Composition"),
        ("comparison", "Comparison"),
        ("layers", "Layers"),
        ("detail", "Per-layer detail"),
    ]
    composition = _composition_section(analyses, labels, figures, slots, figure_formats, numbers)
    present = {"summary", "layers", "detail"} | ({"figures"} if overview else set())
    present |= {"composition"} if composition else set()
    present |= {"comparison"} if comparison is not None else set()
    body = [
        f"<header><h1>rankscope report <span>{_e(title)}</span></h1><nav>"
        + "".join(f'<a href="#{key}">{text}</a>' for key, text in nav if key in present)
        + "</nav></header><main>",
        '<section id="summary"><h2>Summary</h2>',
        '<div class="cards">',
        "".join(_checkpoint_card(a, label, several) for a, label in zip(analyses, labels, strict=True)),
        "</div>",
    ]
    for index, (analysis, label) in enumerate(zip(analyses, labels, strict=True)):
        caption = f"By module type — {label}" if several else "By module type"
        body.append(_module_table(analysis, f"modules-{index}", caption))
    body.append("</section>")
    if overview:
        body.append(
            '<section id="figures"><h2>Figures</h2><div class="figs">'
            + "".join(_figure(s, figures[s.id], numbers[s.id], figure_formats) for s in overview)
            + "</div></section>"
        )
    body.append(composition)
    if comparison is not None:
        body.append(_comparison_section(comparison, figures, slots, figure_formats, numbers))
    body.append(_layers_section(analyses, labels, anchors))
    body.append(_details_section(analyses, labels, anchors, figures, slots, figure_formats, numbers))
    files = ""
    if companions:
        files = (
            ' · <a href="summary.json">summary.json</a> · <a href="layers.csv">layers.csv</a> · '
            '<a href="summary.md">summary.md</a>' + (" · figures/" if figure_formats else "")
        )
    body.append(f"</main><footer>Written by rankscope {_e(__version__)}{files}</footer>")
    return _page(f"rankscope — {title}", "".join(body))


def _page(title: str, body: str) -> str:
    digest = base64.b64encode(hashlib.sha256(_SCRIPT.encode()).digest()).decode()
    # nothing may be fetched; only this page's own script (by hash) may run — an injected handler could not
    policy = (
        f"default-src 'none'; script-src 'sha256-{digest}'; style-src 'unsafe-inline'; img-src data:; "
        "base-uri 'none'; form-action 'none'"
    )
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{policy}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<meta name="generator" content="rankscope {_e(__version__)}">'
        f"<title>{_e(title)}</title><style>{_CSS}</style></head>"
        f"<body>{body}<script>{_SCRIPT}</script></body></html>\n"
    )


_CSS = """
:root{--fg:#1d232b;--muted:#5b6675;--line:#dde2e8;--soft:#f4f6f8;--accent:#0072B2;--warn:#9a3412;color-scheme:light}
*{box-sizing:border-box}
body{margin:0;font:14px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,"Noto Sans",
"Liberation Sans",sans-serif;color:var(--fg);background:#fff}
header{padding:18px 32px 10px;border-bottom:1px solid var(--line);background:var(--soft)}
h1{margin:0;font-size:20px;font-weight:600}h1 span{color:var(--muted);font-weight:400;margin-left:8px;
overflow-wrap:anywhere}
nav{margin-top:6px}nav a{margin-right:16px;color:var(--accent);text-decoration:none;font-size:13px}
main{max-width:1240px;margin:0 auto;padding:8px 32px 40px}
h2{font-size:17px;font-weight:600;margin:30px 0 10px;padding-bottom:4px;border-bottom:1px solid var(--line)}
h3{font-size:15px;font-weight:600;margin:22px 0 8px}h3 small{color:var(--muted);font-weight:400}
code{font:12.5px/1.4 ui-monospace,SFMono-Regular,Menlo,Consolas,"Liberation Mono",monospace;overflow-wrap:anywhere}
a{color:var(--accent)}
.card{border:1px solid var(--line);border-radius:8px;padding:12px 16px;margin:12px 0}
.card h3{margin:0 0 4px}.meta{color:var(--muted);margin:0 0 10px}
.kpis{display:flex;flex-wrap:wrap;gap:10px;margin:8px 0}
.kpi{min-width:128px;padding:8px 12px;border-radius:6px;background:var(--soft)}
.kpi b{display:block;font-size:20px;font-weight:600;font-variant-numeric:tabular-nums}
.kpi span{display:block;color:var(--muted);font-size:12px}.kpi small{display:block;color:var(--muted);font-size:11px}
.headline{margin:8px 0}.hint{color:var(--muted);margin:4px 0 10px}
.warn{color:var(--warn);margin:4px 0;overflow-wrap:anywhere}.note{color:var(--muted);margin:4px 0}
.scroll{overflow-x:auto;margin:8px 0}.scroll.tall{max-height:78vh;overflow:auto;border-bottom:1px solid var(--line)}
table{border-collapse:collapse;font-variant-numeric:tabular-nums;font-size:13px}
caption{text-align:left;font-weight:600;padding:4px 0;color:var(--fg)}
th,td{padding:4px 10px;border-bottom:1px solid var(--line);text-align:left;white-space:nowrap}
td.n,th[data-type=num]{text-align:right}
td.name{text-align:left;white-space:normal;overflow-wrap:anywhere;min-width:12em;max-width:420px}
td.wrap{white-space:normal;min-width:8em}
thead th{white-space:normal;vertical-align:bottom;line-height:1.25}
table.sortable thead th{position:sticky;top:0;background:#fff;cursor:pointer;user-select:none;
border-bottom:2px solid var(--line)}
table.sortable th[aria-sort=ascending]::after{content:" ▲";font-size:10px}
table.sortable th[aria-sort=descending]::after{content:" ▼";font-size:10px}
table.sortable tbody tr:hover{background:var(--soft)}
tr.total td{font-weight:600;border-top:2px solid var(--line)}
td.invalid{color:var(--warn);font-weight:600}td.approximate{color:#8a6d00}td.ok{color:#1a7f37}
.filter{display:flex;gap:12px;align-items:center;margin:8px 0}
.filter input{font:inherit;padding:5px 10px;width:340px;max-width:100%;border:1px solid #c5ccd5;border-radius:6px}
.count{color:var(--muted);font-size:12px}
.figs{display:grid;grid-template-columns:repeat(auto-fill,minmax(440px,1fr));gap:18px;margin:12px 0}
figure{margin:0;padding:10px;border:1px solid var(--line);border-radius:8px;background:#fff}
figure.wide{grid-column:1/-1}
.figs.small{grid-template-columns:repeat(auto-fill,minmax(340px,1fr))}
figure svg{display:block;width:100%;height:auto;max-height:560px}
figure.wide svg{max-width:980px;margin:0 auto}
figcaption{color:var(--muted);font-size:12.5px;margin-top:6px}.dl{margin-left:6px}
details.layer{border-bottom:1px solid var(--line);padding:4px 0}
details.layer>summary{cursor:pointer;padding:2px 0}details.layer:target{background:#eef6fc}
details.layer[open]>summary{font-weight:600}
.facts p{margin:4px 0 4px 18px;color:var(--fg);font-size:13px}
svg.mini{display:block;width:100%;max-width:760px;height:auto;margin:4px 0 8px 18px}
svg.mini{font-size:10.5px;fill:#3a4350}svg.mini .an{fill:#5b6675;font-size:10px}
svg.defs{position:absolute;width:0;height:0;overflow:hidden}
table.plain,table.matrix{margin:6px 0 6px 18px;font-size:12.5px}
table.matrix td{text-align:center;min-width:56px}
table.plain th{text-align:right}table.plain th:first-child{text-align:left}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(520px,1fr));gap:0 16px}
.row{display:flex;flex-wrap:wrap;gap:8px 28px;align-items:flex-start}
.bar{display:flex;width:120px;height:12px;border-radius:3px;overflow:hidden;background:var(--soft)}
.bar span{display:block;height:100%}
.legend{margin:6px 0}.key{margin-right:14px;white-space:nowrap}
.dot{display:inline-block;width:10px;height:10px;border-radius:2px;margin-right:5px;vertical-align:-1px}
.swatch{display:inline-block;width:18px;height:0;border-top-width:2px;margin-right:5px;vertical-align:3px}
ul.headlines{margin:6px 0;padding-left:20px}
details.config table.kv th{text-align:left;color:var(--muted);font-weight:500;vertical-align:top}
details.config table.kv td{text-align:left;white-space:normal}
footer{max-width:1240px;margin:0 auto;padding:16px 32px 30px;color:var(--muted);font-size:12px;
border-top:1px solid var(--line)}
@media print{nav,.filter{display:none}details.layer{break-inside:avoid}}
"""

# Sorting: numbers by their exact value (data-v), text in natural order; empty cells last either way.
_SCRIPT = """
(function () {
  "use strict";
  function sortBy(table, th, column) {
    var dir = th.getAttribute("aria-sort") === "ascending" ? "descending" : "ascending";
    table.querySelectorAll("thead th").forEach(function (h) { h.removeAttribute("aria-sort"); });
    th.setAttribute("aria-sort", dir);
    var numeric = th.dataset.type === "num", sign = dir === "ascending" ? 1 : -1;
    var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
    function key(row) {
      var cell = row.cells[column];
      if (!cell) return null;
      if (numeric) { var v = cell.dataset.v; return v === undefined || v === "" ? null : parseFloat(v); }
      return cell.textContent.trim();
    }
    var keyed = rows.map(function (row, i) { return [key(row), i, row]; });
    keyed.sort(function (a, b) {
      if (a[0] === null || b[0] === null) return (a[0] === null) - (b[0] === null) || a[1] - b[1];
      var c = numeric ? a[0] - b[0] : a[0].localeCompare(b[0], undefined, {numeric: true});
      return c * sign || a[1] - b[1];
    });
    keyed.forEach(function (k) { body.appendChild(k[2]); });
  }
  document.querySelectorAll("table.sortable").forEach(function (table) {
    table.querySelectorAll("thead th").forEach(function (th, column) {
      th.addEventListener("click", function () { sortBy(table, th, column); });
      th.addEventListener("keydown", function (e) {
        if (e.key === "Enter" || e.key === " ") { e.preventDefault(); sortBy(table, th, column); }
      });
    });
  });
  document.querySelectorAll("input[data-filter]").forEach(function (input) {
    var table = document.getElementById(input.dataset.filter);
    var count = document.querySelector('[data-count="' + input.dataset.filter + '"]');
    input.addEventListener("input", function () {
      var words = input.value.toLowerCase().split(/\\s+/).filter(Boolean), shown = 0;
      Array.prototype.forEach.call(table.tBodies[0].rows, function (row) {
        var text = row.dataset.search || row.textContent.toLowerCase();
        var keep = words.every(function (w) { return text.indexOf(w) >= 0; });
        row.hidden = !keep; shown += keep;
      });
      count.textContent = shown + " of " + table.tBodies[0].rows.length + " rows";
    });
  });
  function openTarget() {
    var target = location.hash && document.getElementById(location.hash.slice(1));
    if (target && target.tagName === "DETAILS") target.open = true;
  }
  window.addEventListener("hashchange", openTarget);
  openTarget();
})();
"""
