"""A checkpoint's summary: each metric's mean/min/max over its layers, overall and by module type, and the
composition statistics; :func:`flat_metrics` flattens one record's metrics (the table columns)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from ..core.naming import group_by_module
from ..measures.components import off_diagonal_mean

if TYPE_CHECKING:
    from .records import LayerRecord


_SCALAR_METRICS = (
    "erank",
    "erank_energy",
    "stable_rank",
    "participation_ratio",
    "numerical_rank",
    "utilization",
    "sigma_max",
    "frobenius",
    "energy",
)
_PARAMETRISED_METRICS = ("count_above", "count_above_rel", "energy_rank")


def flat_metrics(record: LayerRecord) -> dict[str, float]:
    """A record's metrics as one flat mapping (``count_above[0.005]``, ``erank``, …)."""
    if record.metrics is None:
        return {}
    flat = {}
    for key in _PARAMETRISED_METRICS:
        for parameter, value in record.metrics[key].items():
            flat[f"{key}[{parameter}]"] = value
    for key in _SCALAR_METRICS:
        flat[key] = record.metrics[key]
    return flat


# with --base only: the layer against its base weight (analysis.against_base), as table columns
BASE_COLUMNS = ("relative_update", "relative_sigma_max", "amplification", "intruders")


def flat_base(base: dict | None) -> dict[str, object]:
    """A record's measures against its base weight as flat columns (``intruders``: their count); None values
    where the layer was not measured."""
    if base is None:
        return dict.fromkeys(BASE_COLUMNS)
    intruders = base["intruders"]
    count = intruders["count"] if intruders is not None else None
    return {**{key: base[key] for key in BASE_COLUMNS[:3]}, "intruders": count}


def _stats(records: list[LayerRecord]) -> dict:
    valid = [flat_metrics(r) for r in records if r.valid]
    out = {}
    for key in valid[0] if valid else {}:
        values = [v[key] for v in valid if v[key] is not None]  # None: a metric a truncated spectrum cannot give
        if not values:
            out[key] = {"mean": None, "min": None, "max": None}
            continue
        out[key] = {"mean": sum(values) / len(values), "min": min(values), "max": max(values)}
    return out


def summarize(records: list[LayerRecord]) -> dict:
    """Counts, parameters and mean/min/max of each metric, overall and by module type (``q_proj`` …)."""
    groups = group_by_module(records, lambda record: record.name, lambda record: record.module_type)

    def block(rs: list[LayerRecord]) -> dict:
        return {
            "layers": len(rs),
            "valid_layers": sum(r.valid for r in rs),
            "params": sum(r.params for r in rs),
            "rank_bound": {"total": sum(r.rank_bound for r in rs if r.valid)},
            "metrics": _stats(rs),
        }

    summary = {**block(records), "by_module": {name: block(rs) for name, rs in groups.items()}}
    composed = [r for r in records if r.composition is not None]
    if composed:
        summary["composition"] = {
            **composition_stats(composed),
            "by_module": {name: composition_stats([r for r in rs if r.composition]) for name, rs in groups.items()},
        }
    return summary


def mean(values: Iterable[float | None]) -> float | None:
    """The mean of the values that are there (None ones left out); None when there are none."""
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


ALIGNMENT_OVERLAPS = ("left_overlap", "left_baseline", "right_overlap", "right_baseline")


def alignment_means(alignments: list[dict], keys: Iterable[str] = ALIGNMENT_OVERLAPS) -> dict[str, float | None]:
    """``mean_<key>``: the mean over ``alignments`` of each one's mean off-diagonal entry of its ``key`` matrix."""
    return {f"mean_{key}": mean([off_diagonal_mean(a[key]) for a in alignments]) for key in keys}


def composition_stats(records: list[LayerRecord]) -> dict:
    """Across composed layers: how many collapsed, how many components carry the energy, overlap vs baseline, gain."""
    composed = [r for r in records if r.composition is not None]
    fields = [r.composition for r in composed]
    return {
        "layers": len(composed),
        "collapsed": sum(bool(f["collapsed"]) for f in fields),
        "mean_components": mean([len(r.components or []) for r in composed]),
        "mean_effective_components": mean([f["energy_shares"]["concentration"]["effective_number"] for f in fields]),
        "mean_weight_effective_number": mean([f["weights"]["concentration"]["effective_number"] for f in fields]),
        "mean_rank_gain": mean([f["rank_gain"] for f in fields]),
        "mean_interference": mean([f["interference"] for f in fields]),
        **alignment_means([r.alignment for r in composed if r.alignment]),
    }


__all__ = ["BASE_COLUMNS", "alignment_means", "composition_stats", "flat_base", "flat_metrics", "mean", "summarize"]
