"""The thread contract: by default ``load`` and ``analyze`` change no process-wide thread setting; with
``threads=1`` or ``with rankscope.single_threaded():`` they do, for the duration only; the results are the same.

A second thread samples ``torch.get_num_threads()`` and ``threadpoolctl.threadpool_info()`` while the call runs.
The call itself (a progress callback, or a hook where the reader builds its checkpoint) waits, mid-work, until
the watcher has taken a fresh sample: "during" is then a fact of the test, not a matter of timing. torch's
count is also read on the calling thread at that moment.
"""

from __future__ import annotations

import contextlib
import threading
import time

import pytest
import torch
from threadpoolctl import threadpool_info, threadpool_limits

import rankscope
from rankscope.core import checkpoint as checkpoint_module
from rankscope.core import threads as thread_module

from .factories import llama_like


def snapshot() -> tuple:
    """What another thread can see of the process's thread settings: torch's count and every BLAS pool's.
    (OpenMP's count is kept per thread, and torch sets a thread's lazily: another thread's is no witness.)"""
    pools = [(pool["internal_api"], pool["filepath"], pool["num_threads"]) for pool in threadpool_info()]
    return torch.get_num_threads(), tuple(sorted(pool for pool in pools if pool[0] != "openmp"))


class Watcher(threading.Thread):
    """Samples :func:`snapshot` over and over until stopped; its first sample is taken before the watched call."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.samples: list[tuple] = []
        self.stopped = threading.Event()
        self.count = threading.Condition()

    def run(self) -> None:
        while not self.stopped.is_set():
            sample = snapshot()
            with self.count:
                self.samples.append(sample)
                self.count.notify_all()
            time.sleep(0.001)  # leave the cores to the call: spinning would slow torch's fork-joins

    def fresh_sample(self) -> tuple:
        """A sample the watcher began after this call began (waits for two more samples)."""
        with self.count:
            target = len(self.samples) + 2
            assert self.count.wait_for(lambda: len(self.samples) >= target, timeout=60)
            return self.samples[target - 1]

    def __enter__(self) -> Watcher:
        self.start()
        self.fresh_sample()
        return self

    def __exit__(self, *exc) -> None:
        self.stopped.set()
        self.join(timeout=60)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    # 48 layers of 512×512: large enough that the factor work crosses PARALLEL_MIN_ELEMENTS (pools in use)
    return llama_like(tmp_path_factory.mktemp("threads") / "a", layers=24, hidden=512, rank=16)


@pytest.fixture
def two_threads():
    """Every pool at 2 threads (torch and BLAS/OpenMP alike), so that a drop to 1 shows on any machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with threadpool_limits(limits=2):
            yield snapshot()
    finally:
        torch.set_num_threads(before)


def blas_threads(sample: tuple) -> list[int]:
    return [count for api, _, count in sample[1] if api in ("openblas", "blis", "mkl")]


def run_watched(call, hook_during) -> tuple[list[tuple], list[tuple[int, tuple]], object]:
    """``call()`` under a watcher; ``hook_during`` installs a probe that records (this thread's torch count, a fresh
    sample of the watcher) mid-work. Returns all samples, the probes, and the call's result."""
    probes: list[tuple[int, tuple]] = []
    with Watcher() as watcher:
        with hook_during(lambda: probes.append((torch.get_num_threads(), watcher.fresh_sample()))):
            result = call()
        watcher.fresh_sample()  # one more after the call returned
    assert probes, "the probe never ran inside the call"
    return watcher.samples, probes, result


@contextlib.contextmanager
def during_load(probe):
    """The probe runs where a reader builds its Checkpoint (inside ``load``'s thread block)."""
    original = checkpoint_module.Checkpoint.__post_init__

    def post_init(checkpoint) -> None:
        original(checkpoint)
        probe()

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(checkpoint_module.Checkpoint, "__post_init__", post_init)
        yield


def analyze_watched(ckpt, **kwargs):
    """``analyze`` watched; the probe runs from its progress callback, the first time it is called."""
    probes: list = []

    def progress(done: int, total: int) -> None:
        if probes:
            probes.pop()()

    @contextlib.contextmanager
    def install(probe):
        probes.append(probe)
        yield

    return run_watched(lambda: rankscope.analyze(ckpt, progress=progress, **kwargs), install)


