"""One CSV row per layer: identity columns, then every metric flattened (``count_above[0.005]``)."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

from ..analysis.summary import BASE_COLUMNS, flat_base, flat_metrics

if TYPE_CHECKING:
    from ..analysis.comparison import Comparison
    from ..analysis.records import Analysis

_IDENTITY = ("name", "module_type", "layer_index", "kind", "shape", "matrix_shape", "rank_bound", "params", "scale")
_STATUS = ("scaled", "exact", "valid", "error")


def layers_csv(analysis: Analysis, suggested: Mapping[str, int] | None = None, rule: str | None = None) -> str:
    """One row per layer. ``suggested``: layer → its rank under ``rule`` (the report's), a ``suggested_rank[rule]``
    column after the metrics; blank for a layer it does not name (an invalid one)."""
    metric_columns: list[str] = []
    for record in analysis.layers:
        for key in flat_metrics(record):
            if key not in metric_columns:
                metric_columns.append(key)
    base_columns = _BASE if any(record.base is not None for record in analysis.layers) else ()
    suggested_columns = [f"suggested_rank[{rule}]"] if suggested is not None else []
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([*_IDENTITY, *_STATUS, *metric_columns, *suggested_columns, *base_columns])
    for record in analysis.layers:
        row = record.to_dict()
        row["scaled"] = not analysis.options.unscaled  # --unscaled is said in every output, here per row
        row["shape"] = "x".join(map(str, record.shape))
        row["matrix_shape"] = "x".join(map(str, record.matrix_shape))
        values = flat_metrics(record)
        writer.writerow(
            [_cell(row[c]) for c in (*_IDENTITY, *_STATUS)]
            + [_cell(values.get(c)) for c in metric_columns]
            + ([_cell(suggested.get(record.name))] if suggested is not None else [])
            + [_cell(v) for v in _base_values(record.base)][: len(base_columns)]
        )
    return buffer.getvalue()


_BASE = BASE_COLUMNS  # with --base only: the layer against its base weight (analysis.against_base)


def _base_values(base: dict | None) -> list[object]:
    return list(flat_base(base).values())


def _cell(value: object) -> object:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        return text_cell(value)
    return value


def table_csv(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A CSV of ``header`` and ``rows`` with rankscope's cell rules (None empty, floats exact, text neutralised)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([_cell(value) for value in row] for row in rows)
    return buffer.getvalue()


def text_cell(value: str) -> str:
    """A text cell from a checkpoint, neutralised against spreadsheet formula injection (=, +, -, @ …)."""
    return "'" + value if value[:1] in ("=", "+", "-", "@", "\t", "\r") else value


def components_csv(analysis: Analysis) -> str:
    """One row per (layer, component): the component's weight, energy share and metrics, and the layer's totals."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    header_written = False
    for record in analysis.layers:
        if record.components is None:
            continue
        fields = record.composition or {}
        weights = fields.get("weights") or {}
        raw = weights.get("raw") or [None] * len(record.components)
        applied = weights.get("normalized") or [None] * len(record.components)
        shares = (fields.get("energy_shares") or {}).get("values") or [None] * len(record.components)
        for index, component in enumerate(record.components):
            metrics = flat_metrics(component)
            if not header_written:
                writer.writerow(
                    [
                        "layer",
                        "component",
                        "raw_weight",
                        "weight",
                        "energy_share",
                        "rank_bound",
                        *metrics,
                        "layer_erank",
                        "layer_rank_gain",
                        "layer_interference",
                        "layer_collapsed",
                    ]
                )
                header_written = True
            writer.writerow(
                [record.name, component.name, _cell(raw[index]), _cell(applied[index]), _cell(shares[index]),
                 component.rank_bound, *(_cell(v) for v in metrics.values()),
                 _cell(record.metric("erank")), _cell(fields.get("rank_gain")), _cell(fields.get("interference")),
                 _cell(fields.get("collapsed"))]
            )  # fmt: skip
    return buffer.getvalue()


def comparison_csv(comparison: Comparison) -> str:
    """One row per matched layer: each checkpoint's compared values (``<label>:<quantity>``), then the mean
    off-diagonal alignment across checkpoints."""
    from .tables import mean_alignment

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    compared = comparison.compared  # the base columns only where some layer was measured against --base
    columns = [f"{label}:{key}" for label in comparison.labels for key in compared]
    writer.writerow(["name", "module_type", *columns, "mean_cosine", "mean_left_overlap", "mean_right_overlap"])
    for layer in comparison.layers:
        values = [comparison.values(record) for record in layer.records]
        writer.writerow(
            [text_cell(layer.name), text_cell(layer.module_type)]
            + [_cell(v[key]) for v in values for key in compared]
            + [_cell(value) for value in mean_alignment(layer.alignment).values()]
        )
    return buffer.getvalue()
