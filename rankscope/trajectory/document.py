"""A trajectory as data: per-module-type series, the headlines, the ``rankscope.trajectory/1`` document, CSV rows.

Headlines: the run **settles** at the first step from which the mean subspace drift against the previous
checkpoint (1 − mean overlap, over layers and both sides) stays below ``drift_threshold``; its **rank saturates**
at the first step whose total count above τ (over layers) no later step exceeds — "still growing" where that is
the last step and the count rose into it.
"""

from __future__ import annotations

from collections.abc import Sequence
from statistics import fmean

from .. import __version__
from ..analysis.summary import flat_metrics
from ..core.naming import group_by_module
from ..measures import metrics as M
from .build import Trajectory

SCHEMA = "rankscope.trajectory/1"
DEFAULT_DRIFT_THRESHOLD = 0.05


def metric_key(key: str, parameter: float | None = None) -> str:
    """The flat name of a metric (``count_above[0.005]``, ``erank``), as ``analysis.summary.flat_metrics`` has it."""
    return f"{key}[{M.parameter_key(parameter)}]" if parameter is not None else key


def layer_series(trajectory: Trajectory, metric: str) -> dict[str, list[float | None]]:
    """Each layer's value of the flat ``metric`` at every step (None where it is absent or invalid there)."""
    values: dict[str, list[float | None]] = {}
    for index, point in enumerate(trajectory.points):
        for record in point.layers:
            row = values.setdefault(record.name, [None] * len(trajectory.points))
            row[index] = flat_metrics(record).get(metric) if record.valid else None
    return values


def module_series(trajectory: Trajectory, metric: str) -> dict[str, list[float | None]]:
    """The mean of ``metric`` over the layers of each module type, per step (types in model order)."""
    types = {record.name: record.module_type for point in trajectory.points for record in point.layers}
    per_layer = layer_series(trajectory, metric)
    groups = group_by_module(per_layer, lambda name: name, lambda name: types[name])
    out = {}
    for kind, names in groups.items():
        out[kind] = []
        for index in range(len(trajectory.points)):
            present = [per_layer[name][index] for name in names if per_layer[name][index] is not None]
            out[kind].append(fmean(present) if present else None)
    return out


def by_module_type(trajectory: Trajectory) -> dict[str, dict[str, list[float | None]]]:
    """Every metric's mean over the layers of each module type, per step: ``{type: {metric: [value per step]}}``
    (metrics flat, as in the CSV: ``count_above[0.005]``)."""
    keys: list[str] = []
    for point in trajectory.points:
        for record in point.layers:
            keys += [key for key in flat_metrics(record) if key not in keys]
    out: dict[str, dict[str, list[float | None]]] = {}
    for key in keys:
        for kind, values in module_series(trajectory, key).items():
            out.setdefault(kind, {})[key] = values
    return out


def step_drift(trajectory: Trajectory) -> list[dict]:
    """Per checkpoint after the first: mean subspace drift against the previous and the final step, and mean
    relative change, over the layers that have them."""
    out = []
    for step in trajectory.steps[1:]:
        records = [r for r in trajectory.drift if r["step"] == step]
        previous = [r["previous"]["drift"] for r in records if r["previous"]["drift"] is not None]
        final = [r["final"]["drift"] for r in records if r["final"] and r["final"]["drift"] is not None]
        change = [r["relative_change"] for r in records if r["relative_change"] is not None]
        out.append({"step": step, "layers": len(records),
                    "drift_previous": fmean(previous) if previous else None,
                    "drift_final": fmean(final) if final else None,
                    "relative_change": fmean(change) if change else None})  # fmt: skip
    return out


def settled_step(per_step: Sequence[dict], threshold: float) -> int | None:
    """The first step from which every later step's mean drift against its previous one is below ``threshold``."""
    settled = None
    for entry in per_step:
        value = entry["drift_previous"]
        if value is None or value >= threshold:
            settled = None
        elif settled is None:
            settled = entry["step"]
    return settled


