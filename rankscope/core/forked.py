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
import signal
import sys
import threading
import warnings
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
MAX_PROCESSES = 8  # matplotlib's work per figure is small: more processes than this only add their start-up


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
    for index in range(count):
        if index not in finished:  # a helper died or its piece raised: done here, as the serial loop would
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
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it stops the helpers
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(1)  # the parent's OpenMP threads were not forked; one thread needs none
    try:
        with os.fdopen(write_end, "wb") as pipe:
            for index in _taken(counter, count):
                result = work(index)
                pickle.dump((index, result), pipe, protocol=pickle.HIGHEST_PROTOCOL)
                pipe.flush()
    except BaseException:  # the parent redoes what is missing and raises it there
        os._exit(1)
    os._exit(0)


def _collect(read_end: int, finished: dict) -> None:
    """Read a helper's results until its pipe closes."""
    # EOF, or a last message cut short: what is missing is redone by the parent
    with os.fdopen(read_end, "rb") as pipe, contextlib.suppress(Exception):
        while True:
            index, result = pickle.load(pipe)
            finished[index] = result


__all__ = ["available_cores", "default_processes", "fork_available", "forked_map"]
