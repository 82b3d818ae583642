"""The thread policy: by default rankscope changes no process-wide thread setting; the caller opts in.

Reading and the factored path are many small tensor ops. torch runs each op above ~32k elements as an OpenMP
fork-join over all its threads; on a machine whose cores are busy with other work every join waits for a
descheduled thread — measured: reading an 8B-shaped LoRA took 3 s on 2 threads against 0.02 s on one. Inside
:func:`single_threaded` torch (and every BLAS/OpenMP pool threadpoolctl finds: numpy's OpenBLAS, which the Gram's
``syrk`` uses) runs on one thread, and rankscope parallelises where the work is large and independent — the
factors, the large dense SVDs — over Python threads (ATen releases the GIL), with no join per op. A BLAS with
more than one thread runs concurrent calls of one routine one after the other (measured: no speed-up at all);
at one, they scale. Single dense SVDs, large enough to amortise the joins, get torch's threads back
(:func:`all_threads`).

Inside the same block CPython's automatic cyclic collection is off (and as it was found once the outermost block
ends): after ``import torch`` the interpreter tracks ~165k container objects and a full collection walks all of
them, 0.1–0.3 s on two busy cores, set off once or twice by reading and analysing an 8B-shaped adapter while
finding nothing of rankscope's (its objects form no reference cycles — tested; reference counting frees them).

These settings are process-wide by nature (torch's, OpenBLAS's and threadpoolctl's limits alike): work in other
threads runs single-threaded too while the block runs. So library calls enter it only when asked
(``load(..., threads=1)``, ``analyze(..., threads=1)``, ``with rankscope.single_threaded():``); the CLI, which owns
its process, always does. Outside it rankscope's loops run on the calling thread and torch's ops use torch's
threads: the same results, without the parallel speed-up on a busy machine.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from types import ModuleType

import torch

from .errors import UsageProblem

_lock = threading.Lock()
_depth = 0  # how many single_threaded blocks are open, in any thread
_budget: int | None = None  # torch's thread count when the outermost block was entered
_limits = None  # threadpoolctl's limiter of the outermost block (restores the BLAS/OpenMP pools)
_late_limits: list = []  # limiters of pools loaded inside the block (import_limited), restored before _limits
_late_modules: set[str] = set()  # the modules import_limited has limited in this block
_pool: tuple[int, ThreadPoolExecutor] | None = None  # worker_pool's: (the owning process, the pool)
_collecting = False  # whether automatic cyclic collection was on when the outermost block began


def thread_budget() -> int:
    """How many Python threads rankscope's own loops may spread independent work over: inside
    :func:`single_threaded`, the torch thread count it found; outside, 1 (torch's ops use its threads themselves,
    and ops on several Python threads at once would oversubscribe the cores)."""
    return _budget if _budget is not None else 1


def worker_pool() -> ThreadPoolExecutor:
    """The process's one pool of worker threads for rankscope's parallel loops (callers submit at most
    ``thread_budget() - 1`` tasks and run a share themselves). Kept, not made per call: each new thread takes a
    fresh malloc arena, and glibc keeps what an arena freed — a pool per call grew VeRA's 8B-shaped spectrum by
    ≈ 0.3 GB of freed, retained buffers. A forked child makes its own (it inherits the pool but not its threads)."""
    global _pool
    with _lock:
        if _pool is None or _pool[0] != os.getpid():
            _pool = (os.getpid(), ThreadPoolExecutor(max(2, os.cpu_count() or 2), thread_name_prefix="rankscope"))
        return _pool[1]


def inside_single_threaded() -> bool:
    """Whether a :func:`single_threaded` block is open (the BLAS pools are at one thread)."""
    return _limits is not None


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """torch's intra-op threads, and the threads of every BLAS/OpenMP library loaded (threadpoolctl), at 1 for the
    duration, and automatic cyclic garbage collection off; restored when the outermost block ends (nested blocks,
    in any thread, change nothing more).

    It changes process-wide settings: torch and numpy work in other threads meanwhile runs single-threaded too,
    and their cyclic garbage waits for the next collection after the block.
    """
    global _depth, _budget, _limits, _collecting
    with _lock:
        if _depth == 0:
            from threadpoolctl import threadpool_limits

            _budget = torch.get_num_threads()
            _limits = threadpool_limits(limits=1)
            torch.set_num_threads(1)
            _collecting = gc.isenabled()
            gc.disable()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                budget, limits, _budget, _limits = _budget, _limits, None, None
                for late in reversed(_late_limits):  # newest first: each restores what the one before it set
                    late.restore_original_limits()
                _late_limits.clear()
                _late_modules.clear()
                limits.restore_original_limits()
                torch.set_num_threads(budget)
                if _collecting:
                    gc.enable()


def import_limited(name: str) -> ModuleType:
    """``importlib.import_module(name)``; inside :func:`single_threaded`, the BLAS/OpenMP pools it loads at one
    thread too (threadpoolctl limits only the libraries loaded when the block began: scipy brings its own
    OpenBLAS, whose threads, left at the core count, made each small ``eigh`` of the report's base comparison
    2–10 ms instead of 0.3 — measured). Restored with the others when the block ends."""
    module = importlib.import_module(name)
    if _limits is not None and name not in _late_modules:
        from threadpoolctl import threadpool_limits

        with _lock:
            if _limits is not None and name not in _late_modules:
                _late_limits.append(threadpool_limits(limits=1))
                _late_modules.add(name)
    return module


def thread_policy(threads: int | None) -> contextlib.AbstractContextManager[None]:
    """The block a library call runs its work in: ``threads=None`` changes nothing, ``threads=1`` is
    :func:`single_threaded`."""
    if threads is None:
        return contextlib.nullcontext()
    if threads == 1 and not isinstance(threads, bool):
        return single_threaded()
    raise UsageProblem(f"threads must be None (leave the thread settings alone) or 1, found {threads!r}",
                       argument="threads")  # fmt: skip


# a matrix smaller than this keeps one thread inside all_threads: its op is too short to amortise a fork-join,
# and with the cores busy (the report's figure helpers) each join waits for a descheduled thread — measured: the
# demo report's 144 base-comparison Grams of 64 × 128 took 1.0 s with threads given back, 0.07 s without
ALL_THREADS_MIN_ELEMENTS = 1 << 16


@contextlib.contextmanager
def all_threads(elements: int | None = None, *, blas: bool = False) -> Iterator[None]:
    """Inside :func:`single_threaded`: torch's threads back, for one op big enough to use them (a dense SVD) —
    not where ``elements`` (the matrix's) is below :data:`ALL_THREADS_MIN_ELEMENTS`; ``blas``: the BLAS pools'
    too (numpy's, scipy's: a large scipy ``eigh`` — at 1024², 0.12 s on one thread against 0.06 s on two,
    measured; each switch costs ~0.4 ms, so only for large ones). Outside it, nothing to give back."""
    budget = _budget
    if budget is None or budget == 1 or (elements is not None and elements < ALL_THREADS_MIN_ELEMENTS):
        yield
        return
    with contextlib.ExitStack() as stack:
        if budget != torch.get_num_threads():
            torch.set_num_threads(budget)
            stack.callback(torch.set_num_threads, 1)
        if blas:
            from threadpoolctl import threadpool_limits

            stack.enter_context(threadpool_limits(limits=budget, user_api="blas"))
        yield


__all__ = [
    "all_threads",
    "import_limited",
    "inside_single_threaded",
    "single_threaded",
    "thread_budget",
    "thread_policy",
    "worker_pool",
]
