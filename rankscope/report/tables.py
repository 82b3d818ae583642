"""The tables several outputs show (terminal, Markdown, HTML): built here once from the records, as
:class:`~rankscope.report.model.Table` data; each renderer only lays them out."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..measures.components import off_diagonal_mean
from ..measures.metrics import parameter_key
from .model import Cell, Column, Row, Table

if TYPE_CHECKING:
    from ..analysis.comparison import Comparison
    from ..analysis.records import Analysis, LayerRecord

ALIGNMENT_KEYS = ("cosine", "left_overlap", "right_overlap")


def mean_alignment(alignment: dict | None) -> dict[str, float | None]:
    """The mean off-diagonal update cosine and left/right subspace overlaps of a k×k alignment (None without one)."""
    return {key: off_diagonal_mean(alignment[key]) if alignment else None for key in ALIGNMENT_KEYS}


def _mean_columns(tau: float) -> list[Column]:
    """The means every summary table shows: count above τ, Σσ², erank, stable rank, utilisation."""
    titles = ((f"#σ>{tau:g}"), "Σσ²", "erank", "stable rank", "utilisation")
    return [Column(f"mean {title}", short=title) for title in titles]


def alignment_summary(alignment: dict) -> dict[str, str] | None:
    """A comparison's mean alignment (``summary()["alignment"]``) to 3 decimals; None when nothing was aligned."""
    if alignment["mean_left_overlap"] is None:
        return None
    return {key: Cell(value, ".3f").text for key, value in alignment.items()}


def _stat(block: dict, key: str) -> float | None:
    entry = block["metrics"].get(key)
    return entry["mean"] if entry else None


def by_module_blocks(summary: dict) -> list[tuple[str, dict, bool]]:
    """A summary's per-module blocks (in the model's order already), then the overall one: (name, block, total)."""
    return [*((name, block, False) for name, block in summary["by_module"].items()), ("all", summary, True)]


def module_table(analysis: Analysis, table_id: str = "modules", caption: str = "") -> Table:
    """Means of the main metrics by module type, then over all layers."""
    summary = analysis.summary()
    tau = analysis.options.thresholds[0]
    key = f"count_above[{parameter_key(tau)}]"
    columns = [
        Column("module", numeric=False),
        Column("layers"),
        Column("params"),
        *_mean_columns(tau),
    ]
    rows = [
        Row(
            [
                Cell(name),
                Cell(block["layers"], "d"),
                Cell(block["params"], ","),
                Cell(_stat(block, key), ".2f"),
                Cell(_stat(block, "energy"), ".4g"),
                Cell(_stat(block, "erank"), ".2f"),
                Cell(_stat(block, "stable_rank"), ".2f"),
                Cell(_stat(block, "utilization"), ".0%"),
            ],
            total=total,
            empty=not block["metrics"],
        )
        for name, block, total in by_module_blocks(summary)
    ]
    return Table(table_id, columns, rows, caption)


def comparison_module_table(comparison: Comparison) -> Table:
    """Per module type and overall, each checkpoint's means side by side."""
    summary = comparison.summary()
    tau = comparison.threshold
    base = comparison.against_base
    columns = [
        Column("module", numeric=False),
        Column("checkpoint", numeric=False),
        Column("params"),
        *_mean_columns(tau),
        Column("erank per 1k params", short="erank / 1k params"),
        *([Column("mean ‖ΔW‖/‖W₀‖", short="ΔW/W₀"), Column("mean intruders", short="intr.")] if base else []),
    ]
    specs = _COMPARED_SPECS + (_BASE_MEAN_SPECS if base else ())
    rows = []
    for name, block, total in by_module_blocks(summary):
        for label in comparison.labels:
            v = block["per_label"][label]
            cells = [Cell(name), Cell(label), Cell(v["params"], ",")]
            cells += [Cell(v[f"mean_{key}"], spec) for key, spec in specs]
            rows.append(Row(cells, total=total))
    return Table("comparison-modules", columns, rows, "Means by module type")


_COMPARED_SPECS = (
    ("count_above", ".2f"),
    ("energy", ".4g"),
    ("erank", ".2f"),
    ("stable_rank", ".2f"),
    ("utilization", ".0%"),
    ("erank_per_kparam", ".3g"),
)
_BASE_MEAN_SPECS = (("relative_update", ".3g"), ("intruder_count", ".2f"))  # with --base only
_BASE_TITLES = ("ΔW/W₀", "intr.")  # a record's ‖ΔW‖_F/‖W₀‖_F and intruder count, with --base only


