"""``rankscope report``: a folder that stands alone — an HTML page, CSV, JSON, Markdown and the figures."""

from __future__ import annotations

import click

from .app import handle_errors, note, warn
from .folders import figures_option, folder_option, read_figure_formats
from .options import (
    CommaList,
    analyse_paths,
    analysis_options,
    checkpoint_options,
    drift_k_option,
    drift_threshold_option,
    report_problems,
)

RUN_ONLY = ("drift_threshold", "drift_k")  # options of a training run's report


@click.command()
@click.argument("paths", nargs=-1, required=True)
@folder_option("The report folder (index.html, layers.csv, summary.json, summary.md, figures/).")
@figures_option("Figure files to write under figures/ (the page has its figures inline either way).")
@click.option(
    "--labels", type=CommaList(), metavar="A,B,…", help="Display names, one per checkpoint (default: directory names)."
)
@click.option("--force", is_flag=True, help="Replace DIR even when it exists and rankscope did not write it.")
@click.option(
    "--suggest-rule",
    default="energy:0.95",
    show_default=True,
    metavar="RULE|none",
    help="The rank rule of each layer's suggested rank (the layer table, layers.csv, summary.md) and of the resize "
    "figure, as 'rankscope suggest --rule' takes it (energy:P, fixed:K, sv_ratio:X, erank, params:N, …); none: "
    "neither.",
)
@click.option(
    "--jobs",
    type=click.IntRange(min=1),
    metavar="N",
    help="Processes drawing the figures (default: one per core, at most 8; 1: this process only). Forked helpers "
    "on Linux; elsewhere one process draws them.",
)
@drift_threshold_option("A training run's report")
@drift_k_option("A training run's report")
@checkpoint_options
@analysis_options
@click.option("-q", "--quiet", is_flag=True, help="No progress bars or closing line; errors and warnings only.")
@handle_errors
def report(paths: tuple[str, ...], out_dir: str, figure_formats, labels, force: bool, suggest_rule: str, jobs, drift_threshold: float, drift_k, quiet: bool, **options) -> None:  # fmt: skip
    """Write a report of the adapter(s) at PATHS to the folder DIR: a self-contained index.html (summary, effective-rank
    heatmap, spectra, a sortable per-layer table, per-layer detail, composition and comparison sections), layers.csv,
    summary.json, summary.md and figures/. Several PATHS are compared layer by layer.

    One PATH that is a training run (checkpoint-N/ folders, Lightning step=N.ckpt files) gives the run's report: a
    trajectory page (headlines, steps, figures) with the final checkpoint's report in final/. One PATH that is a
    `rankscope sweep` output folder (checkpoints and layers tables) gives the zoo's report: distributions,
    erank against r, outliers and a sortable per-checkpoint table."""
    from ..report.bundle import COMMIT, check_target, write_report
    from .interrupt import commit

    formats = read_figure_formats(figure_formats)
    if labels is not None and len(labels) != len(paths):
        raise click.UsageError(f"--labels gives {len(labels)} names for {len(paths)} checkpoints")
    from ..core.errors import UsageProblem
    from ..report.resize_base import suggestion_rule

    try:
        rule = suggestion_rule(suggest_rule)  # a bad rule fails before any file is read
    except UsageProblem as exc:
        raise click.BadParameter(str(exc), param_hint="--suggest-rule") from None
    from ..core.forked import default_processes

    # the run report's final/ is the usual report: the same report options
    final = {"suggest_rule": rule, "processes": jobs or default_processes()}
    drift = {"drift_threshold": drift_threshold, "drift_k": drift_k}
    if len(paths) == 1 and _runs_or_sweeps(paths[0], out_dir, formats, labels, force, quiet, options, final, drift):
        return
    ctx = click.get_current_context()
    given = [name for name in RUN_ONLY if ctx.get_parameter_source(name) != click.core.ParameterSource.DEFAULT]
    if given:
        raise click.UsageError(f"--{given[0].replace('_', '-')} applies to a training run's report (one PATH with "
                               "checkpoint-N/ folders or step=N.ckpt files), not to adapters")  # fmt: skip
    guarded = [*paths, *([options["base"]] if options.get("base") else [])]
    check_target(out_dir, guarded, force=force)  # before the analysis: a refusal should not wait for it
    # forked now, with torch imported: a helper gets ready to draw while the checkpoints are read and analysed
    with _figure_helpers(final["processes"]) as helpers:
        analyses, labels, progress = analyse_paths(paths, labels, options, quiet=quiet)
        several = len(analyses) > 1

        def phase(name: str) -> None:
            progress.phase(name)
            if name == COMMIT:
                commit()  # from here on a Ctrl-C no longer stops the run: the report is moved into place

        try:
            warnings = write_report(
                analyses, out_dir, labels=labels, formats=formats, force=force, progress=progress, phase=phase,
                helpers=helpers, **final,
            )  # fmt: skip
        finally:
            progress.close()
    for message in warnings:
        warn(message)
    for label, analysis in zip(labels, analyses, strict=True):
        report_problems(analysis, quiet=True, where=label if several else None)
    if not quiet:
        layers = sum(len(a.layers) for a in analyses)
        note(f"report written to {out_dir}/index.html ({layers} layers; also layers.csv, summary.json, summary.md"
             f"{', figures/' if formats else ''})")  # fmt: skip


