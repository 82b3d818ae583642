"""Several checkpoints of the same base, layer by layer: side-by-side metrics, ratios, and alignment.

Layers match by name (the module path in the base model). For each matched layer: every checkpoint's record,
and the pairwise alignment of their updates (the functions compositions use): do two methods, or two seeds,
learn the same directions?
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ..core.errors import CheckpointError, UsageProblem
from ..core.naming import checkpoint_labels, group_by_module, model_order_key
from ..measures.components import pairwise_alignments
from ..measures.metrics import parameter_key
from .records import Analysis, LayerRecord
from .summary import ALIGNMENT_OVERLAPS, alignment_means, mean

# the per-layer quantities compared side by side
PLAIN_COMPARED = (
    "rank_bound", "params", "count_above", "energy", "erank", "stable_rank", "utilization", "erank_per_kparam",
)  # fmt: skip
# and, where some layer was measured against --base (its record's ``base`` object), ‖ΔW‖_F/‖W₀‖_F, σ₁(ΔW)/σ₁(W₀)
# and the count of intruder dimensions: without a base these keys (JSON, CSV columns, summary means) are absent
BASE_COMPARED = ("relative_update", "relative_sigma_max", "intruder_count")
COMPARED = (*PLAIN_COMPARED, *BASE_COMPARED)
# matched layers aligned in one call (batched by shape inside it; progress is reported between calls)
_ALIGNED_AT_ONCE = 64


@dataclass
class LayerComparison:
    """One layer in every checkpoint: the records (in label order) and the alignment of their updates."""

    name: str
    records: list[LayerRecord]
    alignment: dict | None = None

    @property
    def module_type(self) -> str:
        return self.records[0].module_type  # the first checkpoint's, decided over its layers


@dataclass
class Comparison:
    """Matched layers across checkpoints, what did not match, and the threshold τ used for counts."""

    labels: list[str]
    analyses: list[Analysis]
    layers: list[LayerComparison]
    unmatched: dict[str, list[str]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def threshold(self) -> float:
        """The counts' τ: the baseline's first threshold that every analysis computed."""
        return shared_thresholds(self.analyses)[0]

    @functools.cached_property
    def against_base(self) -> bool:
        """Whether some matched layer of some checkpoint was measured against a base (has a ``base`` object)."""
        return any(record.base is not None for layer in self.layers for record in layer.records)

    @property
    def compared(self) -> tuple[str, ...]:
        """The compared quantities: :data:`COMPARED` with a base, :data:`PLAIN_COMPARED` without one."""
        return COMPARED if self.against_base else PLAIN_COMPARED

    def values(self, record: LayerRecord) -> dict[str, float | None]:
        """The compared quantities of one record (:attr:`compared`; a base one is None where not measured)."""
        values = compared_values(record, self.threshold)
        return {key: values[key] for key in self.compared}

    def summary(self) -> dict:
        return summarize(self)

    def to_dict(self) -> dict:
        from .documents import comparison_document

        return comparison_document(self)

    def __repr__(self) -> str:
        unmatched = sum(len(names) for names in self.unmatched.values())
        return f"Comparison({', '.join(self.labels)}: {len(self.layers)} matched layers, {unmatched} unmatched)"


def shared_thresholds(analyses: Sequence[Analysis]) -> list[float]:
    """The baseline's thresholds τ that every analysis computed, in the baseline's order."""
    return [t for t in analyses[0].options.thresholds if all(t in a.options.thresholds for a in analyses[1:])]


def compared_values(record: LayerRecord, threshold: float) -> dict[str, float | None]:
    """rank bound, params, count above τ, Σσ², erank, stable rank, utilisation and erank per 1k parameters; with
    a base, the relative update, relative σ₁ and intruder count (None where not measured)."""
    metrics = record.metrics
    if metrics is None:
        return dict.fromkeys(COMPARED)
    base = record.base or {}
    intruders = base.get("intruders")
    return {
        "rank_bound": record.rank_bound,
        "params": record.params,
        "count_above": metrics["count_above"][parameter_key(threshold)],
        "energy": metrics["energy"],
        "erank": metrics["erank"],
        "stable_rank": metrics["stable_rank"],
        "utilization": metrics["utilization"],
        "erank_per_kparam": 1000 * metrics["erank"] / record.params if record.params else None,
        "relative_update": base.get("relative_update"),
        "relative_sigma_max": base.get("relative_sigma_max"),
        "intruder_count": intruders["count"] if intruders else None,
    }


def compare(
    analyses: Sequence[Analysis],
    labels: Sequence[str] | None = None,
    *,
    alignment: bool = True,
    baseline: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Comparison:
    """Match the layers of ``analyses`` by name and align each matched layer's updates across them
    (``alignment=False`` skips that: the side-by-side metrics only). Ratios are to ``baseline`` (a label; default
    the first checkpoint), which is put first. ``progress(done, total)`` is called as matched layers finish."""
    if len(analyses) < 2:
        raise CheckpointError("compare needs at least two checkpoints")
    labels = list(labels) if labels else checkpoint_labels([a.checkpoint.path for a in analyses])
    if len(labels) != len(analyses) or len(set(labels)) != len(labels):
        raise CheckpointError(f"need {len(analyses)} distinct labels, got {labels}")
    if baseline is not None:
        if baseline not in labels:
            raise UsageProblem(f"baseline {baseline!r} is none of the labels {', '.join(labels)}")
        first = labels.index(baseline)
        order = [first, *(i for i in range(len(labels)) if i != first)]
        labels, analyses = [labels[i] for i in order], [analyses[i] for i in order]
    if not shared_thresholds(analyses):
        taus = [", ".join(f"{t:g}" for t in analysis.options.thresholds) for analysis in analyses]
        computed = "; ".join(f"{label}: {tau}" for label, tau in zip(labels, taus, strict=True))
        raise UsageProblem(f"the analyses share no thresholds value ({computed}): analyse them with one in common",
                           argument="thresholds")  # fmt: skip
    by_label = [{record.name: record for record in analysis} for analysis in analyses]
    updates = [{layer.name: layer.update for layer in analysis.checkpoint.layers} for analysis in analyses]
    common = set(by_label[0]).intersection(*by_label[1:])
    if not common:
        names = ", ".join(labels)
        raise CheckpointError(f"no layer name is shared by all of {names}: are they adapters of the same base model?")
    layers, mismatched, to_align = [], [], []
    for name in sorted(common, key=model_order_key):
        records = [records_of[name] for records_of in by_label]
        same_shape = len({tuple(r.matrix_shape) for r in records if r.matrix_shape}) <= 1
        if not same_shape:
            mismatched.append(records)
        elif alignment and all(r.valid for r in records):
            parts = [update_of[name] for update_of in updates]
            parts = [p.unscaled() if a.options.unscaled else p for p, a in zip(parts, analyses, strict=True)]
            to_align.append((len(layers), parts))
        layers.append(LayerComparison(name, records))
    if progress:
        progress(len(layers) - len(to_align), len(layers))
    for start in range(0, len(to_align), _ALIGNED_AT_ONCE):
        chunk = to_align[start : start + _ALIGNED_AT_ONCE]
        for (index, _), aligned in zip(chunk, pairwise_alignments([(parts, None) for _, parts in chunk]), strict=True):
            layers[index].alignment = aligned
        if progress:
            progress(len(layers) - len(to_align) + start + len(chunk), len(layers))
    warnings = []
    if mismatched:
        shapes = ", ".join(
            f"{'×'.join(map(str, r.matrix_shape))} in {label}" for label, r in zip(labels, mismatched[0], strict=True)
        )
        warnings.append(
            f"{len(mismatched)} matched layer(s) differ in shape across the checkpoints ({mismatched[0][0].name}: "
            f"{shapes}): they cannot be aligned, and their ratios compare different matrices — are these "
            "adapters of the same base model?"
        )
    unmatched = {}
    for label, names in zip(labels, by_label, strict=True):
        extra = sorted(set(names) - common, key=model_order_key)
        if extra:
            unmatched[label] = extra
    return Comparison(labels, list(analyses), layers, unmatched, warnings)


def _block(comparison: Comparison, layers: list[LayerComparison]) -> dict:
    """Means and ratios over the layers analysed in every checkpoint: a layer invalid in one (a NaN factor) is
    left out of every label's means, so that each ratio compares the same layers (``not_compared`` counts them)."""
    per_label = {}
    keys = comparison.compared
    compared = [layer for layer in layers if all(record.metrics is not None for record in layer.records)]
    for index, label in enumerate(comparison.labels):
        rows = [comparison.values(layer.records[index]) for layer in compared]
        per_label[label] = {
            "layers": len(compared),
            "params": sum(row["params"] or 0 for row in rows),
            **{f"mean_{key}": mean([row[key] for row in rows]) for key in keys if key != "params"},
        }
    first = per_label[comparison.labels[0]]
    ratios = {}
    ratio_keys = ("params", "mean_count_above", "mean_energy", "mean_erank", "mean_stable_rank")
    ratio_keys += ("mean_relative_update",) if comparison.against_base else ()
    for label in comparison.labels[1:]:
        ratios[label] = {
            key: (per_label[label][key] / first[key]) if first[key] and per_label[label][key] is not None else None
            for key in ratio_keys
        }
    aligned = [layer.alignment for layer in layers if layer.alignment]
    alignment = alignment_means(aligned, ("cosine", *ALIGNMENT_OVERLAPS))
    not_compared = len(layers) - len(compared)
    return {"per_label": per_label, "ratios_to_first": ratios, "alignment": alignment, "not_compared": not_compared}


