"""``rankscope trajectory``: spectra of a training run's checkpoints against step, and how far each moved."""

from __future__ import annotations

from pathlib import Path

import click

from .app import distinct_outputs, handle_errors, note, warn, write_outputs
from .options import (
    ANALYSIS_KEYS,
    CommaList,
    analysis_options,
    analysis_settings,
    checkpoint_options,
    load_checkpoint,
    output_option,
)

FIGURES = ("metric_by_step", "layer_step_heatmap", "drift")


@click.command()
@click.argument("paths", nargs=-1, required=True)
@output_option("--json", "Write the rankscope.trajectory/1 document to FILE ('-': stdout).")
@output_option("--csv", "Write one CSV row per step and layer to FILE ('-': stdout).")
@click.option(
    "-o",
    "--output",
    "out_dir",
    metavar="DIR",
    help="Write trajectory.json, trajectory.csv and figures/ to DIR, all or nothing.",
)
@click.option(
    "--figures",
    "figure_formats",
    type=CommaList(),
    default="pdf,png",
    show_default=True,
    metavar="pdf,png,svg",
    help="With -o: the figure files to write.",
)
@click.option("--force", is_flag=True, help="With -o: replace DIR even when rankscope did not write it.")
@click.option(
    "--drift-threshold",
    type=click.FloatRange(0, 1),
    default=0.05,
    show_default=True,
    metavar="D",
    help="The run has settled from the first step whose mean subspace drift against the previous checkpoint stays below D.",
)
@click.option(
    "--drift-k",
    type=click.IntRange(min=1),
    metavar="K",
    help="Compare the top K singular vectors (default: the smaller numerical rank of the two steps).",
)
@checkpoint_options
@analysis_options
@click.option("-q", "--quiet", is_flag=True, help="No table or headlines; errors and warnings only.")
@handle_errors
def trajectory(paths, json_out, csv_out, out_dir, figure_formats, force, drift_threshold, drift_k, quiet, **options):  # fmt: skip
    """Follow the spectra of a training run: per layer and module type, every metric against step; between
    consecutive checkpoints the subspace drift and the relative change ‖ΔW_t − ΔW_{t−1}‖_F/‖ΔW_t‖_F.

    PATHS: a transformers Trainer output_dir (its checkpoint-N/ folders; the step from trainer_state.json), a
    folder of Lightning checkpoints (epoch=E-step=N.ckpt), several checkpoints (put in natural order:
    500 < 1000 < 1500), or the JSONL a RankscopeCallback wrote (σ only: no drift).
    """
    from ..trajectory.build import checkpoint_trajectory, jsonl_trajectory
    from ..trajectory.document import trajectory_document, trajectory_table

    distinct_outputs(json=json_out, csv=csv_out)
    formats = _figure_formats(figure_formats)
    if out_dir:
        from ..report.bundle import check_target

        check_target(out_dir, paths, force=force)  # before the analysis: a refusal should not wait for it
    settings = analysis_settings(**{k: v for k, v in options.items() if k in ANALYSIS_KEYS})
    reading = {k: v for k, v in options.items() if k not in ANALYSIS_KEYS}
    jsonl = _jsonl_input(paths)
    if jsonl is not None:
        result = jsonl_trajectory(jsonl, settings)
    else:
        from ..report.progress import Progress
        from .interrupt import check

        entries = _checkpoints(paths)
        progress = Progress(enabled=not quiet, check=check)
        try:
            result = checkpoint_trajectory(entries, settings, load=lambda path: load_checkpoint(str(path), **reading),
                                           drift_k=drift_k, progress=progress.phase)  # fmt: skip
        finally:
            progress.close()  # before any message: a warning starts on a clean line
    for message in result.warnings:
        warn(message)
    if not quiet:
        for message in result.notes:
            note(f"note: {message}")
    document = trajectory_document(result, drift_threshold=drift_threshold)
    from ..report.csv import table_csv
    from ..report.json import dumps

    outputs = [(json_out, lambda: dumps(document)), (csv_out, lambda: table_csv(*trajectory_table(result)))]
    if out_dir:
        from ..report.bundle import check_target, commit_folder, staged_folder

        target = check_target(out_dir, [p.path for p in result.points], force=force)
        with staged_folder(target) as staging:  # the folder goes in place after the other outputs are written
            files = _folder_files(staging, result, document, formats)
            write_outputs(outputs)
            commit_folder(staging, target, files)
    else:
        write_outputs(outputs)
    if not quiet:
        to_stderr = "-" in (json_out, csv_out)
        click.echo(_summary(document), err=to_stderr)
        if out_dir:
            note(f"trajectory written to {out_dir} (trajectory.json, trajectory.csv{', figures/' if formats else ''})")


