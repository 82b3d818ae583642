"""Independent pieces of work shared with forked copies of this process (the report's figures).

A report's figures are independent, pure-Python matplotlib work: one process draws them one after another while
the other cores idle (issue 15: the 11-adapter demo spent 13 s of its 21 in matplotlib). :func:`forked_map` forks
``processes - 1`` helpers, which inherit everything already in memory (the analyses, the imported matplotlib), and
every process, this one included, takes the next piece from a shared counter until none is left; a helper sends
each result back pickled through a pipe, read by a thread here. Spawned processes were measured and not kept
(reports/benchmarks.md, Round 3: re-importing and pickling the inputs cost more than the split saved); forked
ones import nothing and copy nothing until written.

What a helper cannot finish — it died, or its piece raised — this process does itself afterwards, so the results
(and any exception) are the ones a serial loop gives. Only on Linux: macOS's system frameworks are not safe to use
in a forked child, and Windows has no fork; elsewhere the loop runs here, one piece after another.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import pickle
import queue
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
MAX_PROCESSES = 8  # matplotlib's work per figure is small: more processes than this only add their start-up
_ORPHAN_WAIT = 5.0  # seconds without a result after the seed is gone before its copies are given up


def fork_available() -> bool:
    """Whether :func:`forked_map` can fork helpers here (Linux with the ``fork`` start method)."""
    return sys.platform.startswith("linux") and "fork" in multiprocessing.get_all_start_methods()


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity where the platform has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - platforms without sched_getaffinity
        return max(1, os.cpu_count() or 1)


def default_processes() -> int:
    """One process per available core, at most :data:`MAX_PROCESSES`."""
    return min(available_cores(), MAX_PROCESSES)


def forked_map(
    work: Callable[[int], T], count: int, *, processes: int, done: Callable[[int], None] | None = None
) -> list[T]:
    """``[work(0), …, work(count - 1)]``, computed by this process and up to ``processes - 1`` forked helpers.

    ``work`` must return something picklable and should not depend on what other pieces changed in memory (each
    helper has its own copy of the process). ``done(n)`` is called here as this process finishes a piece, with
    the number finished by all processes so far. With ``processes`` ≤ 1, one piece, or no fork, it is a plain loop.
    """
    helpers = min(processes, count) - 1 if fork_available() else 0
    if helpers <= 0:
        results = []
        for index in range(count):
            results.append(work(index))
            if done is not None:
                done(index + 1)
        return results
    context = multiprocessing.get_context("fork")
    counter = context.Value("q", 0)
    finished: dict[int, T] = {}
    children, pipes = [], []
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        for _ in range(helpers):  # every fork before any thread of ours starts
            read_end, write_end = os.pipe()
            child = context.Process(target=_helper, args=(work, count, counter, write_end), daemon=True)
            with warnings.catch_warnings():
                # Python ≥ 3.12 warns of forking a process with threads (torch's, an idle worker pool): a helper
                # only draws, and takes no lock those threads might hold
                warnings.filterwarnings("ignore", message=".*fork.*", category=DeprecationWarning)
                child.start()
            os.close(write_end)
            children.append(child)
            pipes.append(read_end)
        readers = [threading.Thread(target=_collect, args=(pipe, finished), daemon=True) for pipe in pipes]
        for reader in readers:
            reader.start()
        for index in _taken(counter, count):
            finished[index] = work(index)
            if done is not None:
                done(len(finished))
        for child in children:
            child.join()
        for reader in readers:
            reader.join()
    finally:
        for child in children:
            if child.is_alive():  # an exception or Ctrl-C here: the helpers stop with it
                child.terminate()
                child.join()
    return _completed(work, count, finished, done)


def _completed(work: Callable[[int], T], count: int, finished: dict, done: Callable[[int], None] | None) -> list[T]:
    """The results in order, the pieces no helper delivered (it died, or its piece raised) done here, as the
    serial loop would."""
    for index in range(count):
        if index not in finished:
            finished[index] = work(index)
    if done is not None:
        done(count)
    return [finished[index] for index in range(count)]


def _taken(counter, count: int):
    """The indices this process takes, one at a time, from the counter every process shares."""
    while True:
        with counter.get_lock():
            index = counter.value
            if index >= count:
                return
            counter.value = index + 1
        yield index


def _helper(work: Callable[[int], object], count: int, counter, write_end: int) -> None:
    """A forked helper: take pieces until none is left, sending ``(index, result)`` after each; stop quietly at
    the first piece that raises (this process will do it again, and show its exception)."""
    _as_helper()
    _take_pieces(work, count, counter, write_end)


def _as_helper() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it stops the helpers
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(1)  # the parent's OpenMP threads were not forked; one thread needs none


class ForkedHelpers:
    """Helpers that get ready *now*, before this process has their work, and then share it.

    One helper is forked at once and runs ``prepare()`` (imports, fonts: what the first piece would cost every
    process) while this process goes on — a report reads and analyses its checkpoints meanwhile. Once prepared it
    reads the work :meth:`start` sends (pickled: a module-level function or a ``functools.partial`` of one, with
    picklable arguments) and forks ``processes - 1`` copies of itself, prepared already; all of them take pieces
    from a shared counter as in :func:`forked_map`, each sending its results back through a pipe of its own, while
    this process is free until :meth:`results`. What no helper delivers (one died, its piece raised) this process
    does itself, so the results are a serial loop's. :meth:`close` (also on leaving the ``with`` block) stops
    them; a helper whose parent is gone reads EOF instead of work, or fails to write, and exits."""

    def __init__(self, processes: int, prepare: Callable[[], None]) -> None:
        context = multiprocessing.get_context("fork")
        self._counter = context.Value("q", 0)
        self._work: tuple | None = None
        self._queue: queue.Queue = queue.Queue()
        task_read, self._task = os.pipe()
        pipes = [os.pipe() for _ in range(max(1, processes))]
        self._results = [read for read, _ in pipes]
        ours = [self._task, *self._results]  # held in the helper, they would hide this process' exit from it
        sys.stdout.flush()
        sys.stderr.flush()
        self._pipes = len(pipes)
        self._seed = context.Process(target=_seed_helper, daemon=True,
                                     args=(prepare, task_read, [w for _, w in pipes], self._counter, ours))  # fmt: skip
        try:
            with warnings.catch_warnings():
                # Python ≥ 3.12 warns of forking a process with threads (torch's, an idle worker pool): a helper
                # only draws, and takes no lock those threads might hold
                warnings.filterwarnings("ignore", message=".*fork.*", category=DeprecationWarning)
                self._seed.start()
        except BaseException:
            self._seed = None
            self.close()
            raise
        finally:
            for fd in [task_read, *(w for _, w in pipes)]:  # the helper's ends
                os.close(fd)

    def __enter__(self) -> ForkedHelpers:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self, work: Callable[[int], T], count: int) -> None:
        """Hand ``work(0) … work(count - 1)`` to the helpers; raises (pickle's error) where ``work`` cannot be
        sent, the helpers then left waiting (:meth:`close` them)."""
        if self._work is not None or self._task is None:
            raise RuntimeError("ForkedHelpers.start: the helpers have their work already, or were closed")
        payload = pickle.dumps((work, count), protocol=pickle.HIGHEST_PROTOCOL)
        self._work = (work, count)
        task, self._task = self._task, None
        # the helper reads its work once prepared: sent by a thread, so that this process goes on meanwhile
        threading.Thread(target=_send, args=(task, payload), daemon=True).start()
        for result in self._results:
            threading.Thread(target=_collect_into, args=(result, self._queue), daemon=True).start()
        self._results = []

    def results(self, done: Callable[[int], None] | None = None) -> list:
        """The work's results in order, once every helper has finished (``done(n)``: n pieces finished so far)."""
        if self._work is None:
            raise RuntimeError("ForkedHelpers.results: start() was not called")
        work, count = self._work
        finished: dict[int, object] = {}
        open_pipes, quiet_since = self._pipes, None
        while open_pipes:
            try:
                item = self._queue.get(timeout=1.0)
            except queue.Empty:
                # the seed waits for its copies: gone while pipes are open, it was killed (OOM, a signal), and
                # a copy may be stuck on the counter's lock it held — stop them and do the rest here
                if self._seed.is_alive():
                    continue
                quiet_since = quiet_since or time.monotonic()
                if time.monotonic() - quiet_since > _ORPHAN_WAIT:
                    self._stop()
                    break
                continue
            if item is None:
                open_pipes -= 1
                continue
            index, result = item
            finished[index] = result
            if done is not None:
                done(len(finished))
        self._seed.join()
        return _completed(work, count, finished, done)

    def close(self) -> None:
        """Stop the helpers and close this process' ends of their pipes."""
        for fd in [*([self._task] if self._task is not None else []), *self._results]:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._task, self._results = None, []
        self._stop()

    def _stop(self) -> None:
        """End the seed and its copies: they share a process group of their own (the seed's)."""
        if self._seed is None:
            return
        try:
            os.killpg(self._seed.pid, signal.SIGTERM)
        except OSError:  # the group is gone already, or the seed had not made it yet
            if self._seed.is_alive():
                self._seed.terminate()
        self._seed.join()


def _seed_helper(prepare: Callable[[], None], task_read: int, result_writes: list[int], counter, ours) -> None:
    """:class:`ForkedHelpers`' first helper: prepare, read the work (EOF: none is coming), fork the others, then
    take pieces like them; it waits for its copies before it exits."""
    for fd in ours:
        with contextlib.suppress(OSError):
            os.close(fd)
    with contextlib.suppress(OSError):
        os.setpgid(0, 0)  # its copies join this group: close() ends them all with one signal
    _as_helper()
    with contextlib.suppress(Exception):  # a warm-up that fails costs only its time: the pieces still run
        prepare()
    try:
        with os.fdopen(task_read, "rb") as tasks:
            try:
                work, count = pickle.load(tasks)
            except EOFError:  # the parent went on without helpers, or is gone
                os._exit(0)
        copies, mine = [], result_writes[0]
        for write_end in result_writes[1:]:
            try:
                pid = os.fork()
            except OSError:  # no more processes: fewer helpers share the pieces
                os.close(write_end)
                continue
            if pid == 0:
                for other in result_writes:
                    if other != write_end:
                        with contextlib.suppress(OSError):
                            os.close(other)
                _take_pieces(work, count, counter, write_end)  # never returns
            copies.append(pid)
            os.close(write_end)
        status = 0
        try:
            _send_results(work, count, counter, mine)
        except BaseException:
            status = 1
        for pid in copies:
            with contextlib.suppress(OSError):
                os.waitpid(pid, 0)
    except BaseException:
        os._exit(1)
    os._exit(status)


def _take_pieces(work: Callable[[int], object], count: int, counter, write_end: int) -> None:
    """A helper's loop: pieces until none is left, each result sent back, then exit; at the first piece that
    raises it stops quietly (exit 1): the parent does that piece again and shows its exception."""
    try:
        _send_results(work, count, counter, write_end)
    except BaseException:
        os._exit(1)
    os._exit(0)


def _send_results(work: Callable[[int], object], count: int, counter, write_end: int) -> None:
    with os.fdopen(write_end, "wb") as pipe:
        for index in _taken(counter, count):
            pickle.dump((index, work(index)), pipe, protocol=pickle.HIGHEST_PROTOCOL)
            pipe.flush()


def _send(write_end: int, payload: bytes) -> None:
    with contextlib.suppress(OSError), os.fdopen(write_end, "wb") as pipe:
        pipe.write(payload)


def _collect_into(read_end: int, results: queue.Queue) -> None:
    """Put a helper's ``(index, result)`` messages on ``results`` until its pipe closes, then None."""
    try:
        with os.fdopen(read_end, "rb") as pipe, contextlib.suppress(Exception):
            while True:
                results.put(pickle.load(pipe))
    finally:
        results.put(None)


def _collect(read_end: int, finished: dict) -> None:
    """Read a helper's results until its pipe closes."""
    # EOF, or a last message cut short: what is missing is redone by the parent
    with os.fdopen(read_end, "rb") as pipe, contextlib.suppress(Exception):
        while True:
            index, result = pickle.load(pipe)
            finished[index] = result


__all__ = ["ForkedHelpers", "available_cores", "default_processes", "fork_available", "forked_map"]
