"""Where a sweep's checkpoints are analysed: in this process (serial), on a local process pool, or as Ray tasks.
Each yields :func:`~.worker.analyse_one`'s results as they finish (in any order)."""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Iterator

from ..core.errors import RankscopeError
from . import pool as worker_pool
from .worker import analyse_one, failed_row, ray_task

# a worker is replaced after this many checkpoints, which bounds its memory; a replacement costs a spawn and a
# torch import (seconds on busy cores), so not too often
DEFAULT_MAX_TASKS_PER_CHILD = 500


def serial(tasks: list[tuple]) -> Iterator[dict]:
    for task in tasks:
        yield analyse_one(*task)


def pool(
    tasks: list[tuple], jobs: int, max_tasks_per_child: int = DEFAULT_MAX_TASKS_PER_CHILD, timeout: float | None = None
) -> Iterator[dict]:
    """A spawned process pool of ``jobs`` single-threaded workers, each replaced after ``max_tasks_per_child``
    checkpoints; a worker that dies, or is still on one checkpoint after ``timeout`` seconds (then killed), is an
    error row for the checkpoint it was reading (see :mod:`.pool`)."""
    return worker_pool.pool(tasks, jobs, max_tasks_per_child, timeout)


def pool_problem() -> str | None:
    """Why a spawned pool cannot start here (None where it can): spawned workers re-import the main module, and a
    main read from stdin (``python - <<EOF``) cannot be, so each worker would die and be replaced for ever."""
    import sys

    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if path is not None and not os.path.exists(path):
        return f"the main module ({path}) cannot be re-imported by spawned workers: running serially"
    return None


def ray_available() -> str | None:
    """None where Ray can be imported; else the one-line reason."""
    try:
        import ray  # noqa: F401
    except ImportError as exc:
        return f"Ray is not installed ({exc}): pip install 'rankscope[ray]'"
    return None


def ray_tasks(
    tasks: list[tuple], *, address: str | None, jobs: int | None, timeout: float | None = None
) -> Iterator[dict]:
    """One Ray task (one CPU) per checkpoint. Joins ``address``, else ``RAY_ADDRESS``, else a running cluster
    (``ray start``); else starts a local runtime with ``jobs`` CPUs (default: all), shut down at the end. A runtime
    this process has already initialised is used as it is. ``timeout``: a task still running that many seconds
    after it was submitted is cancelled (``ray.cancel(force=True)`` kills its worker) and is an error row; then at
    most as many tasks as the cluster has CPUs are submitted at once, so that a task's clock is not spent queueing
    (it still includes a fresh Ray worker's start-up)."""
    reason = ray_available()
    if reason is not None:
        raise RankscopeError(reason)
    import ray

    started = False
    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS")
        try:
            if address:
                ray.init(address=address, logging_level="ERROR", log_to_driver=True)
            else:
                _join_or_start(ray, jobs)
                started = True
        except ConnectionError as exc:
            raise RankscopeError(f"cannot join the Ray cluster at {address}: {exc}") from exc
    try:
        remote = ray.remote(num_cpus=1, max_retries=1)(ray_task)
        # the same options and resume set for every task: stored once, each task gets references
        shared = [ray.put(value) for value in tasks[0][2:]] if tasks else []
        queue = deque((index, item) for index, item, *_ in tasks)
        window = len(queue) if timeout is None else max(1, int(ray.cluster_resources().get("CPU", 1)))
        submitted: dict = {}  # object ref → (index, item, when it was submitted)

        def submit() -> None:
            while queue and len(submitted) < window:
                index, item = queue.popleft()
                submitted[remote.remote(index, item, *shared)] = (index, item, time.monotonic())

        submit()
        while submitted:
            first_end = None if timeout is None else min(at for *_, at in submitted.values()) + timeout
            wait_for = None if first_end is None else max(0.0, first_end - time.monotonic())
            ready, _ = ray.wait(list(submitted), num_returns=1, timeout=wait_for)
            results = []
            for ref in ready:
                index, item, _ = submitted.pop(ref)
                try:
                    results.append(ray.get(ref))
                except ray.exceptions.RayError as exc:  # its worker died (out of memory, killed): an error row
                    results.append(failed_row(index, item, f"the Ray task failed: {type(exc).__name__}: {exc}"))
            now = time.monotonic()
            for ref, (index, item, at) in list(submitted.items()):
                if timeout is not None and now - at >= timeout:
                    ray.cancel(ref, force=True)  # cancelled tasks are not retried
                    del submitted[ref]
                    message = f"timed out after {timeout:g} s (its Ray task was cancelled)"
                    results.append(failed_row(index, item, message))
            submit()  # before yielding: the cluster goes on while the tables are written
            yield from results
    finally:
        if started:
            ray.shutdown()


def _join_or_start(ray, jobs: int | None) -> None:
    """A running cluster (``ray start`` on this machine) if there is one, else a local runtime of our own."""
    try:
        ray.init(address="auto", logging_level="ERROR")
        return
    except (ConnectionError, RuntimeError, ValueError):
        pass
    ray.init(num_cpus=jobs or os.cpu_count(), include_dashboard=False, logging_level="ERROR")
