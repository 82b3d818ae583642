"""``sweep``: analyse many checkpoints into two tables (layers, checkpoints), on a pool, on Ray or serially."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from ..analysis.options import AnalysisOptions
from ..core.errors import UsageProblem
from . import executors
from .inputs import SweepItem, discover, read_list
from .tables import CHECKPOINTS, LAYERS, check_table, frame, read_frame, records, table_path, write_frame

_ANALYSIS_FIELDS = frozenset(f.name for f in dataclasses.fields(AnalysisOptions))
LOAD_OPTIONS = frozenset(
    {"adapter", "alpha", "format", "base", "directional_only", "trust_pickle", "compose", "weights", "normalize",
     "mode"}
)  # fmt: skip
BATCH_SECONDS = 2.0  # the tables are rewritten at most this often (and at the end)


def sweep(
    inputs: Iterable[str | Path],
    out_dir: str | Path | None = None,
    *,
    jobs: int | None = None,
    ray: bool = False,
    ray_address: str | None = None,
    table: str = "parquet",
    resume: bool = False,
    from_list: str | Path | None = None,
    options: AnalysisOptions | None = None,
    progress: Callable[[int, int, int], None] | None = None,
    warnings: list[str] | None = None,
    max_tasks_per_child: int = executors.DEFAULT_MAX_TASKS_PER_CHILD,
    timeout: float | None = None,
    **settings,
):
    """Analyse every checkpoint the inputs name; one row per (checkpoint, layer), returned as a
    :class:`~.frame.SweepFrame` (a pandas DataFrame) whose ``.checkpoints`` is the one-row-per-checkpoint DataFrame
    (status, error, seconds, config fields, content hash, ``duplicate_of``) and ``attrs["resumed"]`` the number of
    checkpoints an earlier sweep had done.

    ``inputs``: paths, folders (searched for adapters; a training run's ``checkpoint-N/`` folders get ``run`` and
    ``step``), glob patterns; ``from_list``: a file naming more, one a line. With ``out_dir`` both tables are
    written there (``table``: "parquet" or "csv"), rewritten atomically as results come in, so an interrupted sweep
    leaves the last complete batch; ``resume`` skips checkpoints whose content hash (sha256 of config and
    weights) has an ``ok`` row there already. ``jobs``: 1 runs in this process; more (default: the CPU count) on a
    spawned process pool, each worker single-threaded and replaced after ``max_tasks_per_child`` checkpoints (a
    worker that dies — killed, out of memory — is an error row for the checkpoint it held); ``ray`` runs one Ray
    task per checkpoint (``ray_address``, else ``RAY_ADDRESS``, else a running cluster, else a local
    runtime of ``jobs`` CPUs). ``timeout``: seconds one checkpoint may take; one still being read then is an error
    row ("timed out after S s") — its worker process is killed (a Ray task cancelled) and a new one goes on. A
    checkpoint cannot be stopped safely inside this process, so with a time limit ``jobs=1`` runs one spawned
    worker rather than in this process; on Ray the clock starts when a task is submitted (see
    :func:`~.executors.ray_tasks`). ``settings``: :func:`rankscope.load`'s options (``alpha``, ``base``,
    ``format`` …) and :class:`AnalysisOptions` fields (``thresholds`` …). ``progress(done, failed, total)`` is called as
    checkpoints finish; ``warnings`` (a list) collects inputs left out and why.
    """
    unknown = set(settings) - LOAD_OPTIONS - _ANALYSIS_FIELDS
    if unknown:
        raise UsageProblem(f"sweep has no option {sorted(unknown)[0]!r}", argument=sorted(unknown)[0])
    check_table(table)
    if jobs is not None and jobs < 1:
        raise UsageProblem(f"jobs must be at least 1, found {jobs}", argument="jobs")
    if timeout is not None and not timeout > 0:  # not: NaN too
        raise UsageProblem(f"timeout must be a positive number of seconds, found {timeout}", argument="timeout")
    analysis = {k: v for k, v in settings.items() if k in _ANALYSIS_FIELDS}
    options = dataclasses.replace(options, **analysis) if options is not None else AnalysisOptions(**analysis)
    load_options = {k: v for k, v in settings.items() if k in LOAD_OPTIONS}
    if load_options.get("base") is not None:
        load_options["base"] = str(load_options["base"])

    warnings = warnings if warnings is not None else []
    inputs = [*inputs, *(read_list(from_list) if from_list is not None else [])]
    items = discover(inputs, warnings)
    if not items:
        raise UsageProblem("inputs name no checkpoint (see the warnings for what was left out)", argument="inputs")
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    earlier = _earlier(out, table) if (resume and out is not None) else ([], {})
    skip = frozenset(row["hash"] for row in earlier[0])
    tasks = [(index, item, load_options, options, skip) for index, item in enumerate(items)]

    workers = min(jobs or os.cpu_count() or 1, len(tasks))
    # a time limit needs a worker process to kill, even for one worker
    problem = executors.pool_problem() if (workers > 1 or timeout is not None) and not ray else None
    if problem is not None:
        warnings.append(problem + (" (and without the time limit)" if timeout is not None else ""))
    if ray:
        results = executors.ray_tasks(tasks, address=ray_address, jobs=jobs, timeout=timeout)
    elif (workers == 1 and timeout is None) or problem is not None:
        results = executors.serial(tasks)
    else:
        results = executors.pool(tasks, workers, max_tasks_per_child, timeout)

    done: dict[int, dict] = {}
    failed, last_write = 0, time.monotonic()
    for result in results:
        done[result["index"]] = result
        failed += result["checkpoint"]["status"] == "error"
        if progress is not None:
            progress(len(done), failed, len(items))
        if out is not None and time.monotonic() - last_write >= BATCH_SECONDS:
            _write(out, table, *_assemble(items, done, earlier))
            last_write = time.monotonic()
    checkpoints, layers = _assemble(items, done, earlier)
    if out is not None:
        _write(out, table, checkpoints, layers)
    from .frame import sweep_frame  # pandas is there: check_table asked for it

    return sweep_frame(frame(layers), frame(checkpoints), sum(r["resumed"] for r in done.values()))


def _earlier(out: Path, table: str) -> tuple[list[dict], dict[str, list[dict]]]:
    """An earlier sweep's ``ok`` checkpoint rows, and their layer rows by checkpoint id (error rows are retried)."""
    checkpoints = records(read_frame(table_path(out, CHECKPOINTS, table), table))
    layers = records(read_frame(table_path(out, LAYERS, table), table))
    kept = [row for row in checkpoints if row.get("status") == "ok" and row.get("hash") and not row.get("duplicate_of")]
    ids = {row["id"] for row in kept}
    by_id: dict[str, list[dict]] = {}
    for row in layers:
        if row.get("id") in ids:
            by_id.setdefault(row["id"], []).append(row)
    return kept, by_id


