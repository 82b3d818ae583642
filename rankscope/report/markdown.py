"""Markdown tables that paste into a paper draft or a GitHub comment (strings from checkpoints escaped)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from ..analysis.scaling import scaling_text
from ..measures.metrics import parameter_key
from .model import Note, Table
from .model import number as _fmt
from .tables import alignment_summary, comparison_module_table, module_table

if TYPE_CHECKING:
    from ..analysis.comparison import Comparison
    from ..analysis.records import Analysis

_MARKDOWN_SPECIAL = str.maketrans({c: f"\\{c}" for c in "\\`*_[]<>|~"})


def escape(text: object) -> str:
    """Checkpoint-provided text as literal Markdown: no emphasis, links, code, HTML or table breaks; one line."""
    flat = " ".join(str(text).split()).translate(_MARKDOWN_SPECIAL)
    return "\\" + flat if flat[:1] in ("#", "-", "+", "=") else flat


def _table(header: list[str], rows: list[list[str]], right_from: int = 1) -> str:
    align = ["---" if i < right_from else "---:" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def render(table: Table) -> str:
    """A report-model table in Markdown: checkpoint text escaped, the overall row in bold, empty rows left out."""
    header = [column.short or column.title for column in table.columns]
    rows = [
        [("**all**" if row.total and i == 0 else escape(cell.text)) for i, cell in enumerate(row.cells)]
        for row in table.rows
        if not row.empty
    ]
    return _table(header, rows, right_from=sum(not column.numeric for column in table.columns))


def spectrum_markdown(analysis: Analysis, suggested: Mapping[str, int] | None = None, rule: str | None = None) -> str:
    """The checkpoint's summary by module type, then every layer; ``suggested`` (layer → rank under ``rule``, the
    report's) adds a suggested-rank column, layers measured against ``--base`` the relative update and intruders."""
    ckpt = analysis.checkpoint
    tau = analysis.options.thresholds[0]
    summary = analysis.summary()
    scaled = scaling_text(analysis, markdown=True)
    lines = [
        f"## {escape(ckpt.path.name or ckpt.path)} — {escape(ckpt.adapter_type)}",
        "",
        f"{summary['valid_layers']}/{summary['layers']} layers, {ckpt.params:,} adapter parameters; singular values "
        f"of {scaled}."
        + (
            f" **{summary['not_analysed_modules']} module(s) with adapter weights are not analysed.**"
            if summary["not_analysed_modules"]
            else ""
        ),
        "",
    ]
    lines += [render(module_table(analysis)), "", "<details><summary>Every layer</summary>", ""]
    layer_rows = []
    base = any(record.base is not None for record in analysis.layers)
    for record in analysis.layers:
        m = record.metrics
        extra = ([_fmt(suggested.get(record.name), "d")] if suggested is not None else []) + (
            _base_cells(record.base) if base else []
        )
        if m is None:
            layer_rows.append([escape(record.name), "invalid", "", "", "", "", "", *extra])
            continue
        layer_rows.append(
            [
                escape(record.name),
                str(record.rank_bound),
                str(m["count_above"][parameter_key(tau)]),
                _fmt(m["energy"], ".4g"),
                _fmt(m["erank"], ".2f"),
                _fmt(m["stable_rank"], ".2f"),
                _fmt(m["utilization"], ".0%"),
                *extra,
            ]
        )
    header = ["layer", "r≤", f"#σ>{tau:g}", "Σσ²", "erank", "stable rank", "utilisation"]
    header += [f"suggested r ({escape(rule)})"] if suggested is not None else []
    header += ["‖ΔW‖/‖W₀‖", "intruders"] if base else []
    lines += [_table(header, layer_rows), "", "</details>", ""]
    return "\n".join(lines)


def _base_cells(base: dict | None) -> list[str]:
    """A layer's relative update and intruder count (of the top k) against its base weight; — where not measured."""
    intruders = (base or {}).get("intruders")
    found = f"{intruders['count']}/{intruders['top_k']}" if intruders is not None else "—"
    return [_fmt((base or {}).get("relative_update"), ".3g"), found]


def notes_markdown(notes: Sequence[Note], labels: Sequence[str]) -> str:
    """The report's warnings and notes as a list, each prefixed with its checkpoint's label where there are
    several; empty when there are none."""
    if not notes:
        return ""
    lines = ["## Notes", ""]
    for n in notes:
        about = f"**{escape(labels[n.checkpoint])}**: " if len(labels) > 1 and n.checkpoint is not None else ""
        text = f"layer {escape(n.layer)} is invalid: {escape(n.text)}" if n.level == "invalid" else escape(n.text)
        lines.append(f"- {about}{'⚠ ' if n.level != 'note' else ''}{text}")
    return "\n".join([*lines, ""])


def comparison_markdown(comparison: Comparison) -> str:
    """Per module type and overall, each label's means side by side, ratios to the first, and the headlines."""
    summary = comparison.summary()
    labels = comparison.labels
    lines = [f"## Comparison: {', '.join(escape(label) for label in labels)}", ""]
    lines += [f"- {escape(line)}" for line in summary["headlines"]] + [""]
    lines += [render(comparison_module_table(comparison)), ""]
    a = alignment_summary(summary["alignment"])
    if a is not None:
        lines.append(
            f"Alignment across checkpoints (mean over layers and pairs): update cosine {a['mean_cosine']}; "
            f"left-subspace overlap {a['mean_left_overlap']} (random {a['mean_left_baseline']}); "
            f"right-subspace overlap {a['mean_right_overlap']} (random {a['mean_right_baseline']})."
        )
        lines.append("")
    return "\n".join(lines)
