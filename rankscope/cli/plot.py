"""``rankscope plot KIND PATH… -o FILE``: one paper-ready figure (PDF, PNG or SVG from FILE's suffix)."""

from __future__ import annotations

import click

from ..core.naming import checkpoint_labels
from ..figures import KINDS
from .app import handle_errors, note
from .options import (
    CommaList,
    analysis_options,
    checkpoint_options,
    choice_option,
    drift_k_option,
    load_and_settings,
    report_problems,
    run_analysis,
)

SUFFIXES = (".pdf", ".png", ".svg")
ONE_CHECKPOINT = ("alignment", "weights", "growth", "resize", "base-heatmap")  # figures of a single checkpoint
COMPOSED = {"alignment", "weights", "growth"}
# figures of a training run (figures/trajectory.py), named here: importing that module reads torch, and the CLI
# must stay cheap to import
RUN_KINDS = ("trajectory", "trajectory-heatmap", "drift")
METRIC_KINDS = ("erank-heatmap", "growth", "trajectory", "trajectory-heatmap")  # the kinds --metric applies to


class Width(click.ParamType):
    """``column`` (3.25 in), ``full`` (6.75 in) or a number of inches."""

    name = "width"

    def convert(self, value, param, ctx):
        from ..figures.style import figure_width

        try:
            figure_width(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)
        return value if value in ("column", "full") else float(value)


def _labels(paths: tuple[str, ...], labels) -> list[str] | None:
    if labels is None:
        return None
    if len(labels) != len(paths):
        raise click.UsageError(f"--labels gives {len(labels)} names for {len(paths)} checkpoints")
    if len(set(labels)) != len(labels):
        raise click.UsageError(f"--labels must be distinct, got {','.join(labels)}")
    return list(labels)


def _one_layer(names: list[str], wanted: tuple[str, ...], what: str, where: str) -> str:
    """The single layer a figure of one layer draws: --layer, or the only candidate."""
    from ..core.errors import RankscopeError

    if len(wanted) > 1:
        raise click.UsageError(f"{what} draws one layer; --layer was given {len(wanted)} times")
    if wanted:
        if wanted[0] not in names:
            raise RankscopeError(f"{where}: no {'composed ' if what == 'alignment' else ''}layer named {wanted[0]!r}")
        return wanted[0]
    if len(names) == 1:
        return names[0]
    shown = ", ".join(names[:3]) + (", …" if len(names) > 3 else "")
    raise click.UsageError(f"{what} draws one layer: pick one of {len(names)} with --layer NAME (e.g. {shown})")


def _subspace_figure(paths, labels, layer_names, side, width, options):
    """φ(i, j) between the same layer of two checkpoints: needs only the factors, no full analysis."""
    from ..core.errors import RankscopeError
    from ..core.naming import model_order_key
    from ..figures import subspace_similarity_figure
    from ..measures.components import subspace_similarity_grid

    if len(paths) != 2:
        raise click.UsageError(f"subspace-similarity compares exactly two checkpoints, got {len(paths)}")
    checkpoints, unscaled = [], False
    for path in paths:
        checkpoint, settings = load_and_settings(path, options)
        checkpoints.append(checkpoint.select(settings.layers) if settings.layers else checkpoint)
        unscaled = settings.unscaled
    layers = [{layer.name: layer for layer in c.layers} for c in checkpoints]
    common = sorted(set(layers[0]) & set(layers[1]), key=model_order_key)
    if not common:
        raise RankscopeError(f"{paths[0]} and {paths[1]} share no layer name: are they adapters of the same base?")
    name = _one_layer(common, layer_names, "subspace-similarity", f"{paths[0]} and {paths[1]}")
    updates = []
    for checkpoint, by_name in zip(checkpoints, layers, strict=True):
        layer = by_name[name]
        if layer.update is None:
            raise RankscopeError(
                f"{checkpoint.weights_file or checkpoint.path}: layer {name} is invalid: {layer.error}"
            )
        updates.append(layer.update.unscaled() if unscaled else layer.update)
    if updates[0].shape != updates[1].shape:
        raise RankscopeError(
            f"layer {name} has shape {updates[0].shape} in {paths[0]} but {updates[1].shape} in {paths[1]}"
        )
    grid = subspace_similarity_grid(*updates, side=side)
    if 0 in grid.shape:
        zero = paths[0] if grid.shape[0] == 0 else paths[1]
        raise RankscopeError(f"{zero}: layer {name} has a zero update: its subspaces are undefined")
    labels = labels or checkpoint_labels([c.path for c in checkpoints])
    title = f"{name} ({side} singular vectors)"
    return subspace_similarity_figure(grid, labels, width=width or "column", title=title)