# -- by default: nothing changes ---------------------------------------------------------------------------------
def test_analyze_and_load_change_no_thread_setting_by_default(adapter, two_threads):
    ckpt = rankscope.load(adapter)
    for kwargs in ({}, {"dense": True, "layers": r"layers\.0\."}):  # the factored path, the dense path
        samples, probes, analysis = analyze_watched(ckpt, **kwargs)
        assert len(analysis) > 0
        assert set(samples) == {samples[0]}, kwargs  # another thread saw no change, before, during or after
        assert all(torch_count == 2 for torch_count, _ in probes)  # nor did the calling thread
    samples, probes, loaded = run_watched(lambda: rankscope.load(adapter), during_load)
    assert len(loaded.layers) == 48
    assert set(samples) == {samples[0]} and all(count == 2 for count, _ in probes)
    assert snapshot() == two_threads


# -- opted in: single-threaded during, restored after -------------------------------------------------------------
def assert_single_threaded_during_and_restored(samples, probes, before) -> None:
    assert all(torch_count == 1 for torch_count, _ in probes)  # the calling thread's torch ran on one thread
    assert blas_threads(samples[0]) == blas_threads(before)  # (what the watcher saw before the call)
    for _, sample in probes:  # another thread saw the BLAS pools drop to 1 (where the process has one)
        assert all(count == 1 for count in blas_threads(sample))
        if any(count > 1 for count in blas_threads(before)):
            assert sample != samples[0]
    assert samples[-1] == samples[0] and snapshot() == before  # and restored


def test_threads_1_opts_in_for_the_call_only(adapter, two_threads):
    samples, probes, loaded = run_watched(lambda: rankscope.load(adapter, threads=1), during_load)
    assert_single_threaded_during_and_restored(samples, probes, two_threads)
    for kwargs in ({}, {"dense": True, "layers": r"layers\.0\."}):
        samples, probes, _ = analyze_watched(loaded, threads=1, **kwargs)
        assert_single_threaded_during_and_restored(samples, probes, two_threads)


def test_single_threaded_block_opts_in_and_nests(adapter, two_threads):
    ckpt = rankscope.load(adapter)
    with rankscope.single_threaded():
        inside = snapshot()
        samples, probes, _ = analyze_watched(ckpt, threads=1)  # nested: the outer block's settings hold
        assert set(samples) == {samples[0]}  # throughout, and not restored when the inner call ends
        assert all(count == 1 for count in blas_threads(samples[0]))
        assert torch.get_num_threads() == 1 and thread_module.thread_budget() == 2
    assert inside[0] == 1 and all(count == 1 for count in blas_threads(inside))
    assert all(count == 1 for count, _ in probes)
    assert snapshot() == two_threads


def test_the_results_do_not_depend_on_the_thread_policy(adapter, two_threads):
    ckpt = rankscope.load(adapter)
    assert thread_module.thread_budget() == 1
    default = rankscope.analyze(ckpt)
    opted_in = rankscope.analyze(rankscope.load(adapter, threads=1), threads=1)
    assert [r.singular_values for r in default] == [r.singular_values for r in opted_in]
    assert [r.metrics for r in default] == [r.metrics for r in opted_in]


def test_threads_takes_none_or_1(adapter):
    ckpt = rankscope.load(adapter)
    for bad in (0, 2, True):
        with pytest.raises(rankscope.UsageProblem, match="threads must be None"):
            rankscope.analyze(ckpt, threads=bad)
    with pytest.raises(rankscope.UsageProblem, match="threads must be None"):
        rankscope.load(adapter, threads=4)


def test_the_cli_runs_single_threaded_and_restores(adapter, two_threads):
    from click.testing import CliRunner

    from rankscope.cli import main

    def command():
        return CliRunner().invoke(main, ["spectrum", str(adapter), "-q"])

    samples, probes, result = run_watched(command, during_load)
    assert result.exit_code == 0, result.output
    assert_single_threaded_during_and_restored(samples, probes, two_threads)


