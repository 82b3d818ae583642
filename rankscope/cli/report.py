"""``rankscope report``: a folder that stands alone — an HTML page, CSV, JSON, Markdown and the figures."""

from __future__ import annotations

import click

from .app import handle_errors, note, warn
from .options import CommaList, analyse_paths, analysis_options, checkpoint_options, report_problems


@click.command()
@click.argument("paths", nargs=-1, required=True)
@click.option(
    "-o",
    "--output",
    "out_dir",
    required=True,
    metavar="DIR",
    help="The report folder (index.html, layers.csv, summary.json, summary.md, figures/).",
)
@click.option(
    "--figures",
    "figure_formats",
    type=CommaList(),
    default="pdf,png",
    show_default=True,
    metavar="pdf,png,svg|none",
    help="Figure files to write under figures/ (the page has its figures inline either way).",
)
@click.option(
    "--labels", type=CommaList(), metavar="A,B,…", help="Display names, one per checkpoint (default: directory names)."
)
@click.option("--force", is_flag=True, help="Replace DIR even when it exists and rankscope did not write it.")
@checkpoint_options
@analysis_options
@click.option("-q", "--quiet", is_flag=True, help="No progress bars or closing line; errors and warnings only.")
@handle_errors
def report(paths: tuple[str, ...], out_dir: str, figure_formats, labels, force: bool, quiet: bool, **options) -> None:
    """Write a report of the adapter(s) at PATHS to the folder DIR: a self-contained index.html (summary, effective-rank
    heatmap, spectra, a sortable per-layer table, per-layer detail, composition and comparison sections), layers.csv,
    summary.json, summary.md and figures/. Several PATHS are compared layer by layer."""
    from ..report.bundle import COMMIT, FIGURE_FORMATS, check_target, write_report
    from .interrupt import commit

    formats = () if figure_formats == ("none",) else figure_formats
    unknown = [f for f in formats if f.lower() not in FIGURE_FORMATS]
    if unknown:
        raise click.BadParameter(f"{unknown[0]!r} is not one of pdf, png, svg (or 'none')", param_hint="--figures")
    if labels is not None and len(labels) != len(paths):
        raise click.UsageError(f"--labels gives {len(labels)} names for {len(paths)} checkpoints")
    guarded = [*paths, *([options["base"]] if options.get("base") else [])]
    check_target(out_dir, guarded, force=force)  # before the analysis: a refusal should not wait for it
    analyses, labels, progress = analyse_paths(paths, labels, options, quiet=quiet)
    several = len(analyses) > 1

    def phase(name: str) -> None:
        progress.phase(name)
        if name == COMMIT:
            commit()  # from here on a Ctrl-C no longer stops the run: the report is moved into place

    try:
        warnings = write_report(
            analyses, out_dir, labels=labels, formats=formats, force=force, progress=progress, phase=phase
        )
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
