"""Figures of a training run (``trajectory.build.Trajectory``): a metric against step by module type, a layer ×
step heatmap of a metric, and the drift curve (subspace drift against t−1 and the final step, relative change)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..trajectory.document import layer_series, metric_key, module_series, step_drift
from ._axes import legend_above, style_for
from ._common import FigureInputError, parse_metric
from ._panel import one_axes
from .style import SEQUENTIAL_CMAP, paper_style

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from ..trajectory.build import Trajectory


def _metric(trajectory: Trajectory, metric: str, parameter: float | None) -> tuple[str, float | None]:
    """(key, parameter) of ``metric``: a name (``erank``), a parametrised one with its parameter
    (``count_above[0.01]``), or a bare parametrised name (``count_above``: the trajectory's first τ, P or ρ).
    ``parse_metric`` reads only the options, which a Trajectory has as an Analysis does."""
    if parameter is not None:
        return metric, parameter
    key, parameter, _ = parse_metric(metric, trajectory)  # type: ignore[arg-type]
    return key, parameter


def _absent(series: dict[str, list[float | None]]) -> bool:
    return not any(v is not None for values in series.values() for v in values)


def _not_computed(key: str, parameter: float | None) -> FigureInputError:
    hint = " (a parameter is drawn only where it was analysed: --threshold, --energy)" if parameter is not None else ""
    return FigureInputError(f"no layer has {metric_key(key, parameter)} at any step{hint}")


def _step_axis(axes: Axes) -> None:
    from matplotlib.ticker import MaxNLocator

    axes.set_xlabel("step")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))


def _label(key: str, parameter: float | None) -> str:
    return (
        f"{key} (τ = {parameter:g})" if key == "count_above" and parameter is not None else metric_key(key, parameter)
    )


def metric_by_step_figure(
    trajectory: Trajectory,
    metric: str = "count_above",
    parameter: float | None = None,
    *,
    width: str | float = "column",
    ax: Axes | None = None,
) -> Figure:
    """``metric`` (mean over the layers of each module type) against step, one series per module type.
    ``metric``: ``erank``, ``count_above[0.01]``, …; ``parameter``: τ/P/ρ of a parametrised metric given by its
    bare name (default: the trajectory's first, e.g. its first τ for ``count_above``)."""
    metric, parameter = _metric(trajectory, metric, parameter)
    series = module_series(trajectory, metric_key(metric, parameter))
    if _absent(series):
        raise _not_computed(metric, parameter)
    steps = trajectory.steps
    with paper_style():
        fig, axes = one_axes(ax, width, 0.7, "metric_by_step_figure")
        handles = []
        for index, values in enumerate(series.values()):
            points = [(s, v) for s, v in zip(steps, values, strict=True) if v is not None]
            (line,) = axes.plot([p[0] for p in points], [p[1] for p in points], **style_for(index, len(points)))
            handles.append(line)
        _step_axis(axes)
        axes.set_ylabel(_label(metric, parameter) + ", mean per type")
        if ax is None:
            legend_above(fig, handles, list(series))
        else:
            axes.legend(handles, list(series), fontsize=7)
    return fig


def layer_step_heatmap(
    trajectory: Trajectory,
    metric: str = "count_above",
    parameter: float | None = None,
    *,
    width: str | float = "full",
    ax: Axes | None = None,
) -> Figure:
    """``metric`` (as :func:`metric_by_step_figure` takes it) of every layer (rows, in model order of first
    appearance) at every step (columns)."""
    import numpy as np

    metric, parameter = _metric(trajectory, metric, parameter)
    series = layer_series(trajectory, metric_key(metric, parameter))
    if not series:
        raise FigureInputError("the trajectory has no layer to draw")
    if _absent(series):
        raise _not_computed(metric, parameter)
    matrix = np.ma.masked_invalid(np.array([[np.nan if v is None else v for v in row] for row in series.values()]))
    steps = trajectory.steps
    with paper_style():
        aspect = min(1.4, max(0.5, 0.02 * len(series) + 0.3))
        fig, axes = one_axes(ax, width, aspect, "layer_step_heatmap")
        mesh = axes.pcolormesh(np.arange(len(steps) + 1), np.arange(len(series) + 1), matrix, cmap=SEQUENTIAL_CMAP)
        axes.invert_yaxis()
        axes.set_xticks(np.arange(len(steps)) + 0.5, [str(s) for s in steps], rotation=90 if len(steps) > 8 else 0)
        names = list(series)
        if len(names) <= 40:
            axes.set_yticks(np.arange(len(names)) + 0.5, names, fontsize=5)
        axes.set_xlabel("step")
        fig.colorbar(mesh, ax=axes, label=_label(metric, parameter))
    return fig


def drift_figure(trajectory: Trajectory, *, width: str | float = "column", ax: Axes | None = None) -> Figure:
    """Mean subspace drift (1 − overlap) against the previous and against the final checkpoint, and the mean
    relative change ‖ΔW_t − ΔW_{t−1}‖_F/‖ΔW_t‖_F, against step."""
    if not trajectory.drift:
        raise FigureInputError("no drift to draw (one checkpoint, or a callback JSONL, which logs σ only)")
    per_step = step_drift(trajectory)
    with paper_style():
        fig, axes = one_axes(ax, width, 0.7, "drift_figure")
        handles, labels = [], []
        for index, (key, label) in enumerate((("drift_previous", "subspace drift vs t−1"),
                                              ("drift_final", "subspace drift vs final"),
                                              ("relative_change", "relative change vs t−1"))):  # fmt: skip
            points = [(e["step"], e[key]) for e in per_step if e[key] is not None]
            if points:
                (line,) = axes.plot([p[0] for p in points], [p[1] for p in points], **style_for(index, len(points)))
                handles.append(line)
                labels.append(label)
        _step_axis(axes)
        axes.set_ylabel("mean over layers")
        axes.set_ylim(bottom=0)
        if ax is None:
            legend_above(fig, handles, labels)
        else:
            axes.legend(handles, labels, fontsize=7)
    return fig