def _figure_helpers(processes: int):
    """:class:`~rankscope.core.forked.ForkedHelpers` for ``processes`` drawing processes — matplotlib imported and
    fonts loaded while the command reads and analyses — as a context that stops them; ``nullcontext(None)`` for
    one process, where there is no fork, or where forking fails (this process then draws)."""
    import contextlib

    from ..core.forked import ForkedHelpers, fork_available

    if processes <= 1 or not fork_available():
        return contextlib.nullcontext(None)
    from ..report.drawing import prepare_to_draw

    try:
        return ForkedHelpers(processes, prepare_to_draw)
    except OSError:  # no process to spare (EAGAIN, ENOMEM): the figures are drawn here
        return contextlib.nullcontext(None)


def _runs_or_sweeps(path: str, out_dir: str, formats, labels, force, quiet, options: dict, final: dict, drift: dict) -> bool:  # fmt: skip
    """The report of a sweep folder or of a training run when PATH is one (True: written), else False."""
    from pathlib import Path

    from ..report.sweep import sweep_table_format
    from ..trajectory.discover import run_checkpoints

    if sweep_table_format(path) is not None:
        _sweep_report(path, out_dir, formats, labels, force, quiet)
        return True
    entries = run_checkpoints(Path(path))
    if entries is None:
        return False
    if labels is not None:
        raise click.UsageError("--labels names compared checkpoints; a training run's report takes none")
    own = sorted(Path(path).glob("adapter_model.*"))
    if own and not quiet:  # a Trainer output_dir often holds the final save too: say which report this is
        note(f"{path} holds checkpoint-N/ folders: reporting the run (its own {own[0].name} is not in the trajectory;"
             f" give {own[0]} for a report of that adapter alone)")  # fmt: skip
    _run_report(path, entries, out_dir, formats, force, quiet, options, final, drift)
    return True


def _sweep_report(path: str, out_dir: str, formats, labels, force: bool, quiet: bool) -> None:
    from ..report.bundle import COMMIT
    from ..report.sweep import write_sweep_report
    from .interrupt import commit

    ctx = click.get_current_context()
    given = [name for name, value in ctx.params.items()
             if name not in ("paths", "out_dir", "figure_formats", "force", "quiet") and value is not None
             and ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE]  # fmt: skip
    if given:
        option = next(p.opts[0] for p in ctx.command.params if p.name == given[0])
        raise click.UsageError(f"{option} does not apply to a sweep folder: its report reads the sweep's tables "
                               "(reading and analysis options go to `rankscope sweep`)")  # fmt: skip
    counts = write_sweep_report(path, out_dir, formats=formats, force=force,
                                phase=lambda name: name == COMMIT and commit())  # fmt: skip
    if not quiet:
        note(f"sweep report written to {out_dir}/index.html ({counts['checkpoints']} checkpoints, {counts['layers']} "
             f"layer rows, {counts['outliers']} outliers; also outliers.csv, checkpoints.csv"
             f"{', figures/' if formats else ''})")  # fmt: skip


def _run_report(path: str, entries, out_dir: str, formats, force, quiet, options: dict, final: dict, drift: dict) -> None:  # fmt: skip
    """The run's page (``drift``: ``--drift-threshold`` and ``--drift-k``, as ``rankscope trajectory`` takes them) and
    the final checkpoint's report in final/."""
    from ..report.bundle import COMMIT, check_target
    from ..report.trajectory import write_run_report
    from ..trajectory.build import checkpoint_trajectory
    from ..trajectory.document import trajectory_document
    from .interrupt import commit
    from .options import load_and_settings

    check_target(out_dir, [path, *(p for _, p in entries)], force=force)  # before the analysis
    analyses, _, progress = analyse_paths([str(entries[-1][1])], None, options, quiet=quiet)
    try:
        # the final checkpoint is read and analysed once: final/ and the trajectory's last step share it
        trajectory = checkpoint_trajectory(entries, analyses[0].options, final=analyses[0],
                                           load=lambda p: load_and_settings(str(p), options)[0],
                                           drift_k=drift["drift_k"], progress=progress.phase)  # fmt: skip
        document = trajectory_document(trajectory, drift_threshold=drift["drift_threshold"])

        def phase(name: str) -> None:
            progress.phase(name)
            if name == COMMIT:
                commit()

        warnings = write_run_report(path, trajectory, document, analyses[0], out_dir, formats=formats, force=force,
                                    progress=progress, phase=phase, final_options=final)  # fmt: skip
    finally:
        progress.close()
    for message in [*trajectory.warnings, *warnings]:
        warn(message)
    report_problems(analyses[0], quiet=True)
    if not quiet:
        steps = f"steps {entries[0][0]}–{entries[-1][0]}" if len(entries) > 1 else f"step {entries[0][0]}"
        note(f"run report written to {out_dir}/index.html ({len(entries)} checkpoint{'s' * (len(entries) > 1)}, "
             f"{steps}; the final checkpoint's report in {out_dir}/final/; also trajectory.json, "
             f"trajectory.csv{', figures/' if formats else ''})")  # fmt: skip
