"""What the figure modules share: picking and grouping records, display-only summaries (axes and layout: ``_axes``).

Renderers compute nothing new: everything here reads analysis records (``LayerRecord``) and arranges them.
The summaries across layers (median and quartiles at each position) are display transforms of the records'
own numbers. matplotlib is imported inside the functions only.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..core.errors import RankscopeError
from ..core.naming import block_of, checkpoint_labels, group_by_module

if TYPE_CHECKING:
    from ..analysis.records import Analysis, LayerRecord


MAX_LINES = 8  # more lines than this in one panel are summarised (median and quartiles) by module type
MAX_FACETS = 8  # more module types than this are not given one panel each
BAND_ALPHA = 0.18  # quartile and range bands
MAX_MARKED_POINTS = 16  # series longer than this carry their marker on about half as many points
LEGEND_ROW = 0.13  # inches: one row of a 7 pt legend (text and label spacing)


class FigureInputError(RankscopeError, ValueError):
    """The records cannot be drawn as asked (no composed layers, an unknown layer name, a metric not computed)."""


# -- picking and grouping records -----------------------------------------------------------------------------
def check_labels(analyses: Sequence[Analysis], labels: Sequence[str] | None) -> list[str]:
    """One distinct label per analysis (default: the checkpoints' directory names)."""
    if not analyses:
        raise FigureInputError("nothing to draw: no analysis given")
    if labels is None:
        labels = checkpoint_labels([a.checkpoint.path for a in analyses])
    labels = [str(label) for label in labels]
    if len(labels) != len(analyses):
        raise FigureInputError(f"{len(labels)} labels for {len(analyses)} checkpoints")
    if len(set(labels)) != len(labels):
        raise FigureInputError(f"labels must be distinct, got {labels}")
    return labels


def selected(analysis: Analysis, layers: Sequence[str] | None) -> list[LayerRecord]:
    """The valid records to draw: all of them, or those named in ``layers`` (in ``layers``' order)."""
    if layers is None:
        return [r for r in analysis.layers if r.valid]
    if isinstance(layers, str):
        layers = [layers]
    by_name = {r.name: r for r in analysis.layers}
    missing = [name for name in layers if name not in by_name]
    if missing:
        raise FigureInputError(f"{analysis.checkpoint.path}: no layer named {missing[0]!r}")
    invalid = [by_name[name] for name in layers if not by_name[name].valid]
    if invalid:
        raise FigureInputError(f"{analysis.checkpoint.path}: layer {invalid[0].name} is invalid: {invalid[0].error}")
    return [by_name[name] for name in layers]


def by_module(records: Sequence[LayerRecord]) -> dict[str, list[LayerRecord]]:
    """Records grouped by module type in the model's order (``core.naming.group_by_module``), as every table."""
    return group_by_module(records, lambda record: record.name, lambda record: record.module_type)


def significant(record: LayerRecord) -> list[float]:
    """The record's singular values without the numerically zero tail (beyond its ``numerical_rank``: below
    σ₁·max(m, n)·eps(float32)), which a dense SVD of a low-rank update returns as noise near 1e-17."""
    values = list(record.singular_values)
    rank = (record.metrics or {}).get("numerical_rank")
    return values[:rank] if rank is not None and rank < len(values) else values


def cumulative_energy(sigma: Sequence[float]) -> list[float]:
    """Σ_{i≤k} σ_i² / Σσ² for k = 1..K (empty for a zero update, whose energy fractions are undefined)."""
    squares = [v * v for v in sigma]
    total = sum(squares)
    if total <= 0:
        return []
    out, running = [], 0.0
    for square in squares:
        running += square
        out.append(running / total)
    return out


SATURATED = 0.999  # a cumulative-energy curve this close to 1 has levelled off
MAX_BOUND_LINES = 3  # more distinct rank bounds than this (per-layer rank patterns) are not drawn as lines


def saturation_extent(curves: Sequence[Sequence[float]], start: int) -> int:
    """The last k worth showing on a cumulative-energy axis whose curves' first value is at k = ``start``: a
    margin (15 %, at least 1) past the first k at which every curve has reached ``SATURATED``."""
    last = start + 1
    for curve in curves:
        below = [k for k, value in enumerate(curve, start) if value < SATURATED]
        if below:
            last = max(last, below[-1] + 1)
    return last + max(1, math.ceil(0.15 * last))


def block_positions(records: Sequence[LayerRecord]) -> tuple[dict[str, int], str]:
    """A position per block (the layer up to its index), in model order, and what the positions are called.

    Blocks are numbered by their layer index where that numbers them uniquely (``layers.7`` → 7), else by
    position (encoder and decoder blocks that share indices, names without an index).
    """
    blocks: dict[str, int | None] = {}
    for record in records:
        blocks.setdefault(block_of(record.name), record.layer_index)
    indices = list(blocks.values())
    if None not in indices and len(set(indices)) == len(indices):
        return {block: int(index) for block, index in blocks.items()}, "layer index"  # type: ignore[arg-type]
    return {block: position for position, block in enumerate(blocks)}, "block (model order)"


def quartiles(
    vectors: Sequence[Sequence[float]], fill: float | str | None = None
) -> tuple[list[float], list[float], list[float]]:
    """Per position i: the lower quartile, the median and the upper quartile over the vectors.

    ``fill``: what a vector shorter than the longest holds past its end — a number (a spectrum's σᵢ beyond its
    numerical rank are 0: every layer counts at every index, so the median is not taken over the longer spectra
    alone), or ``"last"`` its last value (a cumulative-energy curve stays at 1; an empty vector is left out); None:
    over the vectors that have an i-th entry."""
    import numpy as np

    arrays = [np.asarray(v, dtype=float) for v in vectors]
    if fill is not None and arrays:
        arrays = [a for a in arrays if len(a)] if fill == "last" else arrays
        longest = max((len(a) for a in arrays), default=0)
        arrays = [np.pad(a, (0, longest - len(a)), constant_values=a[-1] if fill == "last" else float(fill))
                  for a in arrays]  # fmt: skip
    ordered = sorted(arrays, key=len, reverse=True)
    lengths = [len(v) for v in ordered]
    low, mid, high = [], [], []
    start = 0
    # positions [start, end) are covered by the same vectors (the `count` longest): one percentile call each run
    for count in range(len(ordered), 0, -1):
        end = lengths[count - 1]
        if end <= start:
            continue
        block = np.stack([v[start:end] for v in ordered[:count]])
        q1, q2, q3 = np.percentile(block, [25, 50, 75], axis=0)
        low += q1.tolist()
        mid += q2.tolist()
        high += q3.tolist()
        start = end
    return low, mid, high


def metric_value(record: LayerRecord, key: str, parameter: float | None) -> float | None:
    """A record's metric (None for an invalid layer), or a FigureInputError saying how to have it computed."""
    return metric_from(record.metrics, key, parameter)


def metric_from(metrics: dict | None, key: str, parameter: float | None) -> float | None:
    """One metric of a metrics mapping (a record's, or a growth step's)."""
    if metrics is None:
        return None
    if parameter is None:
        return metrics[key]
    from ..measures.metrics import parameter_key

    values = metrics[key]
    if parameter_key(parameter) not in values:
        computed = ", ".join(values) or "none"
        raise FigureInputError(
            f"{key} at {parameter:g} was not computed (computed: {computed}); analyse with that parameter "
            "(thresholds or energies)",
            argument=("thresholds", "energies"),
        )
    return values[parameter_key(parameter)]


METRIC_NAMES = {
    "erank": "effective rank (erank)",
    "erank_energy": "energy effective rank",
    "stable_rank": "stable rank",
    "participation_ratio": "participation ratio",
    "numerical_rank": "numerical rank",
    "utilization": "utilisation (erank / r)",
    "sigma_max": "σ₁",
    "frobenius": "‖ΔW‖ (Frobenius)",
    "energy": "Σσ²",
}
PARAMETRISED = {"count_above": "count σ > {}", "count_above_rel": "count σ > {}·σ₁", "energy_rank": "energy rank ({})"}


def parse_metric(metric: str, analysis: Analysis) -> tuple[str, float | None, str]:
    """``erank`` → (key, None, name); ``count_above`` → the analysis' first τ; ``count_above[0.01]`` → τ = 0.01."""
    match = re.fullmatch(r"(\w+)(?:\[([^\]]+)\])?", metric.strip())
    key = match.group(1) if match else metric
    if key in PARAMETRISED:
        if match and match.group(2):
            try:
                parameter = float(match.group(2))
            except ValueError:
                raise FigureInputError(f"metric {metric!r}: {match.group(2)!r} is not a number") from None
        else:
            options = analysis.options
            defaults = {
                "count_above": options.thresholds,
                "count_above_rel": options.rel_thresholds,
                "energy_rank": options.energies,
            }[key]
            parameter = defaults[0]
        return key, parameter, PARAMETRISED[key].format(f"{parameter:g}")
    if key in METRIC_NAMES and not (match and match.group(2)):
        return key, None, METRIC_NAMES[key]
    choices = ", ".join([*METRIC_NAMES, *(f"{k}[p]" for k in PARAMETRISED)])
    raise FigureInputError(f"unknown metric {metric!r}; one of {choices}")


def short_name(record: LayerRecord) -> str:
    """``model.layers.7.self_attn.q_proj`` → ``7 q_proj`` for tick labels."""
    index = record.layer_index
    return f"{index} {record.module_type}" if index is not None else record.module_type


def ellipsize(text: str, limit: int = 18) -> str:
    """Shorten a label in the middle, keeping its start and its end, which tells similar names apart
    (``boosting_round_0`` → ``boost…_round_0``)."""
    if len(text) <= limit:
        return text
    head = (limit - 1) // 3
    return text[:head] + "…" + text[len(text) - (limit - 1 - head) :]
