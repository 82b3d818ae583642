"""``rankscope convert``: any adapter rankscope reads (or a weighted sum of several) written as a plain LoRA."""

from __future__ import annotations

import sys

import click

from ..core.errors import UsageProblem
from .app import EXIT_INPUT, error, handle_errors, note
from .options import checkpoint_options, choice_option, load_checkpoint
from .suggest import RULE_HELP, rank_options


@click.command()
@click.argument("paths", nargs=-1, required=True, metavar="PATH...")
@click.option("-o", "--output", required=True, metavar="OUT", help="Where to write (a new folder for peft and diffusers, a .safetensors file for kohya); never over or into an input's folder.")  # fmt: skip
@click.option("--rule", metavar="RULE", help=RULE_HELP + " Without it: lossless (every nonzero direction kept; factored families only).")  # fmt: skip
@rank_options
@choice_option("--to", ["peft", "kohya", "diffusers"], "Output format.", "target")
@choice_option("--dtype", ["float32", "float16", "bfloat16", "float64"], "Precision of the written factors.")
@checkpoint_options
@click.option("--strict", is_flag=True, help="Exit 1 (nothing written) when any layer cannot be analysed.")
@click.option("-q", "--quiet", is_flag=True, help="Errors and warnings only.")
@handle_errors
def convert(paths, output: str, rule, max_rank, min_rank, target: str, dtype: str, strict: bool, quiet: bool, **options) -> None:  # fmt: skip
    """Write the adapter at PATH as a plain LoRA: the truncated SVD of each update, taken from its factors.

    Several PATHs are merged first: Σ wᵢ·ΔWᵢ with --weights W1,W2,… (default 1 each), converted the same way.
    """
    from ..resize.convert import convert as make_adapter
    from ..resize.rules import parse_rule
    from .app import warn

    parsed = parse_rule(rule) if rule is not None else None
    weights = None
    if len(paths) > 1:
        if options["compose"]:
            raise UsageProblem("--compose reads one multi-adapter directory: give one PATH with it")
        weights, options["weights"] = options["weights"], None
        if weights is not None and len(weights) != len(paths):
            raise UsageProblem(f"--weights has {len(weights)} value(s) for {len(paths)} adapters")
        weights = weights or (1.0,) * len(paths)
    checkpoints = [load_checkpoint(path, **options) for path in paths]
    for checkpoint in checkpoints:
        for message in checkpoint.warnings:
            warn(f"{checkpoint.path}: {message}")
    adapter = make_adapter(checkpoints, parsed, weights=weights, max_rank=max_rank, min_rank=min_rank)
    suggestion = adapter.suggestion
    if strict and suggestion.left_out:
        error(f"{len(suggestion.left_out)} layer(s) cannot be analysed (--strict); nothing written")
        sys.exit(EXIT_INPUT)
    written = adapter.save(output, to=target, dtype=dtype)
    for message in adapter.lost:
        warn(message)
    for message in [*suggestion.messages(), *adapter.notes]:
        note(message)
    if not quiet:
        click.echo(
            f"wrote {written} ({target}, {dtype}): {sum(x.experts for x in adapter.layers)} layer(s), total rank "
            f"{sum(x.rank for x in suggestion.layers)} (was {sum(x.current_rank for x in suggestion.layers)}), "
            f"parameters {suggestion.params_before:,} → {suggestion.params_after:,}, "
            f"{suggestion.retained_energy:.4%} of the energy kept"
        )
