"""``rankscope spectrum``: per-layer spectra and effective ranks."""

from __future__ import annotations

import sys

import click

from .app import EXIT_INPUT, distinct_outputs, error, handle_errors, write_outputs
from .options import (
    analysis_options,
    checkpoint_options,
    load_and_settings,
    output_option,
    report_problems,
    run_analysis,
)


@click.command()
@click.argument("path")
@output_option("--json", "Write the JSON report to FILE ('-': stdout; the table goes to stderr).")
@output_option("--csv", "Write one CSV row per layer to FILE ('-': stdout).")
@checkpoint_options
@analysis_options
@click.option(
    "--strict",
    is_flag=True,
    help="Exit 1 when any layer is invalid or any module with adapter weights is not analysed.",
)
@click.option("-q", "--quiet", is_flag=True, help="No table, summary or progress bar; errors and warnings only.")
@handle_errors
def spectrum(path: str, json_out, csv_out, strict: bool, quiet: bool, **options) -> None:  # fmt: skip
    """Per-layer singular-value spectra and effective ranks of the adapter at PATH.

    PATH is a PEFT adapter directory, a directory of several adapters, a .safetensors/.bin file, or a
    composition manifest (composition.json).
    """
    distinct_outputs(json=json_out, csv=csv_out)
    checkpoint, settings = load_and_settings(path, options)
    analysis = run_analysis(checkpoint, settings, quiet=quiet)
    from ..analysis.documents import spectrum_document
    from ..report.csv import layers_csv
    from ..report.json import dumps

    write_outputs([(json_out, lambda: dumps(spectrum_document(analysis))), (csv_out, lambda: layers_csv(analysis))])
    if not quiet:
        from ..report.terminal import composition_summary, spectrum_summary, spectrum_table

        to_stderr = "-" in (json_out, csv_out)
        click.echo(spectrum_table(analysis), err=to_stderr)
        click.echo("", err=to_stderr)
        click.echo(spectrum_summary(analysis), err=to_stderr)
        summary = composition_summary(analysis)
        if summary:
            click.echo("", err=to_stderr)
            click.echo(summary, err=to_stderr)
    report_problems(analysis, quiet=quiet)
    missing = analysis.checkpoint.not_analysed
    if strict and (analysis.invalid or missing):
        error(f"{len(analysis.invalid)} invalid layer(s) and {len(missing)} module(s) not analysed (--strict)")
        sys.exit(EXIT_INPUT)