def summarize(comparison: Comparison) -> dict:
    """Per label: means of the compared quantities; ratios to the first label; mean alignment — overall and by
    module type; and one headline sentence per later label."""
    groups = group_by_module(comparison.layers, lambda layer: layer.name, lambda layer: layer.module_type)
    overall = _block(comparison, comparison.layers)
    return {
        **overall,
        "by_module": {name: _block(comparison, layers) for name, layers in groups.items()},
        "headlines": headlines(comparison, overall),
    }


def headlines(comparison: Comparison, overall: dict) -> list[str]:
    """ "bora reaches 5.80× lora's count above 0.005 (1.30× its erank) with 1.02× its parameters"."""
    first = comparison.labels[0]
    lines = []
    left_out = overall["not_compared"]
    count = overall["per_label"][first]["layers"]
    over = ""
    if left_out:
        over = f" (over the {count} layers valid in every checkpoint; {left_out} invalid in one left out)"
    for label, ratio in overall["ratios_to_first"].items():
        parts = []
        if ratio["mean_count_above"] is not None:
            parts.append(f"{ratio['mean_count_above']:.2f}× {first}'s count above {comparison.threshold:g}")
        if ratio["mean_erank"] is not None:
            parts.append(f"{ratio['mean_erank']:.2f}× its erank")
        if ratio.get("mean_relative_update") is not None:
            parts.append(f"{ratio['mean_relative_update']:.2f}× its relative update ‖ΔW‖/‖W₀‖")
        if ratio["params"] is not None:
            lines.append(f"{label} reaches {' and '.join(parts)} with {ratio['params']:.2f}× its parameters{over}")
    per_label = overall["per_label"]
    if any(per_label[label].get("mean_relative_update") is not None for label in comparison.labels):
        lines.append(
            "against the base: "
            + "; ".join(
                f"{label} ‖ΔW‖/‖W₀‖ {_shown(values['mean_relative_update'], '.3g')}, "
                f"{_shown(values['mean_intruder_count'], '.2f')} intruder dimensions per layer"
                for label, values in per_label.items()
            )
            + " (means over matched layers)"
        )
    return lines


def _shown(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)