def _figure_formats(given) -> tuple[str, ...]:
    from ..report.bundle import FIGURE_FORMATS

    formats = () if tuple(given) == ("none",) else tuple(dict.fromkeys(f.lower() for f in given))
    unknown = [f for f in formats if f not in FIGURE_FORMATS]
    if unknown:
        raise click.BadParameter(f"{unknown[0]!r} is not one of pdf, png, svg (or 'none')", param_hint="--figures")
    return formats


def _jsonl_input(paths) -> Path | None:
    """The callback's JSONL, when that is what PATHS name (one ``.jsonl`` file); several, or mixed: usage error."""
    jsonl = [p for p in paths if p.endswith(".jsonl")]
    if not jsonl:
        return None
    if len(paths) > 1:
        raise click.UsageError("a callback JSONL is read on its own: give one .jsonl file and no other path")
    return Path(jsonl[0])


def _checkpoints(paths) -> list[tuple[int, Path]]:
    from ..core.errors import CheckpointError
    from ..trajectory.discover import ordered_paths, run_checkpoints

    for path in paths:
        if not Path(path).exists():
            raise CheckpointError("no such file or directory", path=path)
    runs = [run_checkpoints(Path(p)) for p in paths]
    if all(run is not None for run in runs):
        return [entry for run in runs for entry in run]
    if any(run is not None for run in runs):
        named = paths[next(i for i, run in enumerate(runs) if run is not None)]
        raise click.UsageError(f"{named} is a run folder: give run folders or checkpoints, not both")
    if len(paths) == 1:
        raise CheckpointError(
            "not a training run: no checkpoint-N/ folders and no Lightning step=N.ckpt files "
            "(give the run's output_dir, or two or more checkpoints)",
            path=paths[0],
        )
    return ordered_paths([Path(p) for p in paths])


def _summary(document: dict) -> str:
    """A step table (total count above τ, mean drift and change) and the headlines."""
    heads = document["headlines"]
    drift = {entry["step"]: entry for entry in document["step_drift"]}
    tau = heads["count_threshold"]
    lines = [f"{'step':>8}  {'σ>' + format(tau, 'g') + ' (all layers)':>20}  {'drift vs t−1':>12}  {'change':>8}"]
    for point, count in zip(document["checkpoints"], heads["rank_counts"], strict=True):
        entry = drift.get(point["step"], {})
        cells = [_fmt(entry.get("drift_previous")), _fmt(entry.get("relative_change"))]
        lines.append(f"{point['step']:>8}  {count:>20}  {cells[0]:>12}  {cells[1]:>8}")
    if heads["drift_available"]:
        settled = heads["settled_step"]
        lines.append(
            f"settled: from step {settled} the subspace drift stays below {heads['drift_threshold']:g}"
            if settled is not None
            else f"not settled: the subspace drift is still ≥ {heads['drift_threshold']:g} at the last step"
        )
    if heads["still_growing"]:
        lines.append(f"rank still growing: the count above τ = {tau:g} rose into the last step")
    else:
        lines.append(f"rank saturated at step {heads['saturation_step']}: no later step has more σ above τ = {tau:g}")
    return "\n".join(lines)


def _fmt(value) -> str:
    return "" if value is None else f"{value:.3f}"


def _folder_files(staging: Path, result, document: dict, formats) -> dict[str, str]:
    """The -o folder's figures, drawn into ``staging``; returns its text files (trajectory.json, trajectory.csv)."""
    from ..figures import trajectory as F
    from ..figures._common import FigureInputError
    from ..figures.output import save_figure
    from ..report.csv import table_csv
    from ..report.json import dumps
    from ..trajectory.document import trajectory_table

    drawers = {"metric_by_step": F.metric_by_step_figure, "layer_step_heatmap": F.layer_step_heatmap,
               "drift": F.drift_figure}  # fmt: skip
    if formats:
        (staging / "figures").mkdir()
        for name in FIGURES:
            try:
                figure = drawers[name](result)
            except FigureInputError as exc:
                warn(f"figure {name} not drawn: {exc}")
                continue
            save_figure(figure, staging / "figures" / name, formats)
    return {"trajectory.json": dumps(document), "trajectory.csv": table_csv(*trajectory_table(result))}