def _base_cells(comparison: Comparison, record: LayerRecord) -> list[Cell]:
    """A record's ‖ΔW‖_F/‖W₀‖_F and intruder count (— where it was not measured against the base)."""
    values = comparison.values(record)
    return [Cell(values["relative_update"], ".3g"), Cell(values["intruder_count"], "d")]


def comparison_layer_table(comparison: Comparison) -> Table:
    """One row per matched layer: each checkpoint's count above τ, erank and utilisation, then the alignment;
    with a base, each checkpoint's ‖ΔW‖/‖W₀‖ and intruder count after it."""
    tau = comparison.threshold
    base = comparison.against_base
    columns = [Column("layer", numeric=False)]
    for label in comparison.labels:
        columns += [Column(f"{label} #σ>{tau:g}"), Column(f"{label} erank"), Column(f"{label} util")]
    columns += [Column("cos"), Column("overlap L"), Column("overlap R")]
    if base:
        columns += [Column(f"{label} {title}") for label in comparison.labels for title in _BASE_TITLES]
    rows = []
    for layer in comparison.layers:
        cells = [Cell(layer.name)]
        for record in layer.records:
            values = comparison.values(record)
            cells += [
                Cell(values["count_above"], "d"),
                Cell(values["erank"], ".2f"),
                Cell(values["utilization"], ".0%"),
            ]
        cells += [Cell(value, ".3f") for value in mean_alignment(layer.alignment).values()]
        if base:
            cells += [cell for record in layer.records for cell in _base_cells(comparison, record)]
        rows.append(Row(cells, layer=layer.name, search=layer.name.lower()))
    return Table("comparison-layers", columns, rows)


def comparison_long_table(comparison: Comparison) -> Table:
    """The layer comparison one row per (layer, checkpoint) — as narrow for a dozen checkpoints as for two: the
    layer's name and its alignment on its first row; with a base, each row's ‖ΔW‖/‖W₀‖ and intruder count."""
    tau = comparison.threshold
    base = comparison.against_base
    columns = [Column("layer", numeric=False), Column("checkpoint", numeric=False), Column(f"#σ>{tau:g}")]
    columns += [Column("erank"), Column("util"), Column("cos"), Column("overlap L"), Column("overlap R")]
    columns += [Column(title) for title in _BASE_TITLES] if base else []
    rows = []
    for layer in comparison.layers:
        alignment = [Cell(value, ".3f") for value in mean_alignment(layer.alignment).values()]
        for index, (label, record) in enumerate(zip(comparison.labels, layer.records, strict=True)):
            values = comparison.values(record)
            cells = [Cell(layer.name if index == 0 else ""), Cell(label), Cell(values["count_above"], "d")]
            cells += [Cell(values["erank"], ".2f"), Cell(values["utilization"], ".0%")]
            cells += alignment if index == 0 else [Cell("")] * len(alignment)
            cells += _base_cells(comparison, record) if base else []
            rows.append(Row(cells, layer=layer.name, search=layer.name.lower()))
    return Table("comparison-layers-long", columns, rows)


def components_table(record: LayerRecord) -> Table:
    """A composed layer's components: weight, energy share, rank bound, erank, σ₁."""
    fields = record.composition or {}
    components = record.components or []
    weights = (fields.get("weights") or {}).get("normalized") or [None] * len(components)
    shares = (fields.get("energy_shares") or {}).get("values") or [None] * len(components)
    columns = [
        Column("component", numeric=False),
        Column("weight"),
        Column("energy share"),
        Column("r≤"),
        Column("erank"),
        Column("σ₁"),
    ]
    rows = [
        Row(
            [
                Cell(c.name),
                Cell(w, ".3g"),
                Cell(s, ".1%"),
                Cell(c.rank_bound, "d"),
                Cell((c.metrics or {}).get("erank"), ".2f"),
                Cell((c.metrics or {}).get("sigma_max"), ".4g"),
            ]
        )
        for c, w, s in zip(components, weights, shares, strict=True)
    ]
    return Table("components", columns, rows, "Components")


__all__ = [
    "alignment_summary",
    "by_module_blocks",
    "comparison_layer_table",
    "comparison_long_table",
    "comparison_module_table",
    "components_table",
    "mean_alignment",
    "module_table",
]
