"""The ``rankscope`` command: parse, call the library, render, map errors to exit codes.

Exit codes: 0 success (also with invalid layers, which are listed; ``--strict`` makes that 1), 1 the input
cannot be analysed (one line on stderr, never a traceback), 2 usage errors.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable

import click

from . import __version__
from .errors import RankscopeError, one_line

EXIT_INPUT = 1


def _error(message: str) -> None:
    click.echo(f"rankscope: error: {one_line(message)}", err=True)


def _warn(message: str) -> None:
    click.echo(f"rankscope: warning: {one_line(message, 600)}", err=True)


def handle_errors(command: Callable) -> Callable:
    """Turn rankscope's errors (and anything unexpected) into one line on stderr and exit code 1."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except RankscopeError as exc:
            _error(str(exc))
        except KeyboardInterrupt:
            click.echo("rankscope: interrupted; nothing written", err=True)
            sys.exit(130)
        except (click.exceptions.Exit, click.ClickException, SystemExit):
            raise
        except Exception as exc:
            if os.environ.get("RANKSCOPE_DEBUG"):
                raise
            _error(f"internal error: {type(exc).__name__}: {exc} (set RANKSCOPE_DEBUG=1 for the traceback)")
        sys.exit(EXIT_INPUT)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="rankscope")
def main() -> None:
    """How much rank does a low-rank adapter actually use, and where?"""


