"""The sweep's local process pool: spawned single-threaded workers, one checkpoint in flight per worker, each worker
replaced after ``max_tasks`` checkpoints, and a worker that dies (SIGKILL, the out-of-memory killer, a crash in
native code) turned into an error row for the checkpoint it was reading, after which the sweep goes on. With a
time limit, a worker still busy with one checkpoint after ``timeout`` seconds is killed the same way: its checkpoint
is an error row ("timed out after S s") and a new worker takes the queue on.

``multiprocessing.Pool`` cannot do the last part: it replaces a killed worker but never learns that its task is
lost, so ``imap`` waits for ever. ``concurrent.futures.ProcessPoolExecutor`` notices (``BrokenProcessPool``) but
fails every pending future at once without saying which task was running, and recycles workers only on Python ≥ 3.11.
Here the parent hands each worker one task at a time through its own pipe and waits on the pipes and the processes'
sentinels together (``multiprocessing.connection.wait``), so it always knows which checkpoint a dead worker held.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import signal
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait

from ..analysis.options import AnalysisOptions
from ..core.errors import RankscopeError
from .inputs import SweepItem
from .worker import analyse_one, failed_row, pool_initializer

STARTUP_FAILURES = 3  # this many workers in a row dying before they are ready: the pool cannot work here
_READY = "ready"


def serve(connection: Connection, load_options: dict, settings: AnalysisOptions, skip: frozenset[str]) -> None:
    """A worker's life: single-threaded, Ctrl-C ignored (the parent's to handle); say ready, then analyse each
    ``(index, item)`` the parent sends until it sends None or goes away. The options come once, at spawn."""
    pool_initializer()
    connection.send(_READY)
    while True:
        try:
            task = connection.recv()
        except (EOFError, OSError):  # the parent is gone
            return
        if task is None:
            return
        index, item = task
        connection.send(analyse_one(index, item, load_options, settings, skip))


@dataclass
class _Worker:
    process: multiprocessing.process.BaseProcess
    connection: Connection
    task: tuple[int, SweepItem] | None = None  # the checkpoint it is reading
    started: float = 0.0  # time.monotonic() when it was handed that checkpoint
    done: int = 0
    ready: bool = False
    retired: bool = False  # sent None: it will exit of itself


def death(exitcode: int | None) -> str:
    """``signal 9: SIGKILL, e.g. out of memory`` / ``exit code 1``: how a worker ended, in words."""
    if exitcode is None:
        return "no exit status"
    if exitcode >= 0:
        return f"exit code {exitcode}"
    try:
        name = signal.Signals(-exitcode).name
    except ValueError:
        name = "unknown signal"
    hint = ", e.g. out of memory" if -exitcode == signal.SIGKILL else ""
    return f"signal {-exitcode}: {name}{hint}"


def pool(tasks: list[tuple], jobs: int, max_tasks: int, timeout: float | None = None) -> Iterator[dict]:
    """:func:`~.worker.analyse_one`'s results for ``tasks`` (``(index, item, load_options, settings, skip)``, the
    last three the same for all) from ``jobs`` spawned workers, in the order they finish. ``timeout``: the seconds
    a worker may spend on one checkpoint (from when it is handed it, so its own start-up does not count) before it
    is killed and the checkpoint is an error row. Raises :class:`RankscopeError` where workers die before they are
    ready, :data:`STARTUP_FAILURES` times in a row."""
    if not tasks:
        return
    context = multiprocessing.get_context("spawn")  # fork would copy torch's thread pools and locks
    shared = tasks[0][2:]
    queue = deque((index, item) for index, item, *_ in tasks)
    workers: list[_Worker] = []
    failures_at_start = 0

    def start() -> None:
        parent_end, child_end = context.Pipe()
        process = context.Process(target=serve, args=(child_end, *shared), daemon=True, name="rankscope-sweep")
        process.start()
        child_end.close()  # else the parent never sees EOF on this pipe
        workers.append(_Worker(process, parent_end))

    def next_task(worker: _Worker) -> None:
        """Give ``worker`` the next checkpoint, or let it go (queue empty, or its ``max_tasks`` are done)."""
        if queue and worker.done < max_tasks:
            worker.task, worker.started = queue.popleft(), time.monotonic()
            try:
                worker.connection.send(worker.task)
            except OSError:  # it died before it could take it: the task is not its fault; its death is seen next
                queue.appendleft(worker.task)
                worker.task = None
            return
        retire(worker)
        if queue:
            start()

    def wait_seconds() -> float | None:
        """Until the first busy worker's time limit runs out (None: no limit, or nobody busy)."""
        if timeout is None:
            return None
        ends = [w.started + timeout for w in workers if w.task is not None]
        return max(0.0, min(ends) - time.monotonic()) if ends else None

    def end(worker: _Worker, *, kill: bool = False) -> None:
        """Reap a dead worker; one whose pipe broke but that lingers has 5 s to exit (its exit code says why it
        died) before it is killed; ``kill``: at once (it ran out of time)."""
        if not kill:
            worker.process.join(5)
        if worker.process.is_alive():
            worker.process.kill()
            worker.process.join()
        workers.remove(worker)
        worker.connection.close()

    def retire(worker: _Worker) -> None:
        worker.retired = True
        with contextlib.suppress(OSError):  # already dead: its sentinel says so
            worker.connection.send(None)

    try:
        for _ in range(min(jobs, len(queue))):
            start()
        while workers:
            # a retired worker's pipe is at EOF until it exits: wait on its sentinel only, not to spin
            watched = [w.connection for w in workers if not w.retired] + [w.process.sentinel for w in workers]
            ready = set(wait(watched, timeout=wait_seconds()))
            for worker in list(workers):
                dead = worker.process.sentinel in ready
                if worker.connection in ready and not worker.retired:
                    try:
                        message = worker.connection.recv()
                    except (EOFError, OSError):
                        dead = True
                    else:
                        if message == _READY:
                            worker.ready, failures_at_start = True, 0
                            next_task(worker)
                        else:
                            worker.task, worker.done = None, worker.done + 1
                            next_task(worker)  # before yielding: the worker goes on while the tables are written
                            yield message
                if not dead:
                    continue
                end(worker)
                how = death(worker.process.exitcode)
                if not worker.ready:
                    failures_at_start += 1
                    if failures_at_start >= STARTUP_FAILURES:
                        raise RankscopeError(
                            f"sweep worker processes die as they start ({how}): run with jobs=1 to see why",
                            argument="jobs",
                        )
                if worker.task is not None:
                    index, item = worker.task
                    yield failed_row(index, item, f"worker died ({how}) while reading it")
                if queue and not worker.retired:  # a retired worker's successor is started already
                    start()
            for worker in list(workers):  # after the messages: a result that came in time is not a time-out
                if timeout is None or worker.task is None or time.monotonic() - worker.started < timeout:
                    continue
                index, item = worker.task
                end(worker, kill=True)
                yield failed_row(index, item, f"timed out after {timeout:g} s (its worker was killed)")
                if queue:
                    start()
    finally:
        for worker in workers:
            if worker.process.is_alive():
                worker.process.terminate()
        for worker in workers:
            worker.process.join()
            worker.connection.close()
