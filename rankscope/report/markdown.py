"""Markdown tables that paste into a paper draft or a GitHub comment (strings from checkpoints escaped)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..measures.metrics import parameter_key

if TYPE_CHECKING:
    from ..analysis.analyze import Analysis
    from ..analysis.comparison import Comparison

_MARKDOWN_SPECIAL = str.maketrans({c: f"\\{c}" for c in "\\`*_[]<>|~"})


def escape(text: object) -> str:
    """Checkpoint-provided text as literal Markdown: no emphasis, links, code, HTML or table breaks; one line."""
    flat = " ".join(str(text).split()).translate(_MARKDOWN_SPECIAL)
    return "\\" + flat if flat[:1] in ("#", "-", "+", "=") else flat


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def _table(header: list[str], rows: list[list[str]], right_from: int = 1) -> str:
    align = ["---" if i < right_from else "---:" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def spectrum_markdown(analysis: Analysis) -> str:
    """The checkpoint's summary by module type, then every layer."""
    ckpt = analysis.checkpoint
    tau = analysis.options.thresholds[0]
    key = f"count_above[{parameter_key(tau)}]"
    summary = analysis.summary()
    scaled = "B·A without α/r (`--unscaled`)" if analysis.options.unscaled else "the scaled update ΔW (α/r applied)"
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
    rows = []
    for name, block in [*summary["by_module"].items(), ("all", summary)]:
        stats = block["metrics"]
        if not stats:
            continue
        rows.append(
            [
                escape(name) if name != "all" else "**all**",
                str(block["layers"]),
                f"{block['params']:,}",
                _fmt(stats[key]["mean"], ".2f"),
                _fmt(stats["energy"]["mean"], ".4g"),
                _fmt(stats["erank"]["mean"], ".2f"),
                _fmt(stats["stable_rank"]["mean"], ".2f"),
                _fmt(stats["utilization"]["mean"], ".0%"),
            ]
        )
    header = ["module", "layers", "params", f"#σ>{tau:g}", "Σσ²", "erank", "stable rank", "utilisation"]
    lines += [_table(header, rows), "", "<details><summary>Every layer</summary>", ""]
    layer_rows = []
    for record in analysis.layers:
        m = record.metrics
        if m is None:
            layer_rows.append([escape(record.name), "invalid", "", "", "", "", ""])
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
            ]
        )
    header = ["layer", "r≤", f"#σ>{tau:g}", "Σσ²", "erank", "stable rank", "utilisation"]
    lines += [_table(header, layer_rows), "", "</details>", ""]
    return "\n".join(lines)


def comparison_markdown(comparison: Comparison) -> str:
    """Per module type and overall, each label's means side by side, ratios to the first, and the headlines."""
    summary = comparison.summary()
    tau = comparison.threshold
    labels = comparison.labels
    lines = [f"## Comparison: {', '.join(escape(label) for label in labels)}", ""]
    lines += [f"- {escape(line)}" for line in summary["headlines"]] + [""]
    header = ["module", "checkpoint", "params", f"#σ>{tau:g}", "Σσ²", "erank", "stable rank", "utilisation",
              "erank / 1k params"]  # fmt: skip
    rows = []
    for name, block in [*summary["by_module"].items(), ("all", summary)]:
        for label in labels:
            values = block["per_label"][label]
            rows.append(
                [
                    escape(name) if name != "all" else "**all**",
                    escape(label),
                    f"{values['params']:,}",
                    _fmt(values["mean_count_above"], ".2f"),
                    _fmt(values["mean_energy"], ".4g"),
                    _fmt(values["mean_erank"], ".2f"),
                    _fmt(values["mean_stable_rank"], ".2f"),
                    _fmt(values["mean_utilization"], ".0%"),
                    _fmt(values["mean_erank_per_kparam"], ".3g"),
                ]
            )
    lines += [_table(header, rows, right_from=2), ""]
    alignment = summary["alignment"]
    if alignment["mean_left_overlap"] is not None:
        a = {key: _fmt(value, ".3f") for key, value in alignment.items()}
        lines.append(
            f"Alignment across checkpoints (mean over layers and pairs): update cosine {a['mean_cosine']}; "
            f"left-subspace overlap {a['mean_left_overlap']} (random {a['mean_left_baseline']}); "
            f"right-subspace overlap {a['mean_right_overlap']} (random {a['mean_right_baseline']})."
        )
        lines.append("")
    return "\n".join(lines)
