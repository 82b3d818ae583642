"""A trajectory: every layer's spectrum and metrics at each checkpoint of a run, and how far it moved.

From checkpoints (:func:`checkpoint_trajectory`): each is read and analysed (``analysis.analyze``), and between
consecutive ones each shared layer gets its relative change and subspace overlaps with the previous and the final
step (``trajectory.drift``). From the callback's JSONL (:func:`jsonl_trajectory`): σ per layer and step, the
metrics from σ (``measures.metrics``); no factors, so no drift.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..analysis.analyze import analyze
from ..analysis.options import AnalysisOptions
from ..analysis.records import Analysis, LayerRecord
from ..core.checkpoint import Checkpoint
from ..core.errors import CheckpointError, UsageProblem
from ..core.naming import module_types
from ..measures import metrics as M
from . import drift as D
from .discover import checkpoint_epoch

CALLBACK_SCHEMA = "rankscope.callback/1"
NO_DRIFT_FROM_JSONL = "drift is not available from a callback JSONL: it logs σ only, not the factors or vectors"


@dataclass
class Point:
    """One checkpoint (or one logged step) of a run."""

    path: str
    step: int
    layers: list[LayerRecord]
    epoch: float | None = None


@dataclass
class Trajectory:
    """A run's points in step order and, from checkpoints, one drift record per layer and consecutive pair."""

    source: str  # "checkpoints" or "jsonl"
    points: list[Point]
    drift: list[dict]
    options: AnalysisOptions
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def steps(self) -> list[int]:
        return [point.step for point in self.points]


def _check_steps(entries: Sequence[tuple[int, object]]) -> None:
    seen: dict[int, object] = {}
    for step, path in entries:
        if step in seen:
            raise CheckpointError(f"two checkpoints at step {step}: {seen[step]} and {path}")
        seen[step] = path


def checkpoint_trajectory(
    entries: Sequence[tuple[int, Path]],
    options: AnalysisOptions | None = None,
    *,
    load: Callable[[Path], Checkpoint] | None = None,
    drift_k: int | None = None,
    progress: Callable[[str], None] | None = None,
    final: Analysis | None = None,
) -> Trajectory:
    """Analyse each ``(step, path)`` (in step order) and measure the drift between consecutive checkpoints.

    ``load`` reads one path (default ``formats.load``); ``drift_k`` fixes the k of the subspace overlaps (default:
    the smaller numerical rank of the pair). ``final``: the last entry's analysis when the caller has it already
    (the run report's ``final/``): its checkpoint is neither read nor analysed again. At most three checkpoints'
    updates are held at once.
    """
    if len(entries) < 1:
        raise UsageProblem("a trajectory needs at least one checkpoint", argument="paths")
    if drift_k is not None and drift_k < 1:
        raise UsageProblem(f"drift_k must be a whole number ≥ 1, found {drift_k}", argument="drift_k")
    options = options or (final.options if final is not None else AnalysisOptions())
    if load is None:
        from ..formats import load as load_path

        load = load_path
    entries = sorted(entries, key=lambda item: item[0])
    _check_steps(entries)
    announce = progress or (lambda text: None)
    if final is not None and final.options != options:
        raise UsageProblem("the final checkpoint's analysis was made with other options than the trajectory's")
    if final is None:
        announce(f"reading the final checkpoint {entries[-1][1]}")
    last = final.checkpoint if final is not None else load(entries[-1][1])
    final_bases = _bases(last, options)
    points, records, warnings = [], [], {}
    previous: tuple[int, Checkpoint, dict[str, D.Basis]] | None = None
    for index, (step, path) in enumerate(entries):
        is_last = index == len(entries) - 1
        if not (is_last and final is not None):
            announce(f"analysing {index + 1}/{len(entries)} step {step}")
        checkpoint = last if is_last else load(path)
        analysis = final if is_last and final is not None else analyze(checkpoint, options)
        for message in [*checkpoint.warnings, *analysis.warnings]:
            warnings.setdefault(message, []).append(step)
        points.append(Point(str(path), int(step), list(analysis.layers), checkpoint_epoch(Path(path))))
        bases = final_bases if is_last else _bases(checkpoint, options)
        if previous is not None:
            records += _pair_drift(previous, (step, checkpoint, bases), final_bases, analysis.layers, drift_k, options)
        previous = (step, checkpoint, bases)
    said = [f"{message} (step{'s' if len(at) > 1 else ''} {_steps_text(at)})" for message, at in warnings.items()]
    return Trajectory("checkpoints", points, records, options, said)


def _steps_text(steps: list[int]) -> str:
    """``5``, ``5, 10, 15``, or ``5, 10, … 300`` (every step a warning was given at, shortened past four)."""
    if len(steps) <= 4:
        return ", ".join(map(str, steps))
    return f"{steps[0]}, {steps[1]}, … {steps[-1]} ({len(steps)} steps)"


def _bases(checkpoint: Checkpoint, options: AnalysisOptions) -> dict[str, D.Basis]:
    selected = checkpoint.select(options.layers)
    return {layer.name: D.basis(_update(layer, options)) for layer in selected.layers if layer.update is not None}


def _update(layer, options: AnalysisOptions):
    return layer.update.unscaled() if options.unscaled else layer.update


