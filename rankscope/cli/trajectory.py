"""``rankscope trajectory``: spectra of a training run's checkpoints against step, and how far each moved."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from .app import distinct_outputs, handle_errors, note, warn, write_outputs
from .folders import figures_option, folder_option, read_figure_formats
from .options import (
    ANALYSIS_KEYS,
    analysis_options,
    analysis_settings,
    checkpoint_options,
    drift_k_option,
    drift_threshold_option,
    load_checkpoint,
    output_option,
)

if TYPE_CHECKING:
    from ..trajectory.build import Trajectory


@click.command()
@click.argument("paths", nargs=-1, required=True)
@output_option("--json", "Write the rankscope.trajectory/1 document to FILE ('-': stdout).")
@output_option("--csv", "Write one CSV row per step and layer to FILE ('-': stdout).")
@folder_option("Write the run's page to DIR, all or nothing: index.html (headlines, figures, the step table; "
               "as `rankscope report RUN_DIR` writes it, without final/), trajectory.json, trajectory.csv and "
               "figures/.", required=False)  # fmt: skip
@figures_option("With -o: the figure files to write under figures/ (the page has its figures inline either way).")
@click.option("--force", is_flag=True, help="With -o: replace DIR even when rankscope did not write it.")
@drift_threshold_option()
@drift_k_option()
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
    from ..trajectory.document import trajectory_document, trajectory_table

    distinct_outputs(json=json_out, csv=csv_out)
    formats = read_figure_formats(figure_formats)
    if out_dir:
        from ..report.bundle import check_target

        check_target(out_dir, paths, force=force)  # before the analysis: a refusal should not wait for it
    result = read_trajectory(paths, options, drift_k=drift_k, quiet=quiet)
    document = trajectory_document(result, drift_threshold=drift_threshold)
    from ..report.csv import table_csv
    from ..report.json import dumps

    outputs = [(json_out, lambda: dumps(document)), (csv_out, lambda: table_csv(*trajectory_table(result)))]
    if out_dir:
        from ..report.bundle import COMMIT
        from ..report.trajectory import write_run_report

        def phase(name: str) -> None:
            if name == COMMIT:  # the folder goes in place after the other outputs are written
                write_outputs(outputs)

        source = paths[0] if len(paths) == 1 else f"{paths[0]} … {paths[-1]}"
        for message in write_run_report(source, result, document, None, out_dir, formats=formats, force=force,
                                        phase=phase, inputs=paths):  # fmt: skip
            warn(message)
    else:
        write_outputs(outputs)
    if not quiet:
        to_stderr = "-" in (json_out, csv_out)
        click.echo(_summary(document), err=to_stderr)
        if out_dir:
            note(f"trajectory written to {out_dir} (index.html, trajectory.json, trajectory.csv"
                 f"{', figures/' if formats else ''})")  # fmt: skip


def read_trajectory(paths, options: dict, *, drift_k: int | None = None, quiet: bool = False) -> Trajectory:
    """The trajectory PATHS name (a run folder, checkpoints, or one callback JSONL), read and analysed with the
    command's reading and analysis ``options`` under a progress line; its warnings (and, unless quiet, notes)
    said on stderr. ``rankscope trajectory`` and the trajectory kinds of ``rankscope plot`` read through it."""
    from ..trajectory.build import checkpoint_trajectory, jsonl_trajectory

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
    return result


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
