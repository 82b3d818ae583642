"""The HTML report: one self-contained page (inline CSS, a small inline script, figures as inline SVG).

Nothing on the page is fetched: a Content-Security-Policy forbids every network request and allows only the
page's own script (by its SHA-256), so even a string that slipped past escaping could not run. Every string
that comes from a checkpoint goes through ``html.escape``. The page lays out the report model
(:func:`rankscope.report.build.build_report`); its style sheet and script are package data
(``assets/report.css``, ``assets/report.js``).
"""

from __future__ import annotations

import base64
import functools
import hashlib
from collections.abc import Mapping, Sequence
from importlib.resources import files
from typing import TYPE_CHECKING

from ... import __version__
from ..build import build_report
from ..definitions import definitions
from ..figure_specs import figure_specs
from ..model import FigureSpec, Report
from ..resize_base import DEFAULT_SUGGEST_RULE
from .page import (
    checkpoint_card,
    comparison_body,
    composition_block,
    detail,
    esc,
    figure,
    filter_box,
    math_text,
    table,
)
from .svg import frame_def, inline_svg, key_svg, layer_svg, marker_def

if TYPE_CHECKING:
    from ...analysis.comparison import Comparison
    from ...analysis.records import Analysis

# the names earlier versions had here
FigureSlot = FigureSpec
figure_slots = figure_specs


@functools.cache
def asset(name: str) -> str:
    """A file of ``rankscope/report/html/assets`` (installed as package data)."""
    return files(__package__).joinpath("assets", name).read_text(encoding="utf-8")


def _figures(
    report: Report,
    section: str,
    svgs: Mapping[str, str],
    numbers: Mapping[str, int],
    formats,
    checkpoint: int | None = None,
    cls: str = "figs",
) -> str:
    mine = [
        s
        for s in report.figures
        if s.section == section and s.id in svgs and (checkpoint is None or s.checkpoint == checkpoint)
    ]
    if not mine:
        return ""
    return f'<div class="{cls}">' + "".join(figure(s, svgs[s.id], numbers[s.id], formats) for s in mine) + "</div>"


def _composition_section(report: Report, svgs, numbers, formats) -> str:
    if not report.compositions:
        return ""
    several = len(report.analyses) > 1
    parts = [
        composition_block(view, several) + _figures(report, "composition", svgs, numbers, formats, view.checkpoint)
        for view in report.compositions
    ]
    return (
        '<section id="composition"><h2>Composition</h2><p class="hint">Each composed layer is Σ w_i·ΔW_i. Bars: '
        "each component's share of |w| and of the energy ‖w_iΔW_i‖² (what the weights do in fact); hover for "
        "values. Overlaps are means over pairs of components, against their random baseline.</p>"
        + "".join(parts)
        + "</section>"
    )


def _comparison_section(report: Report, svgs, numbers, formats) -> str:
    view = report.comparison_view
    if view is None:
        if report.no_comparison is None:
            return ""
        return f'<section id="comparison"><h2>Comparison</h2><p>{esc(report.no_comparison)}</p></section>'
    return (
        '<section id="comparison"><h2>Comparison</h2>'
        + comparison_body(view)
        + _figures(report, "comparison", svgs, numbers, formats)
        + "<h3>Matched layers</h3>"
        + filter_box("comparison-layers", "filter matched layers", len(view.layers.rows))
        + table(view.layers)
        + "</section>"
    )


def _layers_section(report: Report) -> str:
    several = len(report.analyses) > 1
    placeholder = "filter layers (name, module" + (", checkpoint" if several else "") + ")"
    return (
        '<section id="layers"><h2>Layers</h2><p class="hint">Click a header to sort, type to filter; a layer\'s '
        "name opens its spectrum below. 90% energy: the fewest singular values holding 90% of Σσ². Utilisation: "
        "erank / rank bound."
        + (
            f" Suggested r: the rank the rule {esc(report.suggestion_rule)} keeps (<code>rankscope suggest</code>)."
            if report.suggestion_rule is not None
            else ""
        )
        + (
            " Against the base (--base): ‖ΔW‖<sub>F</sub>/‖W₀‖<sub>F</sub>, σ₁(ΔW)/σ₁(W₀), the amplification "
            "factor and the intruder dimensions among the top k."
            if report.against_base
            else ""
        )
        + "</p>"
        + filter_box("layer-table", placeholder, len(report.layers.rows))
        + table(report.layers, anchors=report.anchors)
        + "</section>"
    )


