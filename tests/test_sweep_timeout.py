"""``rankscope.sweep(..., timeout=S)`` / ``rankscope sweep --timeout S``: a checkpoint whose reading hangs (a real
hang: its pickled weights sleep in whatever process unpickles them) is an error row after S seconds, its worker is
killed, and a new worker carries on with the rest."""

from __future__ import annotations

import faulthandler
import math
import multiprocessing
import shutil
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from click.testing import CliRunner

import rankscope
from rankscope.cli import main
from rankscope.core.errors import UsageProblem
from rankscope.sweeps import executors
from tests.factories import lora_config, random_factors, write_lora

LIMIT = 6.0  # seconds: well above a tiny LoRA's analysis on busy cores, well below the hang


class _SleepsInItsReader:
    """Unpickling it sleeps ten minutes in whatever process reads the file: a reader that hangs without dying."""

    def __reduce__(self):
        return (exec, ("import time; time.sleep(600)",))


@pytest.fixture
def inputs(tmp_path) -> dict[str, list[Path]]:
    good = []
    for seed in range(4):
        modules = {f"model.layers.{i}.self_attn.q_proj": random_factors(8, 8, 2, 10 * seed + i) for i in range(2)}
        good.append(write_lora(tmp_path / f"lora-{seed}", modules, lora_config(r=2, lora_alpha=4)))
    hang = tmp_path / "hangs"
    hang.mkdir()
    shutil.copy(good[0] / "adapter_config.json", hang)
    torch.save({"base_model.model.x.lora_A.weight": _SleepsInItsReader()}, hang / "adapter_model.bin")
    return {"good": good, "hang": [hang]}


def _rows(layers: pd.DataFrame) -> pd.DataFrame:
    return layers.drop(columns=["run", "step"]).sort_values(["id", "layer"]).reset_index(drop=True)


def _guarded(function, *args, **kwargs):
    """Run under a watchdog: a sweep that waits for the hanging worker would be the bug under test."""
    faulthandler.dump_traceback_later(120, exit=True)
    start = time.monotonic()
    try:
        return function(*args, **kwargs), time.monotonic() - start
    finally:
        faulthandler.cancel_dump_traceback_later()


def test_a_hanging_checkpoint_is_an_error_row_after_the_limit(inputs):
    assert executors.pool_problem() is None  # serially, the file would hang pytest itself
    good, hang = inputs["good"], inputs["hang"][0]
    order = [*good[:2], hang, *good[2:]]
    layers, seconds = _guarded(rankscope.sweep, order, jobs=2, timeout=LIMIT, trust_pickle=True)
    assert multiprocessing.active_children() == []  # the hanging worker was killed and reaped
    assert LIMIT <= seconds < LIMIT + 60  # it waited for the limit, not for the ten-minute sleep
    checkpoints = layers.checkpoints.set_index("id")
    assert list(checkpoints.index) == [p.name for p in order]
    assert checkpoints.loc["hangs", "status"] == "error"
    assert checkpoints.loc["hangs", "error"] == f"{hang}: timed out after 6 s (its worker was killed)"
    assert (checkpoints.loc[[p.name for p in good], "status"] == "ok").all()
    expected = rankscope.sweep(good, jobs=1)  # the same rows as in this process, no limit
    pd.testing.assert_frame_equal(_rows(layers), _rows(expected), rtol=1e-12)


def test_cli_timeout_with_one_job_spawns_a_worker_and_a_new_one_carries_on(inputs, tmp_path):
    good, hang = inputs["good"], inputs["hang"][0]
    out = tmp_path / "out"
    command = ["sweep", str(hang), *map(str, good[:2]), "-o", str(out), "--table", "csv", "--jobs", "1",
               "--timeout", "6", "--trust-pickle"]  # fmt: skip
    result, seconds = _guarded(CliRunner().invoke, main, command)
    assert result.exit_code == 0, result.output
    assert seconds < LIMIT + 60
    assert f"{hang}: timed out after 6 s (its worker was killed)" in result.stderr
    assert "2 of 3 checkpoints analysed (1 failed" in result.stderr
    checkpoints = pd.read_csv(out / "checkpoints.csv")
    assert list(checkpoints["status"]) == ["error", "ok", "ok"]  # the first worker died with it; a new one went on
    assert len(pd.read_csv(out / "layers.csv")) == 2 * 2
    assert multiprocessing.active_children() == []


@pytest.mark.parametrize("bad", [0.0, -1.0, math.nan])
def test_a_limit_must_be_positive(inputs, bad):
    with pytest.raises(UsageProblem, match="timeout must be a positive number of seconds") as caught:
        rankscope.sweep(inputs["good"], timeout=bad)
    assert caught.value.arguments == ("timeout",)


def test_cli_refuses_a_limit_of_zero(inputs):
    result = CliRunner().invoke(main, ["sweep", str(inputs["good"][0]), "--timeout", "0"])
    assert result.exit_code == 2 and "--timeout" in result.stderr


def test_without_worker_processes_the_limit_is_not_applied_and_says_so(inputs, monkeypatch):
    monkeypatch.setattr(executors, "pool_problem", lambda: "the main module cannot be re-imported: running serially")
    monkeypatch.setattr(executors, "pool", lambda *a, **k: pytest.fail("the pool cannot start here"))
    warnings: list[str] = []
    layers = rankscope.sweep(inputs["good"], jobs=1, timeout=LIMIT, warnings=warnings)
    assert warnings == ["the main module cannot be re-imported: running serially (and without the time limit)"]
    assert (layers.checkpoints["status"] == "ok").all()


def test_ray_cancels_a_task_over_the_limit(inputs, monkeypatch):
    """A real local Ray runtime: the hanging task is cancelled (its worker killed) and is the error row. On Ray the
    clock starts at submission, so a fresh worker's start-up (importing torch) counts: the workers are warmed with a
    first sweep, and the hanging checkpoint comes last."""
    try:
        import ray
    except ImportError as exc:  # the test extras install ray; only a bare install skips
        pytest.skip(f"ray is not importable: {exc}")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    good, hang = inputs["good"], inputs["hang"][0]
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    try:
        expected = rankscope.sweep(good, ray=True)  # also starts the workers: their imports are not timed below
        layers, seconds = _guarded(rankscope.sweep, [*good, hang], ray=True, timeout=LIMIT, trust_pickle=True)
        assert ray.is_initialized()  # a runtime the caller started is left running
    finally:
        ray.shutdown()
    assert LIMIT <= seconds < LIMIT + 60
    checkpoints = layers.checkpoints.set_index("id")
    assert checkpoints.loc["hangs", "error"] == f"{hang}: timed out after 6 s (its Ray task was cancelled)"
    assert (checkpoints.loc[[p.name for p in good], "status"] == "ok").all()
    pd.testing.assert_frame_equal(_rows(layers), _rows(expected), rtol=1e-12)
