"""What the figure modules share: picking and grouping records, display-only summaries, layout helpers.

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
from .style import GUIDE_COLOR, figure_size, series_style

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from ..analysis.records import Analysis, LayerRecord


MAX_LINES = 8  # more lines than this in one panel are summarised (median and quartiles) by module type
MAX_FACETS = 8  # more module types than this are not given one panel each
MAX_MARKED_POINTS = 16  # series longer than this are drawn without markers


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


def quartiles(vectors: Sequence[Sequence[float]]) -> tuple[list[float], list[float], list[float]]:
    """Per position i: the median and the lower and upper quartiles over the vectors that have an i-th entry."""
    import numpy as np

    length = max((len(v) for v in vectors), default=0)
    low, mid, high = [], [], []
    for i in range(length):
        column = np.array([v[i] for v in vectors if len(v) > i], dtype=float)
        q1, q2, q3 = np.percentile(column, [25, 50, 75])
        low.append(float(q1))
        mid.append(float(q2))
        high.append(float(q3))
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
            "(--threshold/--energy)"
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
    "frobenius": "‖ΔW‖_F",
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


# -- layout -----------------------------------------------------------------------------------------------
def new_figure(width: str | float, aspect: float) -> Figure:
    """A figure of the given width (column, full, inches) and height = width × aspect, constrained layout."""
    from matplotlib.figure import Figure

    return Figure(figsize=figure_size(width, aspect), layout="constrained")


def facet_grid(count: int, width: str | float) -> tuple[int, int]:
    """(rows, columns) for ``count`` small panels: about 1 in per panel across (3 in a column, 6 at full width)."""
    from .style import figure_width

    most = max(1, min(count, int(figure_width(width) // 1.05)))
    rows = math.ceil(count / most)
    return rows, math.ceil(count / rows)  # balanced: 7 panels in 4 + 3, not 6 + 1


def legend_above(
    fig: Figure, handles: list, labels: list[str], *, title: str | None = None, wide: bool = False
) -> None:
    """One legend for the whole figure, above the panels (never over the data)."""
    if not handles:
        return
    from .style import figure_width

    width = figure_width(fig.get_figwidth())
    longest = max(len(label) for label in labels)
    per_entry = (0.6 if wide else 0.45) + 0.055 * longest  # inches: handle, spacing and 7 pt text
    columns = max(1, min(len(labels), int(width // per_entry)))
    extra = {}
    if wide:  # (swatch, line) pairs side by side: the bar's hatch and the line's marker and dashes
        from matplotlib.legend_handler import HandlerTuple

        extra = {"handler_map": {tuple: HandlerTuple(ndivide=None, pad=0.4)}, "handlelength": 4.0}
    fig.legend(handles, labels, loc="outside upper center", ncols=columns, title=title, **extra)


def integer_ticks(axis, count: int, *, start: int = 1, most: int = 8) -> None:
    """Ticks at whole numbers from ``start`` to ``count`` (1, 8, 16, … for long ranges), at most ``most``."""
    span = count - start + 1
    if span <= most:
        ticks = list(range(start, count + 1))
    else:
        step = next(s for s in (2, 4, 5, 8, 10, 16, 20, 25, 32, 50, 64, 100, 128, 200, 256, 500, 1000, 10**9)
                    if span / s <= most - 1)  # fmt: skip
        ticks = [start] + [t for t in range(step, count + 1, step) if t > start]
    axis.set_ticks(ticks)
    axis.set_ticks([], minor=True)


def guide_hline(ax: Axes, y: float, text: str, *, side: str = "right", above: bool = True):
    """A thin dashed reference line across the panel, labelled at one end unless ``text`` is empty (thresholds
    τ, energy levels); returns the line (a legend handle where the label would not fit)."""
    line = ax.axhline(y, color=GUIDE_COLOR, linewidth=0.6, linestyle=(0, (3, 2)), zorder=1)
    if not text:
        return line
    x = 0.99 if side == "right" else 0.01
    ax.annotate(
        text,
        xy=(x, y),
        xycoords=("axes fraction", "data"),
        xytext=(0, 1.5 if above else -1.5),
        textcoords="offset points",
        ha=side,
        va="bottom" if above else "top",
        fontsize=7,
        color=GUIDE_COLOR,
    )
    return line


def guide_vline(ax: Axes, x: float, text: str):
    """A thin dotted vertical reference line labelled at the top unless ``text`` is empty (rank bounds)."""
    line = ax.axvline(x, color=GUIDE_COLOR, linewidth=0.6, linestyle=(0, (1, 1.5)), zorder=1)
    if not text:
        return line
    ax.annotate(
        text,
        xy=(x, 1.0),
        xycoords=("data", "axes fraction"),
        xytext=(-1.5, -1),
        textcoords="offset points",
        ha="right",
        va="top",
        fontsize=7,
        color=GUIDE_COLOR,
    )
    return line


def empty_note(ax: Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", fontsize=7, color=GUIDE_COLOR)


def style_for(index: int, points: int) -> dict:
    return series_style(index, marker=points <= MAX_MARKED_POINTS)


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