def rank_counts(trajectory: Trajectory, threshold: float) -> list[int]:
    """The count of σ above τ summed over the layers, per step."""
    key = metric_key("count_above", threshold)
    return [sum(int(flat_metrics(r).get(key, 0)) for r in point.layers if r.valid) for point in trajectory.points]


def headlines(trajectory: Trajectory, *, drift_threshold: float = DEFAULT_DRIFT_THRESHOLD) -> dict:
    """Where the run stops changing and when its rank saturates (see the module's docstring)."""
    threshold = trajectory.options.thresholds[0]
    counts = rank_counts(trajectory, threshold)
    steps = trajectory.steps
    saturated = next(i for i in range(len(counts)) if counts[i] >= max(counts[i:]))
    growing = saturated == len(counts) - 1 and len(counts) > 1 and counts[-1] > counts[-2]
    per_step = step_drift(trajectory)
    return {
        "drift_threshold": drift_threshold,
        "settled_step": settled_step(per_step, drift_threshold) if trajectory.drift else None,
        "drift_available": bool(trajectory.drift),
        "count_threshold": threshold,
        "rank_counts": counts,
        "saturation_step": None if growing else steps[saturated],
        "still_growing": growing,
    }


def trajectory_document(trajectory: Trajectory, *, drift_threshold: float = DEFAULT_DRIFT_THRESHOLD) -> dict:
    """The ``rankscope.trajectory/1`` document: checkpoints in step order (``{path, step, epoch, layers}``, the
    layers as spectrum-document records), the steps, every metric's mean per module type and step, the per-layer
    drift records, the per-step drift and the headlines."""
    options = trajectory.options
    return {
        "schema": SCHEMA,
        "rankscope": __version__,
        "source": trajectory.source,
        "scaled": not options.unscaled,
        "options": {
            "thresholds": list(options.thresholds),
            "energies": list(options.energies),
            "rel_thresholds": list(options.rel_thresholds),
            "layers": options.layers,
        },
        "warnings": list(trajectory.warnings),
        "notes": list(trajectory.notes),
        "checkpoints": [
            {"path": p.path, "step": p.step, "epoch": p.epoch, "layers": [r.to_dict() for r in p.layers]}
            for p in trajectory.points
        ],
        "steps": trajectory.steps,
        "by_module_type": by_module_type(trajectory),
        "drift": trajectory.drift,
        "step_drift": step_drift(trajectory),
        "headlines": headlines(trajectory, drift_threshold=drift_threshold),
    }


_IDENTITY = ("step", "path", "layer", "module_type", "rank_bound", "valid")
_DRIFT = ("relative_change", "drift_previous", "left_overlap_previous", "right_overlap_previous", "drift_final",
          "left_overlap_final", "right_overlap_final", "overlap_k")  # fmt: skip


def trajectory_table(trajectory: Trajectory) -> tuple[list[str], list[list[object]]]:
    """The CSV's header and rows: one row per (step, layer) — identity, every metric flattened, and the drift
    against t−1 and the final step (None at the first step and from a JSONL)."""
    columns: list[str] = []
    for point in trajectory.points:
        for record in point.layers:
            columns += [key for key in flat_metrics(record) if key not in columns]
    drift = {(r["step"], r["layer"]): r for r in trajectory.drift}
    rows = []
    for point in trajectory.points:
        for record in point.layers:
            values = flat_metrics(record)
            found = drift.get((point.step, record.name))
            row = [point.step, point.path, record.name, record.module_type, record.rank_bound, record.valid]
            rows.append(row + [values.get(c) for c in columns] + _drift_cells(found))
    return [*_IDENTITY, *columns, *_DRIFT], rows


def _drift_cells(record: dict | None) -> list[object]:
    if record is None:
        return [None] * len(_DRIFT)
    previous, final = record["previous"], record["final"] or {"drift": None, "left": None, "right": None}
    return [record["relative_change"], previous["drift"], previous["left"], previous["right"], final["drift"],
            final["left"], final["right"], previous["k"]]  # fmt: skip
