"""``rankscope components``: per-layer components of a composition, their alignment and concentration."""

from __future__ import annotations

import click

from .app import distinct_outputs, handle_errors, write_outputs
from .options import analysis_options, checkpoint_options, load_and_settings, report_problems, run_analysis


@click.command()
@click.argument("path")
@click.option("--json", "json_out", metavar="FILE", help="Write the components JSON to FILE ('-': stdout).")
@click.option(
    "--csv", "csv_out", metavar="FILE", help="Write one CSV row per (layer, component) to FILE ('-': stdout)."
)
@checkpoint_options
@analysis_options
@click.option("-q", "--quiet", is_flag=True, help="No table or progress bar.")
@handle_errors
def components(path: str, json_out, csv_out, quiet: bool, **options) -> None:
    """The components of each composed layer at PATH (a composition manifest, a BoostLoRA file, --compose, or
    HydraLoRA): weights and energy shares with their concentration, ranks, alignment and rank gain."""
    distinct_outputs(json=json_out, csv=csv_out)
    checkpoint, settings = load_and_settings(path, options)
    analysis = run_analysis(checkpoint, settings, quiet=quiet)
    if not any(record.components is not None for record in analysis.layers):
        from ..core.errors import RankscopeError

        raise RankscopeError(f"{checkpoint.path}: no composed layers: this is a {checkpoint.adapter_type} checkpoint")
    from ..report.csv import components_csv
    from ..report.json import components_document, dumps

    write_outputs(
        [(json_out, lambda: dumps(components_document(analysis))), (csv_out, lambda: components_csv(analysis))]
    )
    if not quiet:
        from ..report.terminal import components_table, composition_summary

        to_stderr = "-" in (json_out, csv_out)
        click.echo(components_table(analysis), err=to_stderr)
        click.echo("", err=to_stderr)
        click.echo(composition_summary(analysis), err=to_stderr)
    report_problems(analysis, quiet=quiet)