def _run_figure(kind: str, paths, metric: str | None, width, quiet: bool, options: dict, drift_k: int | None = None):
    """A figure of a training run (``RUN_KINDS``): PATHS read as ``rankscope trajectory`` reads them (``drift_k``:
    its ``--drift-k``)."""
    from ..figures import trajectory as F
    from .trajectory import read_trajectory

    trajectory = read_trajectory(paths, options, drift_k=drift_k, quiet=quiet)
    if kind == "trajectory":
        return F.metric_by_step_figure(trajectory, metric or "erank", width=width or "column")
    if kind == "trajectory-heatmap":
        return F.layer_step_heatmap(trajectory, metric or "erank", width=width or "full")
    return F.drift_figure(trajectory, width=width or "column")


def _figure(kind, analyses, labels, layer_names, metric, width, threshold, limits=(None, None)):
    from .. import figures
    from ..core.errors import RankscopeError

    width = width or ("full" if kind == "weights" else "column")

    analysis = analyses[0]
    where = analysis.checkpoint.path
    layers = list(layer_names) or None
    if kind == "spectrum":
        return figures.spectrum_figure(analyses, labels, layers=layers, width=width)
    if kind == "energy":
        return figures.energy_figure(analyses, labels, layers=layers, width=width)
    if kind == "count-above":
        return figures.count_above_figure(analyses, labels, threshold=threshold, width=width)
    if kind == "erank-heatmap":
        # several checkpoints: one panel each, one colour bar, the same limits (by the metric's meaning)
        return figures.erank_heatmap_figure(
            analyses, labels, metric=metric, width=width, vmin=limits[0], vmax=limits[1]
        )
    if kind == "resize":
        return figures.resize_figure(analysis, width=width)
    if kind == "base-heatmap":
        return figures.base_heatmap_figure(analysis, width=width)
    composed = [r for r in analysis.layers if r.components is not None]
    if not composed:
        raise RankscopeError(
            f"{where}: no composed layers ({analysis.checkpoint.adapter_type}): {kind} needs a composition "
            "(a composition.json manifest, --compose, a BoostLoRA checkpoint, or HydraLoRA)"
        )
    if kind == "alignment":
        aligned = [r for r in composed if r.alignment]
        name = _one_layer([r.name for r in aligned] or [composed[0].name], layer_names, "alignment", str(where))
        return figures.alignment_figure(next(r for r in composed if r.name == name), width=width)
    if kind == "weights":
        return figures.weights_figure(analysis, width=width)
    return figures.growth_figure(analysis, metric=metric, width=width)


