"""rankscope.core.forked: pieces of work shared with forked helpers give what a serial loop gives."""

from __future__ import annotations

import os
import time

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
