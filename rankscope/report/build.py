"""From records to the report model: :func:`build_report` decides, once, what a report shows — the checkpoint cards,
the tables, which figures exist (``figure_specs``), the per-layer details and the notes — and every renderer
(the HTML page, the report folder's figure files) reads that."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..analysis.scaling import scaling_text
from ..figures._common import significant
from ..measures.metrics import parameter_key
from .figure_specs import composed, figure_specs
from .model import (
    Cell,
    CheckpointView,
    ComparisonView,
    CompositionView,
    Kpi,
    LayerDetail,
    LayerEntry,
    Note,
    Report,
    SeriesView,
    Shares,
    cumulative_energy,
    layer_names_by_module,
)
from .resize_base import (
    DEFAULT_SUGGEST_RULE,
    extra_cells,
    extra_columns,
    measured_against_base,
    suggested_ranks,
    suggestion_rule,
)
from .tables import (
    Column,
    Row,
    Table,
    by_module_blocks,
    comparison_layer_table,
    comparison_module_table,
    components_table,
    mean_alignment,
    module_table,
)

if TYPE_CHECKING:
    from ..analysis.comparison import Comparison
    from ..analysis.records import Analysis, LayerRecord


# -- checkpoint cards ---------------------------------------------------------------------------------------
def _stat(block: dict, key: str) -> float | None:
    entry = block["metrics"].get(key)
    return entry["mean"] if entry else None


def _bounds(analysis: Analysis) -> str:
    bounds = sorted({r.rank_bound for r in analysis.layers if r.valid})
    if not bounds:
        return "—"
    return str(bounds[0]) if len(bounds) == 1 else f"{bounds[0]}–{bounds[-1]}"


def checkpoint_notes(analysis: Analysis, index: int | None = None) -> list[Note]:
    """A checkpoint's warnings (its own and the analysis'), its invalid layers and its notes, in that order."""
    ckpt = analysis.checkpoint
    notes = [Note(message, "warning", index) for message in [*ckpt.warnings, *analysis.warnings]]
    notes += [Note(record.error or "", "invalid", index, record.name) for record in analysis.invalid]
    notes += [Note(message, "note", index) for message in ckpt.notes]
    return notes


def _checkpoint_view(analysis: Analysis, label: str, index: int, several: bool) -> CheckpointView:
    ckpt = analysis.checkpoint
    summary = analysis.summary()
    tau = analysis.options.thresholds[0]
    erank, util = _stat(summary, "erank"), _stat(summary, "utilization")
    exact = sum(r.exact for r in analysis.layers if r.valid)
    valid = summary["valid_layers"]
    kpis = [
        Kpi(Cell(f"{valid}/{summary['layers']}"), "layers analysed"),
        Kpi(Cell(ckpt.params, ","), "adapter parameters"),
        Kpi(Cell(_bounds(analysis)), "rank bound min(K, m, n)"),
        Kpi(Cell(_stat(summary, f"count_above[{parameter_key(tau)}]"), ".2f"), f"mean #σ > {tau:g}"),
        Kpi(Cell(erank, ".2f"), "mean erank", f"{util:.0%} of the bound" if util is not None else ""),
        Kpi(Cell(_stat(summary, "stable_rank"), ".2f"), "mean stable rank"),
    ]
    used = [(name, _stat(block, "utilization")) for name, block, total in by_module_blocks(summary) if not total]
    used = [(name, u) for name, u in used if u is not None]
    usage = None
    if erank is not None and util is not None and len(used) > 1:
        usage = (util, min(used, key=lambda m: m[1]), max(used, key=lambda m: m[1]))
    config = [
        (str(key), value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str))
        for key, value in (ckpt.config or {}).items()
        if value not in (None, {}, [], "")
    ]
    caption = f"By module type — {label}" if several else "By module type"
    return CheckpointView(
        label=label,
        path=str(ckpt.path),
        adapter_type=ckpt.adapter_type,
        family=ckpt.family,
        scaling=scaling_text(analysis),
        exactness="all spectra exact" if exact == valid else f"{exact} of {valid} exact",
        kpis=kpis,
        usage=usage,
        notes=checkpoint_notes(analysis, index),
        skipped=[(s.key, s.reason) for s in ckpt.skipped],
        config=config,
        modules=module_table(analysis, f"modules-{index}", caption),
    )


# -- the layers table and the per-layer details ------------------------------------------------------------
def _status(record: LayerRecord) -> str:
    if not record.valid:
        return "invalid"
    if record.singular_values is not None and not any(v > 0 for v in record.singular_values):
        return "zero"  # a zero update (every σ = 0): valid, but nothing to read in its measures
    return "ok" if record.exact else "approximate"


def layer_table(
    analyses: Sequence[Analysis],
    labels: Sequence[str],
    suggested: Sequence[dict[str, int]] = (),
    against_base: bool = False,
    rule: str | None = None,
) -> Table:
    """Every layer of every checkpoint; ``suggested`` (per checkpoint, layer → rank under ``rule``) and
    ``against_base`` add the suggested-rank and base columns after the status."""
    several = len(analyses) > 1
    tau = analyses[0].options.thresholds[0]
    columns = [Column("layer", False), Column("module", False), Column("index")]
    if several:
        columns.insert(0, Column("checkpoint", False))
    columns += [
        Column("m×n"),
        Column("r≤"),
        Column("σ₁"),
        Column("‖ΔW‖_F"),
        Column(f"#σ>{tau:g}"),
        Column("erank"),
        Column("stable rank"),
        Column("90% energy"),
        Column("utilisation"),
        Column("status", False),
        *extra_columns(rule if suggested else None, against_base),
    ]
    rows = []
    for index, (analysis, label) in enumerate(zip(analyses, labels, strict=True)):
        ranks = suggested[index] if suggested else None
        for record in analysis.layers:
            m = record.metrics or {}
            shape = record.matrix_shape
            size = shape[0] * shape[1] if len(shape) == 2 else None
            cells = [Cell(label)] if several else []
            cells += [
                Cell(record.name),
                Cell(record.module_type),
                Cell(record.layer_index, "d"),
                Cell(size, "d", shown="×".join(map(str, shape)) or "—"),
                Cell(record.rank_bound, "d"),
                Cell(m.get("sigma_max"), ".4g"),
                Cell(m.get("frobenius"), ".4g"),
                Cell((m.get("count_above") or {}).get(parameter_key(tau)), "d"),
                Cell(m.get("erank"), ".2f"),
                Cell(m.get("stable_rank"), ".2f"),
                Cell((m.get("energy_rank") or {}).get("0.9"), "d"),
                Cell(m.get("utilization"), ".0%"),
                Cell(_status(record)),
                *extra_cells(record, ranks, against_base),
            ]
            search = " ".join(x for x in (record.name, record.module_type, label if several else "") if x).lower()
            rows.append(Row(cells, layer=record.name, search=search))
    return Table("layer-table", columns, rows)


def _detail(name: str, anchor: str, module: str, analyses: Sequence[Analysis], labels: Sequence[str]) -> LayerDetail:
    entries, series = [], []
    for index, (analysis, label) in enumerate(zip(analyses, labels, strict=True)):
        record = next((r for r in analysis.layers if r.name == name), None)
        if record is None:
            continue
        entry = LayerEntry(label, index, record)
        if record.valid:
            sigma = tuple(significant(record) or record.singular_values)  # as the figures: no numerical-zero tail
            series.append(SeriesView(label, index, sigma, tuple(cumulative_energy(sigma)), record.rank_bound))
            if record.components:
                entry.components = components_table(record)
                cosine = (record.alignment or {}).get("cosine")
                if cosine:
                    names = [c.name for c in record.components]
                    entry.cosine = Table(
                        "cosine",
                        [Column(n) for n in names],
                        [Row([Cell(v, ".2f") for v in row], layer=n) for n, row in zip(names, cosine, strict=True)],
                        "Update cosine",
                    )
        entries.append(entry)
    return LayerDetail(name, anchor, module, entries, series)


# -- composition and comparison ----------------------------------------------------------------------------
def _composition_view(analysis: Analysis, label: str, index: int) -> CompositionView | None:
    records = composed(analysis)
    if not records:
        return None
    stats = analysis.summary()["composition"]
    kpis = [
        Kpi(Cell(stats["layers"], "d"), "composed layers", f"{stats['collapsed']} collapsed"),
        Kpi(Cell(stats["mean_components"], ".3g"), "components per layer"),
        Kpi(Cell(stats["mean_effective_components"], ".2f"), "effective components", "by energy share"),
        Kpi(Cell(stats["mean_rank_gain"], ".2f"), "rank gain", "erank / best component's"),
        Kpi(Cell(stats["mean_interference"], ".3f"), "interference", "0 when orthogonal"),
        *(
            Kpi(
                Cell(stats[f"mean_{side}_overlap"], ".3f"),
                f"{side} overlap",
                f"random {Cell(stats[f'mean_{side}_baseline'], '.3f').text}",
            )
            for side in ("left", "right")
        ),
    ]
    columns = [
        Column("layer", False),
        Column("k"),
        Column("weights", False),
        Column("energy shares", False),
        Column("effective components"),
        Column("rank gain"),
        Column("interference"),
        Column("collapsed", False),
        Column("mean cos"),
        Column("overlap L"),
        Column("overlap R"),
        Column("erank by round", False),
    ]
    rows = []
    for record in records:
        fields = record.composition
        members = tuple(c.name for c in record.components or [])
        growth = fields.get("growth")
        path = " → ".join(Cell(g["metrics"]["erank"], ".2f").text for g in growth) if growth else "—"
        cells = [
            Cell(record.name),
            Cell(len(members), "d"),
            Cell(Shares(tuple(fields["weights"]["normalized"]), members, "weight")),
            Cell(Shares(tuple(fields["energy_shares"]["values"]), members, "energy share")),
            Cell(fields["energy_shares"]["concentration"]["effective_number"], ".2f"),
            Cell(fields["rank_gain"], ".2f"),
            Cell(fields["interference"], ".3f"),
            Cell("yes" if fields["collapsed"] else "no"),
            *(Cell(value, ".3f") for value in mean_alignment(record.alignment).values()),
            Cell(path),
        ]
        rows.append(Row(cells, layer=record.name, search=record.name.lower()))
    names = [c.name for c in records[0].components or []]
    return CompositionView(label, index, stats, kpis, names, Table(f"composition-table-{index}", columns, rows))


def _comparison_view(comparison: Comparison) -> ComparisonView:
    summary = comparison.summary()
    return ComparisonView(
        headlines=list(summary["headlines"]),
        alignment=summary["alignment"],
        unmatched=dict(comparison.unmatched),
        modules=comparison_module_table(comparison),
        layers=comparison_layer_table(comparison),
    )


def build_report(
    analyses: Sequence[Analysis],
    labels: Sequence[str],
    comparison: Comparison | None = None,
    *,
    suggest_rule: str | None = DEFAULT_SUGGEST_RULE,
) -> Report:
    """The report model of ``analyses`` (one checkpoint, or several with their ``comparison``). ``suggest_rule``:
    the rank rule of each layer's suggested rank (``rankscope suggest``'s; None or ``"none"``: no suggestion)."""
    analyses, labels = list(analyses), list(labels)
    rule = suggestion_rule(suggest_rule)
    suggested = suggested_ranks(analyses, rule)
    against_base = measured_against_base(analyses)
    several = len(analyses) > 1
    modules = layer_names_by_module(analyses)
    names = [name for group in modules.values() for name in group]
    anchors = {name: f"layer-{n}" for n, name in enumerate(names, 1)}
    compositions = [_composition_view(a, label, i) for i, (a, label) in enumerate(zip(analyses, labels, strict=True))]
    options = analyses[0].options
    return Report(
        labels=labels,
        analyses=analyses,
        comparison=comparison,
        title=" vs ".join(labels) if several else labels[0],
        checkpoints=[
            _checkpoint_view(a, label, i, several) for i, (a, label) in enumerate(zip(analyses, labels, strict=True))
        ],
        figures=figure_specs(analyses, labels, comparison, suggest_rule=rule),
        modules=modules,
        anchors=anchors,
        layers=layer_table(analyses, labels, suggested, against_base, rule),
        details=[
            _detail(name, anchors[name], module, analyses, labels)
            for module, group in modules.items()
            for name in group
        ],
        compositions=[view for view in compositions if view is not None],
        comparison_view=_comparison_view(comparison) if comparison is not None else None,
        energies=tuple(options.energies),
        thresholds=tuple(options.thresholds),
        suggestion_rule=rule,
        suggested=suggested,
        against_base=against_base,
        no_comparison=_no_comparison(labels) if several and comparison is None else None,
    )


def _no_comparison(labels: Sequence[str]) -> str:
    return (
        f"No comparison: no layer is shared by all of {', '.join(labels)} (adapters of different models, or of "
        "different modules of one), so nothing can be set side by side; each checkpoint is reported on its own."
    )
