"""``rankscope suggest``: per-layer ranks by a rule, and the PEFT ``LoraConfig`` fields that give them."""

from __future__ import annotations

import csv
import io
import sys

import click

from .app import EXIT_INPUT, distinct_outputs, error, handle_errors, note, write_outputs
from .options import analysis_options, checkpoint_options, load_and_settings, output_option, run_analysis

RULE_HELP = (
    "How many directions each layer keeps: energy:P, fixed:K, count:τ (σ > τ), rel:ρ (σ > ρ·σ₁), sv_ratio:X "
    "(σ > σ₁/X), sv_fro:P, sv_cumulative:P, erank (⌈erank⌉), params:N (a global budget, e.g. params:2M)."
)
_COLUMNS = ("name", "rank", "current_rank", "retained_energy", "spectral_error", "frobenius_error", "alpha")


def rank_options(function):
    """--max-rank and --min-rank, shared with ``convert``."""
    function = click.option("--min-rank", type=click.IntRange(0), default=0, show_default=True, help="Keep at least this rank in every nonzero layer.")(function)  # fmt: skip
    return click.option("--max-rank", type=click.IntRange(1), help="Keep at most this rank in any layer.")(function)


def suggestion_table(suggestion) -> str:
    """The terminal table: one row per layer, then the totals and the LoraConfig fields."""
    rows = [("layer", "rank", "now", "energy kept", "σ_{k+1}", "‖error‖_F", "α")]
    for layer in suggestion.layers:
        rows.append(
            (
                layer.name,
                str(layer.rank),
                str(layer.current_rank),
                f"{layer.retained_energy:.2%}",
                f"{layer.spectral_error:.3g}",
                f"{layer.frobenius_error:.3g}",
                f"{layer.alpha:g}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))) for row in rows]  # fmt: skip
    lines.insert(1, "  ".join("-" * w for w in widths))
    rule = str(suggestion.rule) if suggestion.rule is not None else "lossless"
    lines += [
        "",
        f"rule {rule}: total rank {sum(x.rank for x in suggestion.layers)} (now {sum(x.current_rank for x in suggestion.layers)}), "
        f"{suggestion.retained_energy:.2%} of the energy kept, parameters {suggestion.params_before:,} → "
        f"{suggestion.params_after:,}",
        f"LoraConfig: r={suggestion.r}, lora_alpha={suggestion.lora_alpha:g}, use_rslora={suggestion.use_rslora}, "
        f"{len(suggestion.rank_pattern)} rank_pattern and {len(suggestion.alpha_pattern)} alpha_pattern entries"
        + (f", {len(suggestion.exclude_modules)} exclude_modules" if suggestion.exclude_modules else "")
        + " (--json has them)",
    ]  # fmt: skip
    return "\n".join(lines)


def _cell(value, text_cell):
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    return text_cell(value) if isinstance(value, str) else value


def suggestion_csv(suggestion) -> str:
    from ..report.csv import text_cell

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([*_COLUMNS, "rule_rank", "clamped", "params_before", "params_after"])
    for layer in suggestion.layers:
        row = layer.to_dict()
        cells = [row[c] for c in (*_COLUMNS, "rule_rank", "clamped", "params_before", "params_after")]
        writer.writerow([_cell(c, text_cell) for c in cells])
    return buffer.getvalue()


@click.command()
@click.argument("path")
@click.option("--rule", required=True, metavar="RULE", help=RULE_HELP)
@rank_options
@output_option("--json", "Write the rankscope.suggest/1 document to FILE ('-': stdout; the table goes to stderr).")
@output_option("--csv", "Write one CSV row per layer to FILE ('-': stdout).")
@checkpoint_options
@analysis_options
@click.option("--strict", is_flag=True, help="Exit 1 when any layer is invalid (such layers are left out).")
@click.option("-q", "--quiet", is_flag=True, help="No table or progress bar; errors and warnings only.")
@handle_errors
def suggest(path: str, rule: str, max_rank, min_rank, json_out, csv_out, strict: bool, quiet: bool, **options) -> None:  # fmt: skip
    """Per-layer ranks for the adapter at PATH by RULE, with the PEFT LoraConfig fields (r, lora_alpha,
    rank_pattern, alpha_pattern, exclude_modules) that give each layer its rank at its present scale."""
    from ..resize.rules import parse_rule
    from ..resize.suggest import suggest as make_suggestion

    parsed = parse_rule(rule)  # a bad rule fails before any file is read
    distinct_outputs(json=json_out, csv=csv_out)
    checkpoint, settings = load_and_settings(path, options)
    analysis = run_analysis(checkpoint, settings, quiet=quiet)
    suggestion = make_suggestion(analysis, parsed, max_rank=max_rank, min_rank=min_rank)
    from ..report.json import dumps

    write_outputs([(json_out, lambda: dumps(suggestion.to_dict())), (csv_out, lambda: suggestion_csv(suggestion))])
    if not quiet:
        click.echo(suggestion_table(suggestion), err="-" in (json_out, csv_out))
    for message in suggestion.messages():
        note(message)
    if strict and suggestion.left_out:
        error(f"{len(suggestion.left_out)} invalid layer(s) left out (--strict)")
        sys.exit(EXIT_INPUT)