def _details_section(report: Report, svgs, numbers, formats) -> str:
    several = len(report.analyses) > 1
    parts = [
        '<section id="detail"><h2>Per-layer detail</h2><p class="hint">First the spectra of each module type, '
        "a panel each (several checkpoints: the spectrum under Figures), then every layer: its singular values σᵢ "
        "(log scale; dashed: the thresholds τ and the rank bound) and its cumulative energy (dashed: the energy "
        "fractions).</p>"
    ]
    parts.append(_figures(report, "modules", svgs, numbers, formats, cls="figs small"))
    if several:
        keys = "".join(f'<span class="key">{key_svg(i)}{esc(label)}</span>' for i, label in enumerate(report.labels))
        parts.append(f'<p class="legend">{keys}</p>')
    module = None
    for item in report.details:
        if item.module != module:
            module = item.module
            count = len(report.modules[module])
            parts.append(f"<h3>{esc(module)} <small>{count} layer{'' if count == 1 else 's'}</small></h3>")
        parts.append(detail(item, several, report.thresholds, report.energies))
    frames = sorted({max(len(s.sigma) for s in item.series) for item in report.details if item.series})
    defs = "".join(marker_def(i) for i in range(len(report.labels)))
    defs += "".join(frame_def(n, report.energies) for n in frames)
    parts.insert(1, f'<svg class="defs" width="0" height="0" aria-hidden="true"><defs>{defs}</defs></svg>')
    return "".join(parts) + "</section>"


def _definitions_section(report: Report) -> str:
    items = "".join(f"<dt>{math_text(term)}</dt><dd>{math_text(text)}</dd>" for term, text in definitions(report))
    return f'<section id="definitions"><h2>Definitions</h2><dl class="definitions">{items}</dl></section>'


def render_page(
    report: Report,
    figures: Mapping[str, str] | None = None,
    *,
    figure_formats: Sequence[str] = (),
    companions: bool = False,
) -> str:
    """The report model as one HTML document (see :func:`report_html`)."""
    svgs = dict(figures or {})
    numbers = {spec.id: n for n, spec in enumerate(report.figures, 1)}
    formats = tuple(figure_formats)
    overview = _figures(report, "overview", svgs, numbers, formats)
    composition = _composition_section(report, svgs, numbers, formats)
    several = len(report.analyses) > 1
    nav = [
        ("summary", "Summary", True),
        ("figures", "Figures", bool(overview)),
        ("composition", "Composition", bool(composition)),
        ("comparison", "Comparison", report.comparison_view is not None or report.no_comparison is not None),
        ("layers", "Layers", True),
        ("detail", "Per-layer detail", True),
        ("definitions", "Definitions", True),
    ]
    body = [
        f"<header><h1>rankscope report <span>{esc(report.title)}</span></h1><nav>"
        + "".join(f'<a href="#{key}">{text}</a>' for key, text, present in nav if present)
        + "</nav></header><main>",
        '<section id="summary"><h2>Summary</h2><div class="cards">',
        "".join(checkpoint_card(view, several) for view in report.checkpoints),
        "</div>",
        *(table(view.modules) for view in report.checkpoints),
        "</section>",
        f'<section id="figures"><h2>Figures</h2>{overview}</section>' if overview else "",
        composition,
        _comparison_section(report, svgs, numbers, formats),
        _layers_section(report),
        _details_section(report, svgs, numbers, formats),
        _definitions_section(report),
    ]
    files_ = ""
    if companions:
        files_ = (
            ' · <a href="summary.json">summary.json</a> · <a href="layers.csv">layers.csv</a> · '
            '<a href="summary.md">summary.md</a>' + (" · figures/" if formats else "")
        )
    body.append(f"</main><footer>Written by rankscope {esc(__version__)}{files_}</footer>")
    return page_document(f"rankscope — {report.title}", "".join(body))


def report_html(
    analyses: Sequence[Analysis],
    labels: Sequence[str],
    comparison: Comparison | None = None,
    figures: Mapping[str, str] | None = None,
    *,
    figure_formats: Sequence[str] = (),
    companions: bool = False,
    suggest_rule: str | None = DEFAULT_SUGGEST_RULE,
) -> str:
    """The whole report as one HTML document.

    ``figures`` maps the ids of :func:`figure_specs` to SVG text (figures that are missing are left out).
    ``figure_formats`` links each figure's files under ``figures/``; ``companions`` links layers.csv,
    summary.json and summary.md (both for a report folder, not for a page on its own); ``suggest_rule`` the rank
    rule of the layers' suggested ranks and the resize figure (None or ``"none"``: neither).
    """
    report = build_report(analyses, labels, comparison, suggest_rule=suggest_rule)
    return render_page(report, figures, figure_formats=figure_formats, companions=companions)


def page_document(title: str, body: str) -> str:
    """The self-contained page: ``body`` in the shell with the report's CSS and script (by hash; nothing fetched)."""
    script = asset("report.js")
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
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
        f'<meta name="generator" content="rankscope {esc(__version__)}">'
        f"<title>{esc(title)}</title><style>{asset('report.css')}</style></head>"
        f"<body>{body}<script>{script}</script></body></html>\n"
    )


__all__ = [
    "FigureSlot",
    "asset",
    "figure_slots",
    "inline_svg",
    "layer_svg",
    "page_document",
    "render_page",
    "report_html",
]
