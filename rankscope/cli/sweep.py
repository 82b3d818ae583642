"""``rankscope sweep``: one table from many checkpoints, on a local process pool, serially or on Ray."""

from __future__ import annotations

import sys
import time

import click

from ..core.errors import UsageProblem
from .app import EXIT_INPUT, error, handle_errors, note, warn
from .folders import folder_option
from .options import (
    ANALYSIS_KEYS,
    COMPOSE_ONLY,
    analysis_options,
    analysis_settings,
    checkpoint_options,
    choice_option,
)


@click.command()
@click.argument("inputs", nargs=-1)
@folder_option("Where the tables go: DIR/layers.parquet and DIR/checkpoints.parquet (.csv with --table csv).")
@click.option(
    "--jobs",
    type=click.IntRange(min=1),
    metavar="N",
    help="Worker processes (default: the CPU count; 1: in this process). With --ray: the local runtime's CPUs.",
)
@click.option(
    "--ray",
    "use_ray",
    is_flag=True,
    help="One Ray task per checkpoint: joins --ray-address, else RAY_ADDRESS, else a running cluster, else starts a local one.",
)
@click.option(
    "--ray-address", metavar="ADDR", help="The Ray cluster to join (ray://host:10001, or host:6379); implies --ray."
)
@choice_option(
    "--table", ["parquet", "csv"], "The tables' file format (Parquet needs pyarrow: pip install 'rankscope[sweep]')."
)
@click.option(
    "--resume",
    is_flag=True,
    help="Skip checkpoints DIR already holds an ok row for (same sha256 of config and weights).",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    metavar="S",
    help="A checkpoint still being read after S seconds is an error row ('timed out after S s'): its worker is "
    "killed and a new one carries on (default: no limit). It needs a worker process, so with --jobs 1 one is "
    "spawned; with --ray the task is cancelled, its S counted from its submission.",
)
@click.option("--from", "from_list", metavar="FILE", help="Read more inputs from FILE, one a line ('#' comments).")
@checkpoint_options
@analysis_options
@click.option("-q", "--quiet", is_flag=True, help="No progress line or closing summary; errors and warnings only.")
@handle_errors
def sweep(inputs, out_dir, jobs, use_ray, ray_address, table, resume, timeout, from_list, quiet, **options) -> None:  # fmt: skip
    """Analyse every adapter INPUTS name into one table: DIR/layers.parquet (one row per checkpoint and layer,
    every metric) and DIR/checkpoints.parquet (one row per checkpoint: ok or its error, config, content hash,
    duplicates).

    INPUTS are adapter paths, folders searched recursively for anything 'rankscope formats' reads (a training run's
    checkpoint-N/ folders get run and step columns), and glob patterns. A checkpoint that cannot be read is an
    error row; the sweep goes on. The tables are rewritten atomically as results come in.
    """
    from ..sweeps import sweep as run_sweep
    from .interrupt import check

    if not inputs and not from_list:
        raise click.UsageError("give INPUTS (paths, folders, glob patterns) or --from FILE")
    settings = analysis_settings(**{k: v for k, v in options.items() if k in ANALYSIS_KEYS})
    load_options = load_settings({k: v for k, v in options.items() if k not in ANALYSIS_KEYS})
    line = SweepProgress(enabled=not quiet, check=check)
    found: list[str] = []
    try:
        layers = run_sweep(
            inputs, out_dir, jobs=jobs, ray=use_ray or ray_address is not None, ray_address=ray_address,
            table=table, resume=resume, timeout=timeout, from_list=from_list, options=settings, progress=line,
            warnings=found, **load_options,
        )  # fmt: skip
    finally:
        line.close()
        for message in found:
            warn(message)
    checkpoints = layers.checkpoints
    for row in checkpoints[checkpoints["status"] == "error"].itertuples():
        warn(row.error)
    if not (checkpoints["status"] == "ok").any():
        error(f"no checkpoint could be analysed (the error rows are in {out_dir})")
        sys.exit(EXIT_INPUT)
    if not quiet:
        ok = int((checkpoints["status"] == "ok").sum())
        duplicates = int(checkpoints["duplicate_of"].notna().sum())
        resumed = layers.attrs["resumed"]
        if resumed:
            note(f"{resumed} checkpoints were done already in {out_dir} (--resume): their rows are kept")
        note(f"{ok} of {len(checkpoints)} checkpoints analysed ({len(checkpoints) - ok} failed, {duplicates} "
             f"duplicates) in {line.elapsed():.1f} s: {len(layers)} layer rows in {out_dir}/layers.{table}, "
             f"{out_dir}/checkpoints.{table}")  # fmt: skip


def load_settings(options: dict) -> dict:
    """:func:`rankscope.load`'s keyword arguments from the checkpoint options (refusing --weights etc. without
    --compose, as every command does)."""
    if options["trust_pickle"]:
        warn("--trust-pickle: pickled files are loaded in full, which runs any code they hold")
    if not options["compose"]:
        given = [name for name in COMPOSE_ONLY if options[name]]
        if given:
            raise UsageProblem(f"--{given[0]} applies only with --compose A,B,…")
    settings = {k: v for k, v in options.items() if k not in ("format_name", "normalize", "mode")}
    return {**settings, "format": options["format_name"], "normalize": options["normalize"] or "none",
            "mode": options["mode"] or "sum"}  # fmt: skip


class SweepProgress:
    """The status line: ``sweep 120/200 · 2 failed · 35.1/s · ETA 2 s`` (drawn on a terminal only)."""

    def __init__(self, *, enabled: bool, check) -> None:
        from ..report.progress import ProgressBar

        self.bar = ProgressBar("sweep", enabled=enabled, delay=0.0, check=check)
        self.start = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def __call__(self, done: int, failed: int, total: int) -> None:
        rate = done / max(self.elapsed(), 1e-9)
        eta = (total - done) / rate if rate > 0 else 0.0
        self.bar.label = f"sweep · {failed} failed · {rate:.1f}/s · ETA {eta:.0f} s ·"
        self.bar(done, total)

    def close(self) -> None:
        self.bar.close()
