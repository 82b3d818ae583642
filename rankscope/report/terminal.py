"""Plain-text renderings for the terminal: the per-layer table and the checkpoint summary."""

from __future__ import annotations

import textwrap
from typing import TYPE_CHECKING

from ..analysis.scaling import scaling_text
from ..measures.metrics import parameter_key
from .model import Table
from .model import number as _number
from .tables import (
    alignment_summary,
    by_module_blocks,
    comparison_layer_table,
    comparison_long_table,
    comparison_module_table,
    mean_alignment,
)

if TYPE_CHECKING:
    from ..analysis.comparison import Comparison
    from ..analysis.records import Analysis, LayerRecord


def _table(header: list[str], rows: list[list[str]], left_aligned: int = 1, width: int | None = None) -> str:
    """Aligned columns, text (the first ``left_aligned``) left, numbers right. ``width``: no line wider — the
    numeric columns are wrapped into several tables, each repeating the text columns (shortened with "…" where
    they alone would take most of the width)."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    if width is not None and sum(widths) + 2 * (len(widths) - 1) > width:
        return _wrapped(header, rows, left_aligned, widths, width)

    def line(cells: list[str]) -> str:
        return "  ".join(
            cell.ljust(width) if i < left_aligned else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    rule = "  ".join("─" * w for w in widths)
    return "\n".join([line(header), rule, *(line(row) for row in rows)])


def _shorten(text: str, width: int) -> str:
    """A name cut to ``width`` from the left (its end tells layers apart)."""
    return text if len(text) <= width else "…" + text[len(text) - width + 1 :]


def _wrapped(header: list[str], rows: list[list[str]], left: int, widths: list[int], width: int) -> str:
    numeric = sum(widths[left:]) + 2 * (len(widths) - left - 1)
    fits = width - numeric >= 10 * left  # shortened names make room for every number in one table
    text_budget = width - numeric if fits else max(10 * left, width // 2)  # (the text columns with their gaps)
    text_widths = widths[:left]
    while sum(text_widths) + 2 * left > text_budget and max(text_widths) > 8:  # the widest text column gives
        widest = text_widths.index(max(text_widths))
        text_widths[widest] -= 1
    cut = [[_shorten(cell, w) for cell, w in zip(row[:left], text_widths, strict=True)] for row in [header, *rows]]
    room = width - sum(text_widths) - 2 * left
    parts, chunk, used = [], [], 0
    for i in range(left, len(header)):
        if chunk and used + widths[i] > room:
            parts.append(chunk)
            chunk, used = [], 0
        chunk.append(i)
        used += widths[i] + 2
    parts.append(chunk)
    tables = []
    for chunk in parts:
        sub = [cut[r] + [row[i] for i in chunk] for r, row in enumerate([header, *rows])]
        tables.append(_table(sub[0], sub[1:], left))
    return "\n\n".join(tables)


def render(table: Table, width: int | None = None) -> str:
    """A report-model table as aligned text: text columns left, numbers right (text columns come first); no line
    wider than ``width`` (see :func:`_table`)."""
    left = sum(not column.numeric for column in table.columns)
    header = [column.short or column.title for column in table.columns]
    return _table(header, [[cell.text for cell in row.cells] for row in table.rows], left_aligned=left, width=width)


def _threshold(analysis: Analysis) -> float:
    return analysis.options.thresholds[0]


def _row(record: LayerRecord, taus: tuple[float, ...]) -> list[str]:
    shape = "×".join(map(str, record.matrix_shape)) if record.matrix_shape else "?"
    if not record.valid:
        return [record.name, shape, str(record.rank_bound or "—"), "invalid", *[""] * (len(taus) + 4)]
    m = record.metrics or {}
    return [
        record.name,
        shape,
        str(record.rank_bound),
        _number(m["sigma_max"], ".4g"),
        _number(m["frobenius"], ".4g"),
        *(_number(m["count_above"][parameter_key(tau)], "d") for tau in taus),
        _number(m["erank"], ".2f"),
        _number(m["stable_rank"], ".2f"),
        _number(m["utilization"], ".0%"),
    ]


def spectrum_table(analysis: Analysis) -> str:
    """One row per layer: name, shape, rank bound, σ₁, ‖ΔW‖_F, the count above each τ, erank, stable rank,
    utilization."""
    taus = analysis.options.thresholds
    header = ["layer", "m×n", "r≤", "σ₁", "‖ΔW‖_F", *(f"#σ>{tau:g}" for tau in taus), "erank", "stable", "util"]
    rows = [_row(r, taus) for r in analysis.layers]
    if any(r.base is not None for r in analysis.layers):  # measured against --base: relative size, intruders
        header += ["‖ΔW‖/‖W₀‖", "intruders"]
        for row, record in zip(rows, analysis.layers, strict=True):
            row += _base_cells(record.base)
    return _table(header, rows)


def _base_cells(base: dict | None) -> list[str]:
    if base is None:
        return ["", ""]
    intruders = base["intruders"]
    found = f"{intruders['count']}/{intruders['top_k']}" if intruders is not None else "—"
    return [_number(base["relative_update"], ".3g"), found]


def spectrum_summary(analysis: Analysis) -> str:
    """The checkpoint in a few lines, then mean/min/max of the main metrics by module type."""
    ckpt, options = analysis.checkpoint, analysis.options
    summary = analysis.summary()
    tau_key = f"count_above[{parameter_key(_threshold(analysis))}]"
    inexact = [r for r in analysis.layers if r.valid and not r.exact]
    missing = summary["not_analysed_modules"]
    full = ckpt.family == "full-delta"
    what = f"singular values of {scaling_text(analysis)}"
    lines = [
        f"{ckpt.path}  ·  {ckpt.adapter_type} ({ckpt.family})  ·  {summary['valid_layers']}/{summary['layers']} "
        f"layers  ·  {ckpt.params:,} {'parameters compared' if full else 'adapter parameters'}"
        + (f"  ·  {missing} module(s) NOT analysed (see the warning)" if missing else ""),
        what + (f"; {len(inexact)} layer(s) NOT exact ({_why_inexact(options)})" if inexact else "; exact"),
    ]
    header = ["module", "layers", "params", f"#σ>{_threshold(analysis):g} mean", "erank mean [min–max]", "util mean"]
    rows = []
    for name, block, _ in by_module_blocks(summary):
        stats = block["metrics"]
        if not stats:
            rows.append([name, str(block["layers"]), f"{block['params']:,}", "—", "—", "—"])
            continue
        erank = stats["erank"]
        rows.append(
            [
                name,
                str(block["layers"]),
                f"{block['params']:,}",
                _number(stats[tau_key]["mean"], ".1f"),
                f"{_number(erank['mean'], '.2f')} [{_number(erank['min'], '.2f')}–{_number(erank['max'], '.2f')}]",
                _number(stats["utilization"]["mean"], ".0%"),
            ]
        )
    text = "\n".join(lines) + "\n\n" + _table(header, rows)
    valid = [r for r in analysis.layers if r.valid]
    whole = [r for r in valid if (r.metrics or {}).get("erank") is not None]
    if len(whole) < len(valid):  # a truncated spectrum (--top-k) has no erank, no count above τ, no utilisation
        text += (
            f"\n#σ>, erank and util: over the {len(whole)} of {len(valid)} layers with a whole spectrum "
            "(the others' are truncated: --top-k)"
        )
    return text


def _why_inexact(options) -> str:
    return "dense float32" if options.dense and options.dense_dtype != "float64" else "see the warnings"


def _share(value: float | None) -> str:
    return "—" if value is None else f"{value:.0%}"


def composition_summary(analysis: Analysis) -> str:
    """For composed checkpoints: collapse, effective components, overlap vs baseline and rank gain per module."""
    stats = analysis.summary().get("composition")
    if not stats:
        return ""
    header = ["module", "composed", "collapsed", "eff. comps", "gain", "overlap L (base)", "overlap R (base)"]
    rows = []
    for name, block, _ in by_module_blocks(stats):
        if not block["layers"]:
            continue
        rows.append(
            [
                name,
                str(block["layers"]),
                str(block["collapsed"]),
                _number(block["mean_effective_components"], ".2f") + f"/{_number(block['mean_components'], '.3g')}",
                _number(block["mean_rank_gain"], ".2f") + "×",
                f"{_number(block['mean_left_overlap'], '.3f')} ({_number(block['mean_left_baseline'], '.3f')})",
                f"{_number(block['mean_right_overlap'], '.3f')} ({_number(block['mean_right_baseline'], '.3f')})",
            ]
        )
    title = "composition: effective components = 1/Σp² of the energy shares; overlap = mean pairwise projection overlap"
    return title + "\n\n" + _table(header, rows)


def components_table(analysis: Analysis) -> str:
    """One block per composed layer: each component's weight, energy share and ranks, then the layer's totals."""
    tau = _threshold(analysis)
    key = parameter_key(tau)
    header = ["layer / component", "weight", "energy", f"#σ>{tau:g}", "erank", "r≤", "overlap L", "overlap R"]
    rows: list[list[str]] = []
    for record in analysis.layers:
        if record.components is None:
            continue
        fields = record.composition or {}
        weights = (fields.get("weights") or {}).get("normalized") or [None] * len(record.components)
        shares = (fields.get("energy_shares") or {}).get("values") or [None] * len(record.components)
        flag = "  COLLAPSED" if fields.get("collapsed") else ""
        metrics = record.metrics or {}
        gain = fields.get("rank_gain")
        rows.append(
            [
                record.name + flag,
                "",
                "",
                str(metrics.get("count_above", {}).get(key, "—")),
                _number(metrics.get("erank"), ".2f") + (f" ({gain:.2f}×)" if gain else ""),
                str(record.rank_bound),
                _number(mean_alignment(record.alignment)["left_overlap"], ".3f"),
                _number(mean_alignment(record.alignment)["right_overlap"], ".3f"),
            ]
        )
        for component, weight, share in zip(record.components, weights, shares, strict=True):
            m = component.metrics or {}
            rows.append(
                [
                    f"  {component.name}",
                    _number(weight, ".3g"),
                    _share(share),
                    str(m.get("count_above", {}).get(key, "—")),
                    _number(m.get("erank"), ".2f"),
                    str(component.rank_bound),
                    "",
                    "",
                ]
            )
    return _table(header, rows) if rows else "no composed layers in this checkpoint"


def comparison_table(comparison: Comparison, width: int | None = None) -> str:
    """One row per matched layer: each checkpoint's count above τ, erank and utilisation, then the alignment (and,
    with a base, each checkpoint's ‖ΔW‖/‖W₀‖ and intruder count). Where that is wider than ``width`` (many
    checkpoints), one row per layer and checkpoint instead."""
    wide = render(comparison_layer_table(comparison))
    if width is None or _widest(wide) <= width:
        return wide
    return render(comparison_long_table(comparison), width)


def _widest(text: str) -> int:
    return max((len(line) for line in text.splitlines()), default=0)


def _fit(lines: list[str], width: int | None) -> list[str]:
    """Sentences wrapped to ``width`` (continuations indented)."""
    if width is None:
        return lines
    return [wrapped for line in lines for wrapped in textwrap.wrap(line, width, subsequent_indent="  ") or [""]]


def comparison_summary(comparison: Comparison, width: int | None = None) -> str:
    """Means per module type and checkpoint, then the headlines and the unmatched layers (no line wider than
    ``width``)."""
    summary = comparison.summary()
    parts = [render(comparison_module_table(comparison), width), ""]
    lines = list(summary["headlines"])
    a = alignment_summary(summary["alignment"])
    if a is not None:
        lines.append(
            f"alignment across checkpoints: cosine {a['mean_cosine']}, overlap left {a['mean_left_overlap']} "
            f"(random {a['mean_left_baseline']}), right {a['mean_right_overlap']} (random {a['mean_right_baseline']})"
        )
    for label, names in comparison.unmatched.items():
        lines.append(f"only in {label}: {len(names)} layers ({', '.join(names[:3])}{', …' if len(names) > 3 else ''})")
    return "\n".join(parts + _fit(lines, width))
