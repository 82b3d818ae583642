"""``rankscope compare``: two or more checkpoints of the same base, layer by layer."""

from __future__ import annotations

import click

from .app import distinct_outputs, handle_errors, output_width, warn, write_outputs
from .options import CommaList, analyse_paths, analysis_options, checkpoint_options, output_option, report_problems


@click.command()
@click.argument("paths", nargs=-1, required=True)
@click.option(
    "--labels", type=CommaList(), metavar="A,B,…", help="Display names, one per checkpoint (default: directory names)."
)
@output_option("--json", "Write the comparison JSON to FILE ('-': stdout).")
@output_option("--csv", "Write one CSV row per matched layer to FILE ('-': stdout).")
@output_option("--markdown", "Write Markdown tables to FILE ('-': stdout).")
@checkpoint_options
@analysis_options
@click.option("--baseline", metavar="LABEL", help="The checkpoint the ratios are to (a label; default: the first).")
@click.option("--no-alignment", is_flag=True, help="Side-by-side metrics only: skip aligning the updates (faster).")
@click.option("-q", "--quiet", is_flag=True, help="No table or progress bar.")
@handle_errors
def compare(
    paths: tuple[str, ...],
    labels,
    json_out,
    csv_out,
    markdown_out,
    no_alignment: bool,
    baseline,
    quiet: bool,
    **options,
) -> None:
    """Compare the adapters at PATHS (two or more, same base model) layer by layer: spectra, effective ranks,
    rank per parameter, and whether they learn the same directions."""
    from ..analysis.comparison import compare as compare_analyses

    if len(paths) < 2:
        raise click.UsageError("compare needs at least two checkpoints")
    if labels is not None and len(labels) != len(paths):
        raise click.UsageError(f"--labels gives {len(labels)} names for {len(paths)} checkpoints")
    distinct_outputs(json=json_out, csv=csv_out, markdown=markdown_out)
    analyses, labels, progress = analyse_paths(paths, labels, options, quiet=quiet)
    progress.phase("comparing")
    try:
        comparison = compare_analyses(
            analyses, labels, alignment=not no_alignment, baseline=baseline, progress=progress
        )
    finally:
        progress.close()
    for message in comparison.warnings:
        warn(message)
    from ..analysis.documents import comparison_document
    from ..report.csv import comparison_csv
    from ..report.json import dumps
    from ..report.markdown import comparison_markdown

    write_outputs(
        [
            (json_out, lambda: dumps(comparison_document(comparison))),
            (csv_out, lambda: comparison_csv(comparison)),
            (markdown_out, lambda: comparison_markdown(comparison)),
        ]
    )
    if not quiet:
        from ..report.terminal import comparison_summary, comparison_table

        to_stderr = "-" in (json_out, csv_out, markdown_out)
        width = output_width(err=to_stderr)
        click.echo(comparison_table(comparison, width), err=to_stderr)
        click.echo("", err=to_stderr)
        click.echo(comparison_summary(comparison, width), err=to_stderr)
    for label, analysis in zip(labels, analyses, strict=True):
        report_problems(analysis, quiet=True, where=label)
