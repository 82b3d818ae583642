"""rankscope.core.forked: pieces of work shared with forked helpers give what a serial loop gives."""

from __future__ import annotations

import os
import pickle
import time
from pathlib import Path

import pytest

from rankscope.core import forked
from rankscope.core.forked import fork_available, forked_map

needs_fork = pytest.mark.skipif(not fork_available(), reason="forked helpers run on Linux only")


@needs_fork
def test_helpers_share_the_work_and_the_results_come_back_in_order() -> None:
    def work(index: int) -> tuple[int, int]:
        time.sleep(0.05)  # long enough that the helpers, forked in milliseconds, take pieces too
        return index * index, os.getpid()

    seen = []
    results = forked_map(work, 12, processes=3, done=seen.append)
    assert [value for value, _ in results] == [i * i for i in range(12)]
    assert len({pid for _, pid in results}) > 1  # helpers did some of it
    assert seen == sorted(seen) and seen[-1] == 12


@needs_fork
def test_what_a_dead_helper_took_is_done_here() -> None:
    parent = os.getpid()

    def work(index: int) -> tuple[int, int]:
        if os.getpid() != parent:
            os._exit(3)  # every helper dies at its first piece
        return index + 100, os.getpid()

    assert forked_map(work, 6, processes=3) == [(i + 100, parent) for i in range(6)]


@needs_fork
def test_a_piece_that_raises_raises_here() -> None:
    def work(index: int) -> int:
        if index == 4:
            raise ValueError(f"piece {index}")
        return index

    with pytest.raises(ValueError, match="piece 4"):
        forked_map(work, 8, processes=2)


def test_without_fork_it_is_a_loop_in_this_process(monkeypatch) -> None:
    monkeypatch.setattr(forked, "fork_available", lambda: False)
    seen = []
    here = os.getpid()
    assert forked_map(lambda i: (i, os.getpid()), 4, processes=4, done=seen.append) == [(i, here) for i in range(4)]
    assert seen == [1, 2, 3, 4]


def test_one_process_or_one_piece_forks_nothing() -> None:
    assert forked_map(lambda i: os.getpid(), 3, processes=1) == [os.getpid()] * 3
    assert forked_map(lambda i: os.getpid(), 1, processes=4) == [os.getpid()]
    assert forked_map(lambda i: i, 0, processes=4) == []


def test_default_processes_is_bounded_by_the_cores() -> None:
    assert 1 <= forked.default_processes() <= min(forked.available_cores(), forked.MAX_PROCESSES)


# -- ForkedHelpers: forked before the work exists, prepared, then sent it ------------------------------------------
_PREPARED: list[int] = []  # set by _prepare in a helper: what its pieces see (and this process does not)
_PARENT = os.getpid()


def _prepare() -> None:
    _PREPARED.append(os.getpid())


def _square(index: int) -> tuple[int, int, bool]:
    time.sleep(0.05)  # long enough that the seed's copy takes pieces too
    return index * index, os.getpid(), bool(_PREPARED)


def _dies_in_a_helper(index: int) -> tuple[int, int]:
    if os.getpid() != _PARENT and index % 2 == 0:
        os._exit(3)  # a helper dies at the first even piece it takes
    return index + 100, os.getpid()


def _raises_in_a_helper(index: int) -> int:
    if os.getpid() != _PARENT and index == 3:
        raise RuntimeError("only in a helper")
    return -index


@needs_fork
def test_prepared_helpers_do_the_work_sent_later_and_the_results_come_back_in_order() -> None:
    parent = os.getpid()
    with forked.ForkedHelpers(2, _prepare) as helpers:
        time.sleep(0.1)  # this process goes on meanwhile (a report analyses here)
        helpers.start(_square, 12)
        seen = []
        results = helpers.results(seen.append)
    assert [value for value, _, _ in results] == [i * i for i in range(12)]
    pids = {pid for _, pid, _ in results}
    assert parent not in pids and len(pids) == 2  # the seed and its one copy, none of it here
    assert all(prepared for _, _, prepared in results) and not _PREPARED  # prepared there, not here
    assert seen == sorted(seen) and seen[-1] == 12


@needs_fork
def test_what_prepared_helpers_do_not_deliver_is_done_here() -> None:
    with forked.ForkedHelpers(3, _prepare) as helpers:
        helpers.start(_dies_in_a_helper, 8)
        results = helpers.results()
    assert [value for value, _ in results] == [i + 100 for i in range(8)]
    assert all(pid == _PARENT for (value, pid) in results if (value - 100) % 2 == 0)
    with forked.ForkedHelpers(2, _prepare) as helpers:
        helpers.start(_raises_in_a_helper, 6)
        assert helpers.results() == [-i for i in range(6)]  # piece 3 raised there, was done here


@needs_fork
def test_prepared_helpers_stop_when_closed_without_work_and_refuse_what_cannot_be_sent() -> None:
    helpers = forked.ForkedHelpers(2, _prepare)
    seed = helpers._seed
    helpers.close()  # the seed reads EOF instead of work (or is stopped): nothing is left running
    assert not seed.is_alive()
    # a local function does not pickle: start raises, and leaving the block stops the waiting helper
    with forked.ForkedHelpers(2, _prepare) as helpers, pytest.raises((pickle.PicklingError, AttributeError)):
        helpers.start(lambda index: index, 3)
    assert not helpers._seed.is_alive()


def _record_and_wait(folder: str, index: int) -> int:
    (Path(folder) / f"{os.getpid()}").touch()
    time.sleep(0.3)
    return index


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"  # a zombie has stopped; only its parent's wait is missing


@needs_fork
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_closing_after_the_work_was_sent_stops_the_seed_and_its_copies(tmp_path) -> None:
    import functools

    helpers = forked.ForkedHelpers(3, _prepare)
    helpers.start(functools.partial(_record_and_wait, str(tmp_path)), 30)  # ~3 s of pieces in three helpers
    deadline = time.monotonic() + 10
    while len(list(tmp_path.iterdir())) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    pids = [int(p.name) for p in tmp_path.iterdir()]
    assert len(pids) == 3  # the seed and both copies were drawing
    helpers.close()  # an error or Ctrl-C in this process while they draw
    time.sleep(0.3)
    assert not [pid for pid in pids if _running(pid)]