LATE_IMPORT = """
import sys
import torch
from threadpoolctl import threadpool_info
import rankscope
from rankscope.core.top_vectors import gram_top_eigen

def pools():
    found = threadpool_info()
    return {(p["internal_api"], p["filepath"]): p["num_threads"] for p in found if p["internal_api"] != "openmp"}

assert "scipy.linalg" not in sys.modules, "scipy.linalg already imported: the test would prove nothing"
before = pools()
with rankscope.single_threaded():
    gram_top_eigen(torch.randn(64, 48, dtype=torch.float64), 5)  # imports scipy.linalg here, inside the block
    inside = pools()
after = pools()
late = set(after) - set(before)
if not late:  # scipy uses numpy's BLAS in this build: no pool is loaded inside the block
    print("shared")
    sys.exit(0)
assert all(count == 1 for count in inside.values()), inside
assert all(after[key] > 1 for key in late), (before, after)  # put back at its own default when the block ended
assert all(after[key] == before[key] for key in before), (before, after)  # the others as they were
print("ok")
"""


def test_a_blas_loaded_inside_the_block_runs_single_threaded_and_is_restored():
    """scipy's own OpenBLAS, loaded by a lazy import inside ``single_threaded``, is limited too (threadpoolctl
    limits only what was loaded when the block began) and is put back at its default afterwards."""
    import os
    import subprocess
    import sys

    if (os.cpu_count() or 1) < 2:
        pytest.skip("one core: every pool defaults to one thread, nothing to tell apart")
    env = {k: v for k, v in os.environ.items() if not k.endswith("_NUM_THREADS")}
    done = subprocess.run([sys.executable, "-c", LATE_IMPORT], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    if done.stdout.strip() == "shared":
        pytest.skip("this scipy build uses numpy's BLAS: no pool is loaded inside the block to limit")
    assert done.stdout.strip() == "ok"


def test_all_threads_gives_back_torch_and_on_request_the_blas_pools(two_threads):
    """Inside ``single_threaded`` everything is at 1; ``all_threads()`` gives torch its threads back,
    ``all_threads(blas=True)`` the BLAS pools theirs too; both put them back at 1 (and nest)."""
    with rankscope.single_threaded():
        assert snapshot()[0] == 1 and set(blas_threads(snapshot())) == {1}
        with thread_module.all_threads():
            assert snapshot()[0] == 2 and set(blas_threads(snapshot())) == {1}
        with thread_module.all_threads(blas=True):
            assert snapshot()[0] == 2 and set(blas_threads(snapshot())) == {2}
            with thread_module.all_threads():  # nested: changes nothing, restores nothing early
                assert snapshot()[0] == 2 and set(blas_threads(snapshot())) == {2}
            assert snapshot()[0] == 2
        assert snapshot()[0] == 1 and set(blas_threads(snapshot())) == {1}
    assert snapshot() == two_threads


def test_all_threads_keeps_one_thread_for_a_small_matrix(two_threads, monkeypatch):
    """A matrix below ALL_THREADS_MIN_ELEMENTS keeps torch at one thread; one at the limit gets them back; and
    the base comparison's small Grams and SVDs (top_singular_triplets) run with torch at one thread throughout."""
    from rankscope.core import top_vectors

    limit = thread_module.ALL_THREADS_MIN_ELEMENTS
    with rankscope.single_threaded():
        with thread_module.all_threads(limit - 1):
            assert snapshot()[0] == 1
        with thread_module.all_threads(limit):
            assert snapshot()[0] == 2
        seen = []
        svd = torch.linalg.svd
        monkeypatch.setattr(
            torch.linalg, "svd", lambda *a, **k: (seen.append(torch.get_num_threads()), svd(*a, **k))[1]
        )
        matrix = torch.randn(128, 64, dtype=torch.float64)
        top_vectors.top_singular_triplets(matrix, 4, exact=True)
        assert seen == [1]
        seen.clear()
        top_vectors.top_singular_triplets(torch.randn(512, 256, dtype=torch.float64), 4, exact=True)
        assert seen == [2]