@main.command()
@click.argument("path")
@click.option(
    "--json", "json_out", metavar="FILE", help="Write the JSON report to FILE ('-': stdout; the table goes to stderr)."
)
@click.option("--csv", "csv_out", metavar="FILE", help="Write one CSV row per layer to FILE ('-': stdout).")
@click.option(
    "--threshold",
    "thresholds",
    type=float,
    multiple=True,
    metavar="τ",
    help="Count σ > τ (absolute); repeatable. Default 0.005.",
)
@click.option(
    "--energy",
    "energies",
    type=float,
    multiple=True,
    metavar="P",
    help="Energy rank at fraction P; repeatable. Default 0.9 0.95 0.99.",
)
@click.option(
    "--rel-threshold",
    "rel_thresholds",
    type=float,
    multiple=True,
    metavar="ρ",
    help="Count σ > ρ·σ₁; repeatable. Default 0.001.",
)
@click.option("--layers", metavar="REGEX", help="Analyse only layers whose name matches REGEX (re.search).")
@click.option("--adapter", metavar="NAME", help="Pick one adapter of a multi-adapter directory by name.")
@click.option("--alpha", type=float, help="LoRA α where the checkpoint does not say (overrides the config's).")
@click.option(
    "--format",
    "format_name",
    metavar="NAME",
    help="Force a checkpoint format instead of detecting it (see 'rankscope formats').",
)
@click.option(
    "--base",
    metavar="PATH",
    help="Base model (Hugging Face model directory or safetensors file) for updates that need it (DoRA, IA3).",
)
@click.option("--directional-only", is_flag=True, help="DoRA without its base: analyse s·B·A alone (labelled so).")
@click.option(
    "--trust-pickle",
    is_flag=True,
    help="Unpickle a .bin/.pt/.ckpt in full when weights_only refuses it. Runs code from the file: only for your own files.",
)
@click.option("--unscaled", is_flag=True, help="Analyse B·A without α/r (labelled so in every output).")
@click.option("--dense", is_flag=True, help="Materialise ΔW and take a dense SVD instead of the exact factored path.")
@click.option(
    "--dense-dtype",
    type=click.Choice(["float64", "float32"]),
    default="float64",
    show_default=True,
    help="Dense SVD precision (float32 is faster, labelled approximate).",
)
@click.option("--device", default="auto", show_default=True, metavar="auto|cpu|cuda", help="Where the dense path runs.")
@click.option("--strict", is_flag=True, help="Exit 1 when any layer is invalid.")
@click.option("-q", "--quiet", is_flag=True, help="No table, summary or progress bar; errors and warnings only.")
@handle_errors
def spectrum(path: str, json_out, csv_out, thresholds, energies, rel_thresholds, layers, adapter, alpha, format_name,
             base, directional_only, trust_pickle, unscaled, dense, dense_dtype, device, strict, quiet) -> None:  # fmt: skip
    """Per-layer singular-value spectra and effective ranks of the adapter at PATH.

    PATH is a PEFT adapter directory, a directory of several adapters, or a .safetensors/.bin file.
    """
    from . import metrics
    from .analysis import AnalysisOptions, analyze
    from .formats import load
    from .report.progress import ProgressBar

    options = AnalysisOptions(
        thresholds=tuple(thresholds) or metrics.DEFAULT_THRESHOLDS,
        energies=tuple(energies) or metrics.DEFAULT_ENERGIES,
        rel_thresholds=tuple(rel_thresholds) or metrics.DEFAULT_REL_THRESHOLDS,
        unscaled=unscaled,
        dense=dense,
        dense_dtype=dense_dtype,
        device=device,
        layers=layers,
    )
    if trust_pickle:
        _warn("--trust-pickle: pickled files are loaded in full, which runs any code they hold")
    checkpoint = load(
        path,
        adapter=adapter,
        alpha=alpha,
        format=format_name,
        base=base,
        directional_only=directional_only,
        trust_pickle=trust_pickle,
    )
    bar = ProgressBar("analysing", enabled=not quiet)
    try:
        analysis = analyze(checkpoint, options, progress=bar)
    finally:
        bar.close()
    where = checkpoint.weights_file or checkpoint.path
    invalid = analysis.invalid
    if len(invalid) == len(analysis.layers):
        raise RankscopeError(f"{where}: no layer can be analysed: {invalid[0].error}")
    for message in checkpoint.warnings:
        _warn(f"{checkpoint.path}: {message}")
    if not quiet:
        for message in checkpoint.notes:
            click.echo(f"rankscope: note: {one_line(message, 600)}", err=True)
    _write_outputs(analysis, json_out, csv_out)
    if not quiet:
        from .report.terminal import spectrum_summary, spectrum_table

        to_stderr = "-" in (json_out, csv_out)
        click.echo(spectrum_table(analysis), err=to_stderr)
        click.echo("", err=to_stderr)
        click.echo(spectrum_summary(analysis), err=to_stderr)
    for record in invalid:
        _warn(f"{where}: layer {record.name} is invalid: {record.error}")
    if checkpoint.skipped and not quiet:
        reasons = sorted({s.reason for s in checkpoint.skipped})
        click.echo(f"rankscope: {len(checkpoint.skipped)} tensors not used ({'; '.join(reasons)}); "
                   "listed under 'skipped' in --json", err=True)  # fmt: skip
    if checkpoint.other_adapters:
        click.echo(f"rankscope: this directory also holds adapters: {', '.join(checkpoint.other_adapters)} "
                   "(pick one with --adapter NAME)", err=True)  # fmt: skip
    if strict and invalid:
        _error(f"{len(invalid)} invalid layer(s) (--strict)")
        sys.exit(EXIT_INPUT)


@main.command("formats")
def list_formats() -> None:
    """The checkpoint formats rankscope reads, in the order it tries them."""
    from .formats import formats

    for fmt in formats():
        click.echo(f"{fmt.name:<12} {fmt.description}")


def _write_outputs(analysis, json_out: str | None, csv_out: str | None) -> None:
    """Render every requested output first, then write them: an error leaves no file half-written."""
    from .report.output import write_text

    rendered = []
    if json_out:
        from .report.json import dumps, spectrum_document

        rendered.append((json_out, dumps(spectrum_document(analysis))))
    if csv_out:
        from .report.csv import layers_csv

        rendered.append((csv_out, layers_csv(analysis)))
    for destination, text in rendered:
        try:
            write_text(destination, text)
        except OSError as exc:
            raise RankscopeError(f"{destination}: cannot write ({exc.strerror or exc})") from exc


if __name__ == "__main__":
    main()
