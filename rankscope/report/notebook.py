"""What a notebook shows for an ``Analysis`` or a ``Comparison`` (their ``_repr_html_``): a line saying what it is,
the table by module type, the first warnings, and for an analysis a small inline spectrum figure — a few KB of
tables plus one SVG, never the records themselves; nothing is fetched."""

from __future__ import annotations

import html
import itertools
from typing import TYPE_CHECKING

from ..analysis.scaling import scaling_text
from .model import Table
from .tables import comparison_module_table, module_table

if TYPE_CHECKING:
    from ..analysis.comparison import Comparison
    from ..analysis.records import Analysis

MAX_FIGURE = 100_000  # characters of inline SVG; a larger figure is left out (the report has it)
MAX_WARNINGS = 3
_ids = itertools.count(1)  # each displayed figure's SVG ids get their own prefix: outputs share one page
_STYLE = "border-collapse:collapse;font-size:12px"
_LEFT = ' style="text-align:left"'  # numbers keep the notebook's own (right) alignment


def esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def table_html(table: Table) -> str:
    """A report-model table as a plain HTML table (text left, numbers right, the overall row in bold)."""
    head = "".join(f"<th{'' if c.numeric else _LEFT}>{esc(c.short or c.title)}</th>" for c in table.columns)
    rows = []
    for row in table.rows:
        cells = "".join(f"<td{'' if cell.numeric else _LEFT}>{esc(cell.text)}</td>" for cell in row.cells)
        rows.append(f'<tr style="font-weight:bold">{cells}</tr>' if row.total else f"<tr>{cells}</tr>")
    return f'<table style="{_STYLE}"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def _warnings(messages: list[str]) -> str:
    shown = [f"<li>{esc(m)}</li>" for m in messages[:MAX_WARNINGS]]
    if len(messages) > MAX_WARNINGS:
        shown.append(f"<li>… and {len(messages) - MAX_WARNINGS} more</li>")
    return f'<ul style="color:#a33">{"".join(shown)}</ul>' if shown else ""


def spectrum_svg(analysis: Analysis, label: str) -> str:
    """The checkpoint's spectrum figure as inline SVG (empty when it cannot be drawn or is too large)."""
    from ..figures import spectrum_figure, svg_text
    from .html.svg import inline_svg

    try:
        svg = svg_text(spectrum_figure([analysis], [label]))
    except Exception:  # a display is no place for a drawing error: the tables stand alone
        return ""
    if len(svg) > MAX_FIGURE:
        return ""
    return inline_svg(svg, f"rs{next(_ids)}-", f"Singular values of {label}")


def analysis_html(analysis: Analysis, *, figure: bool = True) -> str:
    """A summary line, the table by module type, the first warnings and (``figure``) the spectrum figure."""
    ckpt = analysis.checkpoint
    summary = analysis.summary()
    label = ckpt.path.name or str(ckpt.path)
    scaling = scaling_text(analysis)
    head = (
        f"<p><b>Analysis</b> of <code>{esc(ckpt.path)}</code> · {esc(ckpt.adapter_type)} ({esc(ckpt.family)}) · "
        f"{summary['valid_layers']}/{summary['layers']} layers · {ckpt.params:,} parameters · singular values "
        f"of {esc(scaling)}</p>"
    )
    parts = [head, table_html(module_table(analysis)), _warnings([*ckpt.warnings, *analysis.warnings])]
    if figure:
        parts.append(spectrum_svg(analysis, label))
    return f"<div>{''.join(parts)}</div>"


def comparison_html(comparison: Comparison) -> str:
    """The labels and matched layers, the means by module type per checkpoint, the headlines and warnings."""
    summary = comparison.summary()
    unmatched = sum(len(names) for names in comparison.unmatched.values())
    head = (
        f"<p><b>Comparison</b> of {', '.join(f'<code>{esc(label)}</code>' for label in comparison.labels)} · "
        f"{len(comparison.layers)} matched layers · {unmatched} unmatched · ratios to "
        f"<code>{esc(comparison.labels[0])}</code></p>"
    )
    headlines = "".join(f"<li>{esc(line)}</li>" for line in summary["headlines"])
    return (
        f"<div>{head}{table_html(comparison_module_table(comparison))}<ul>{headlines}</ul>"
        f"{_warnings(comparison.warnings)}</div>"
    )


__all__ = ["analysis_html", "comparison_html", "table_html"]