def _pair_drift(previous, current, final_bases, current_records, drift_k, options) -> list[dict]:
    """Drift records of the layers two consecutive checkpoints share (same name and shape)."""
    (step_before, before, bases_before), (step, now, bases_now) = previous, current
    layers_before = {layer.name: layer for layer in before.layers if layer.update is not None}
    norms = {r.name: r.metrics["frobenius"] for r in current_records if r.valid and r.metrics}
    shared = [
        layer
        for layer in now.layers
        if layer.update is not None
        and layer.name in layers_before
        and layer.name in bases_now
        and layer.name in norms
        and layer.update.shape == layers_before[layer.name].update.shape
    ]
    changes = D.change_norms(
        [(_update(layer, options), _update(layers_before[layer.name], options)) for layer in shared]
    )
    out = []
    for layer, change in zip(shared, changes, strict=True):
        with_previous = D.subspace_overlaps(bases_now[layer.name], bases_before[layer.name], drift_k)
        final = final_bases.get(layer.name)
        with_final = D.subspace_overlaps(bases_now[layer.name], final, drift_k) if final is not None else None
        out.append(
            {
                "layer": layer.name,
                "step": int(step),
                "previous_step": int(step_before),
                "change": change,
                "relative_change": D.relative_change(change, norms[layer.name]),
                "previous": {**with_previous, "drift": D.subspace_drift(with_previous)},
                "final": {**with_final, "drift": D.subspace_drift(with_final)} if with_final is not None else None,
            }
        )
    return out


# -- the callback's JSONL ---------------------------------------------------------------------------------------
def jsonl_trajectory(path: Path, options: AnalysisOptions | None = None) -> Trajectory:
    """Read a ``rankscope.callback/1`` JSONL (one object per line: ``schema``, ``step``, ``epoch``, ``layers`` of
    ``{name, shape, rank_bound, sigma}``); metrics from σ. A step logged twice (a resumed run) keeps the last."""
    options = options or AnalysisOptions()
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise CheckpointError(f"cannot read ({exc.strerror or exc})", path=path) from exc
    by_step: dict[int, Point] = {}
    warnings = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        point = _jsonl_point(line, f"{path}:{number}", options)
        if point.step in by_step:
            warnings.append(
                f"{path}: step {point.step} is logged more than once; the last line (line {number}) is used"
            )
        by_step[point.step] = point
    if not by_step:
        raise CheckpointError("holds no logged step", path=path)
    points = [by_step[step] for step in sorted(by_step)]
    types = module_types(record.name for point in points for record in point.layers)
    for point in points:
        for record in point.layers:
            record.module_type = types[record.name]
    return Trajectory("jsonl", points, [], options, warnings, [NO_DRIFT_FROM_JSONL])


def _jsonl_point(line: str, where: str, options: AnalysisOptions) -> Point:
    try:
        entry = json.loads(line)
    except ValueError as exc:
        raise CheckpointError(f"not JSON ({exc})", path=where) from exc
    if not isinstance(entry, dict) or entry.get("schema") != CALLBACK_SCHEMA:
        raise CheckpointError(f"not a {CALLBACK_SCHEMA} line", path=where)
    step, epoch, layers = entry.get("step"), entry.get("epoch"), entry.get("layers")
    if isinstance(step, bool) or not isinstance(step, int):
        raise CheckpointError(f"step must be an integer, found {step!r}", path=where)
    if epoch is not None and (isinstance(epoch, bool) or not isinstance(epoch, (int, float))):
        raise CheckpointError(f"epoch must be a number or null, found {epoch!r}", path=where)
    if not isinstance(layers, list):
        raise CheckpointError("layers must be a list", path=where)
    return Point(where.rsplit(":", 1)[0], step, [_jsonl_record(layer, where, options) for layer in layers], epoch)


def _jsonl_record(layer: object, where: str, options: AnalysisOptions) -> LayerRecord:
    if not isinstance(layer, dict) or not isinstance(layer.get("name"), str):
        raise CheckpointError("each layer needs a name", path=where)
    name, shape, bound, sigma = layer["name"], layer.get("shape"), layer.get("rank_bound"), layer.get("sigma")
    valid_shape = isinstance(shape, list) and len(shape) == 2 and all(_whole(v) and v > 0 for v in shape)
    if not valid_shape or not _whole(bound) or bound < 0:
        raise CheckpointError(f"layer {name}: shape must be [m, n] and rank_bound a whole number", path=where)
    if not isinstance(sigma, list) or not all(_number(v) and v >= 0 for v in sigma):
        raise CheckpointError(f"layer {name}: sigma must be a list of numbers ≥ 0", path=where)
    if any(a < b for a, b in itertools.pairwise(sigma)):
        raise CheckpointError(f"layer {name}: sigma is not in descending order", path=where)
    values = torch.tensor([float(v) for v in sigma], dtype=torch.float64)
    metrics = M.spectrum_metrics(
        values,
        shape,
        bound,
        thresholds=options.thresholds,
        energies=options.energies,
        rel_thresholds=options.rel_thresholds,
    )
    return LayerRecord(name=name, family="callback", kind="logged", shape=list(shape), matrix_shape=list(shape),
                       rank_bound=bound, params=0, scale=None, exact=True, valid=True, error=None,
                       singular_values=values.tolist(), metrics=metrics)  # fmt: skip


def _whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def layer_names(trajectory: Trajectory) -> list[str]:
    """Every layer seen at any step, in the order first seen."""
    names: dict[str, None] = {}
    for point in trajectory.points:
        for record in point.layers:
            names.setdefault(record.name)
    return list(names)


def records_by_step(trajectory: Trajectory) -> Iterable[tuple[int, dict[str, LayerRecord]]]:
    for point in trajectory.points:
        yield point.step, {record.name: record for record in point.layers}