def _assemble(
    items: Sequence[SweepItem], done: dict[int, dict], earlier: tuple[list[dict], dict[str, list[dict]]]
) -> tuple[list[dict], list[dict]]:
    """Both tables as they stand: finished checkpoints in input order (a resumed one takes its earlier rows, under
    its id and path now), then earlier rows no input named this time; the second of two checkpoints with one
    content hash is marked ``duplicate_of`` the first, and its layers are not repeated."""
    earlier_rows, earlier_layers = earlier
    by_hash = {row["hash"]: row for row in earlier_rows}
    checkpoints: list[dict] = []
    layers: list[dict] = []
    used: set[str] = set()
    for index in sorted(done):
        result = done[index]
        row, rows = dict(result["checkpoint"]), result["layers"]
        if result["resumed"]:
            previous = by_hash[row["hash"]]
            used.add(previous["id"])
            identity = {key: row[key] for key in ("id", "path", "run", "step")}
            rows = [{**layer, **identity} for layer in earlier_layers.get(previous["id"], [])]
            row = {**previous, **identity}
        checkpoints.append(row)
        layers.extend(rows)
    hashes = {row.get("hash") for row in checkpoints}
    for previous in earlier_rows:
        if previous["id"] not in used and previous["hash"] not in hashes:
            checkpoints.append(previous)
            layers.extend(earlier_layers.get(previous["id"], []))
    first: dict[str, str] = {}
    duplicates: set[str] = set()
    for row in checkpoints:
        digest = row.get("hash")
        row["duplicate_of"] = None
        if row["status"] != "ok" or not digest:
            continue
        if digest in first:
            row["duplicate_of"] = first[digest]
            duplicates.add(row["id"])
        else:
            first[digest] = row["id"]
    return checkpoints, [layer for layer in layers if layer["id"] not in duplicates]


def _write(out: Path, table: str, checkpoints: list[dict], layers: list[dict]) -> None:
    """Layers first, then checkpoints: a resume trusts only the checkpoints table, so a crash between the two
    renames leaves nothing it would misread."""
    write_frame(frame(layers), table_path(out, LAYERS, table), table)
    write_frame(frame(checkpoints), table_path(out, CHECKPOINTS, table), table)