@click.command()
@click.argument("kind", type=click.Choice((*KINDS, *RUN_KINDS)), metavar="KIND")
@click.argument("paths", nargs=-1, required=True)
@click.option(
    "-o",
    "--output",
    required=True,
    metavar="FILE",
    help="The figure file; its suffix (.pdf, .png, .svg) picks the format.",
)
@click.option(
    "--labels", type=CommaList(), metavar="A,B,…", help="Display names, one per checkpoint (default: directory names)."
)
@click.option(
    "--width",
    type=Width(),
    metavar="column|full|INCHES",
    help="Figure width: a paper column (3.25 in), the full text width (6.75 in) or inches. Default: column (full for weights and trajectory-heatmap).",
)
@click.option(
    "--layer",
    "layer_names",
    multiple=True,
    metavar="NAME",
    help="Draw this layer (repeatable for spectrum and energy; one for alignment and subspace-similarity).",
)
@click.option(
    "--metric",
    default=None,
    metavar="NAME",
    help="erank-heatmap, growth, trajectory and trajectory-heatmap: the metric drawn (erank, utilization, stable_rank, count_above[0.005], …). Default erank.",
)
@click.option("--vmin", type=float, metavar="X", help="erank-heatmap: the colour scale's low end (default 0).")
@click.option(
    "--vmax",
    type=float,
    metavar="X",
    help="erank-heatmap: the colour scale's high end (default: 1 for utilization, the largest rank bound for rank-like metrics, else the largest value).",
)
@choice_option(
    "--side", ["right", "left"], "subspace-similarity: compare input (right) or output (left) singular vectors."
)
@drift_k_option("drift")
@checkpoint_options
@analysis_options
@click.option("-q", "--quiet", is_flag=True, help="No progress bar or notes; errors and warnings only.")
@handle_errors
def plot(kind: str, paths: tuple[str, ...], output: str, labels, width, layer_names, metric, vmin, vmax, side, drift_k, quiet: bool, **options) -> None:  # fmt: skip
    """Draw one figure of the adapters at PATHS into FILE (-o), paper-ready: vector PDF with embedded TrueType
    fonts, 7–9 pt text, colour-blind-safe colours with line styles that survive black-and-white print.

    \b
    KIND is one of:
      spectrum             singular values per layer, log scale, checkpoints overlaid (τ and rank bounds marked)
      energy               cumulative energy curves Σσ²
      count-above          count of σ > τ per layer index, one series per checkpoint (--threshold τ)
      erank-heatmap        a metric over layer index × module type (--metric), a panel per checkpoint
      alignment            k×k overlap and cosine of a composed layer's components (--layer)
      weights              composition weights and energy shares per layer
      growth               effective rank against the number of components (sequential compositions)
      subspace-similarity  the LoRA paper's φ(i, j) grid between one layer of two checkpoints (--layer, --side)
      resize               energy kept against total rank: the best at each size, rank rules, the present size
      base-heatmap         relative update ‖ΔW‖_F/‖W₀‖_F and intruder counts over layer index × module type (--base)
      trajectory           a metric against training step, mean per module type (--metric; PATHS as `trajectory`)
      trajectory-heatmap   a metric of every layer (rows) at every step (columns) of a run (--metric)
      drift                subspace drift vs the previous and the final step, and the relative change, against step

    The last three draw a training run: PATHS are what `rankscope trajectory` reads (a Trainer output_dir, a
    folder of Lightning checkpoints, several checkpoints, or the callback's JSONL, which has no drift).

    Many layers are summarised by module type (median and quartiles, or one panel per type), never a legend with
    hundreds of entries.
    """
    from pathlib import Path

    suffix = Path(output).suffix.lower()
    if suffix not in SUFFIXES:
        raise click.UsageError(f"-o {output}: the suffix must be one of {', '.join(SUFFIXES)} (it picks the format)")
    if kind in RUN_KINDS and labels is not None:
        raise click.UsageError(f"--labels names compared checkpoints; {kind} draws the steps of a run")
    labels = _labels(paths, labels)
    if kind in ONE_CHECKPOINT and len(paths) != 1:
        raise click.UsageError(f"{kind} draws one checkpoint, got {len(paths)}")
    if metric is not None and kind not in METRIC_KINDS:
        raise click.UsageError(f"--metric applies to {', '.join(METRIC_KINDS[:-1])} and {METRIC_KINDS[-1]}, not {kind}")
    if (vmin is not None or vmax is not None) and kind != "erank-heatmap":
        raise click.UsageError(f"--vmin/--vmax apply to erank-heatmap, not {kind}")
    if drift_k is not None and kind != "drift":
        raise click.UsageError(f"--drift-k applies to drift, not {kind}")
    if layer_names and kind not in ("spectrum", "energy", "alignment", "subspace-similarity"):
        raise click.UsageError(f"--layer applies to spectrum, energy, alignment and subspace-similarity, not {kind}")
    from ..figures import save_figure

    if kind == "subspace-similarity":
        fig = _subspace_figure(paths, labels, layer_names, side, width, options)
    elif kind in RUN_KINDS:
        fig = _run_figure(kind, paths, metric, width, quiet, options, drift_k)
    else:
        analyses = []
        for path in paths:
            checkpoint, settings = load_and_settings(path, options)
            analyses.append(run_analysis(checkpoint, settings, quiet=quiet))
        threshold = options["thresholds"][0] if options["thresholds"] else None
        fig = _figure(kind, analyses, labels, layer_names, metric or "erank", width, threshold, (vmin, vmax))
        for analysis in analyses:
            report_problems(analysis, quiet=True)
    written = save_figure(fig, output, formats=(suffix[1:],))
    if not quiet:
        note(f"wrote {written[0]}")
