"""``rankscope sweep`` over a generated zoo: the same rows serially, on the process pool and on a real local Ray
runtime; resume, duplicates, error rows; σ-derived metrics against a float64 dense SVD computed here."""

from __future__ import annotations

import faulthandler
import math
import multiprocessing
import pickle
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import rankscope
from rankscope.cli import main
from rankscope.sweeps import executors, worker
from rankscope.sweeps import run as sweep_run
from tests.factories import lora_config, random_factors, write_lora

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "checkpoints" / "adapters"
COPIED = ("bora-r8-b4", "melora-8x1", "hydralora-r8-h3", "boostlora-sum-k2", "boostlora-seq-k3", "lora-r8")
RANKS = (1, 2, 4, 8)
LORAS = 180


def _lora(directory: Path, seed: int) -> Path:
    rank = RANKS[seed % len(RANKS)]
    hidden = (8, 12, 16)[seed % 3]
    modules = {
        f"model.layers.{i}.self_attn.{name}": random_factors(hidden, hidden, rank, 1000 * seed + 10 * i + j)
        for i in range(2)
        for j, name in enumerate(("q_proj", "v_proj"))
    }
    return write_lora(directory, modules, lora_config(r=rank, lora_alpha=2 * rank + seed % 5))


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Path:
    """180 PEFT-layout LoRAs, the checked-in examples of other families (BoRA, MELoRA, HydraLoRA, BoostLoRA sum and
    sequential manifests), a damaged file, a duplicate, a Trainer run, and a base-model file that is no adapter."""
    root = tmp_path_factory.mktemp("zoo")
    for seed in range(LORAS):
        _lora(root / "grid" / f"lora-{seed:03d}", seed)
    for name in COPIED:
        shutil.copytree(EXAMPLES / name, root / "families" / name)
    shutil.copytree(root / "grid" / "lora-000", root / "later" / "same-as-000")
    broken = root / "broken" / "damaged"
    broken.mkdir(parents=True)
    (broken / "adapter_config.json").write_text((root / "grid" / "lora-001" / "adapter_config.json").read_text())
    (broken / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json")
    for step in (10, 20):
        _lora(root / "run" / f"checkpoint-{step}", 500 + step)
    save_file({"model.embed.weight": torch.zeros(4, 4)}, str(root / "base.safetensors"))
    return root


def _sorted(data: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    return data.sort_values(keys).reset_index(drop=True)


@pytest.fixture(scope="module")
def serial(zoo):
    warnings: list[str] = []
    layers = rankscope.sweep([zoo], jobs=1, warnings=warnings)
    return layers, layers.checkpoints, warnings


def test_zoo_rows_duplicates_errors_and_runs(zoo, serial):
    layers, checkpoints, warnings = serial
    expected = LORAS + len(COPIED) + 1 + 1 + 2  # the base-model file is left out, with a warning
    assert len(checkpoints) == expected
    assert any("base.safetensors" in w and "not an adapter" in w for w in warnings)
    by_id = checkpoints.set_index("id")
    bad = by_id.loc["damaged"]
    assert bad["status"] == "error"
    assert str(zoo / "broken" / "damaged" / "adapter_model.safetensors") in bad["error"]
    assert (checkpoints["status"] == "ok").sum() == expected - 1
    assert by_id.loc["same-as-000", "duplicate_of"] == "lora-000"
    assert by_id.loc["same-as-000", "hash"] == by_id.loc["lora-000", "hash"]
    assert checkpoints["duplicate_of"].notna().sum() == 1
    assert "same-as-000" not in set(layers["id"])  # a duplicate's layers are not repeated
    assert set(checkpoints["family"].dropna()) >= {"lora", "bora", "melora", "hydralora", "composition"}
    run = checkpoints[checkpoints["run"].notna()]
    assert sorted(run["step"]) == [10, 20] and set(run["run"]) == {str(zoo / "run")}
    ok = checkpoints[(checkpoints["status"] == "ok") & checkpoints["duplicate_of"].isna()]
    assert len(layers) == ok["layers"].sum()
    grid = layers[layers["path"].str.contains("/grid/")]
    assert set(grid["module_type"]) == {"q_proj", "v_proj"} and set(grid["layer_index"]) == {0, 1}
    assert set(grid["r"]) == set(map(float, RANKS)) and (grid["rank_bound"] == grid["r"]).all()


@pytest.mark.parametrize("seed", [0, 7, 42, 131], ids=lambda s: f"lora-{s:03d}")
def test_metrics_match_a_dense_float64_svd(zoo, serial, seed):
    layers = serial[0]
    rank, alpha = RANKS[seed % len(RANKS)], 2 * RANKS[seed % len(RANKS)] + seed % 5
    hidden = (8, 12, 16)[seed % 3]
    rows = layers[layers["id"] == f"lora-{seed:03d}"].set_index("layer")
    assert len(rows) == 4
    for i in range(2):
        for j, name in enumerate(("q_proj", "v_proj")):
            a, b = random_factors(hidden, hidden, rank, 1000 * seed + 10 * i + j)
            delta = (alpha / rank) * b.double() @ a.double()
            sigma = torch.linalg.svdvals(delta)
            sigma = sigma[sigma > sigma[0] * 1e-12]
            p = sigma / sigma.sum()
            row = rows.loc[f"model.layers.{i}.self_attn.{name}"]
            assert row["sigma_max"] == pytest.approx(sigma[0].item(), rel=1e-10)
            assert row["frobenius"] == pytest.approx(torch.linalg.norm(delta).item(), rel=1e-10)
            assert row["erank"] == pytest.approx(math.exp(-(p * p.log()).sum().item()), rel=1e-9)
            assert row["stable_rank"] == pytest.approx((sigma**2).sum().item() / sigma[0].item() ** 2, rel=1e-9)
            assert row["count_above[0.005]"] == int((sigma > 0.005).sum())
            assert row["scale"] == pytest.approx(alpha / rank)


def _comparable(layers: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    checkpoints = layers.checkpoints.drop(columns=["seconds"])
    return _sorted(layers, ["id", "layer"]), _sorted(checkpoints, ["id"])


def test_the_frame_keeps_only_scalars_in_attrs_so_pandas_works_on_it(serial):
    layers, checkpoints, _ = serial
    assert all(isinstance(value, (int, float, str, bool)) for value in layers.attrs.values())
    described = layers.groupby("module_type").describe()  # refused while attrs held the checkpoints DataFrame
    q = layers[layers["module_type"] == "q_proj"]["erank"]
    assert described.loc["q_proj", ("erank", "count")] == len(q)
    assert described.loc["q_proj", ("erank", "mean")] == pytest.approx(q.mean(), rel=1e-12)
    assert len(pd.concat([layers, layers])) == 2 * len(layers)
    again = pickle.loads(pickle.dumps(layers))
    pd.testing.assert_frame_equal(again.checkpoints, checkpoints)
    assert type(layers[layers["r"] == 4]) is pd.DataFrame  # a derived frame does not claim the whole sweep's table


class _KillsItsReader:
    """Unpickling it runs ``os.kill(os.getpid(), SIGKILL)`` in whatever process reads the file."""

    def __reduce__(self):
        return (exec, ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)",))


def test_a_killed_worker_is_the_error_row_of_its_checkpoint_and_the_sweep_goes_on(zoo, serial, tmp_path):
    """Real deaths: two checkpoints whose adapter_model.bin, unpickled in full (trust_pickle, as --trust-pickle
    does), SIGKILLs the worker process reading it — what the out-of-memory killer does. Workers are recycled too."""
    assert executors.pool_problem() is None  # serially, the file would kill pytest itself
    killers = []
    for name in ("kill-a", "kill-b"):
        folder = tmp_path / name
        folder.mkdir()
        shutil.copy(zoo / "grid" / "lora-001" / "adapter_config.json", folder)
        torch.save({"base_model.model.x.lora_A.weight": _KillsItsReader()}, folder / "adapter_model.bin")
        killers.append(folder)
    grid = sorted((zoo / "grid").iterdir())[:12]
    inputs = [*grid[:3], killers[0], *grid[3:5], killers[1], *grid[5:]]
    faulthandler.dump_traceback_later(180, exit=True)  # a hang would be the bug under test: end the run, loudly
    try:
        layers = rankscope.sweep(inputs, jobs=2, max_tasks_per_child=4, trust_pickle=True)
    finally:
        faulthandler.cancel_dump_traceback_later()
    assert multiprocessing.active_children() == []
    checkpoints = layers.checkpoints.set_index("id")
    assert list(checkpoints.index) == [p.name for p in inputs]
    for folder in killers:
        row = checkpoints.loc[folder.name]
        assert row["status"] == "error"
        assert row["error"] == f"{folder}: worker died (signal 9: SIGKILL, e.g. out of memory) while reading it"
    ids = [p.name for p in grid]
    assert (checkpoints.loc[ids, "status"] == "ok").all()
    expected = serial[0][serial[0]["id"].isin(ids)]
    assert layers["run"].isna().all() and expected["run"].isna().all()  # no run here: None, an object column
    got, want = (_sorted(data, ["id", "layer"]).drop(columns=["run", "step"]) for data in (layers, expected))
    pd.testing.assert_frame_equal(got, want, rtol=1e-12)


def test_the_pool_gives_the_serial_rows(zoo, serial):
    layers = rankscope.sweep([zoo], jobs=2, max_tasks_per_child=60)  # workers are replaced mid-sweep
    expected = _comparable(serial[0])
    for got, want in zip(_comparable(layers), expected, strict=True):
        pd.testing.assert_frame_equal(got, want, check_exact=False, rtol=1e-12)


def test_ray_gives_the_serial_rows(zoo, serial, tmp_path, monkeypatch):
    try:
        import ray
    except ImportError as exc:  # the test extras install ray; only a bare install skips
        pytest.skip(f"ray is not importable: {exc}")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    layers = rankscope.sweep([zoo], tmp_path / "out", ray=True, jobs=2)
    assert not ray.is_initialized()  # the runtime the sweep started is shut down
    expected = _comparable(serial[0])
    for got, want in zip(_comparable(layers), expected, strict=True):
        pd.testing.assert_frame_equal(got, want, check_exact=False, rtol=1e-12)
    on_disk = pd.read_parquet(tmp_path / "out" / "layers.parquet")
    assert len(on_disk) == len(layers)


def test_resume_skips_done_work(zoo, tmp_path, monkeypatch):
    first = sorted((zoo / "grid").iterdir())[:6]
    out = tmp_path / "out"
    rankscope.sweep(first, out, jobs=1, table="csv")
    loads = []
    real_load = worker.load
    monkeypatch.setattr(worker, "load", lambda path, **kw: loads.append(path) or real_load(path, **kw))
    more = [*first, zoo / "grid" / "lora-100", zoo / "broken"]
    layers = rankscope.sweep(more, out, jobs=1, table="csv", resume=True)
    assert sorted(Path(p).name for p in loads) == ["damaged", "lora-100"]  # only the new and the failed
    assert layers.attrs["resumed"] == 6
    checkpoints = pd.read_csv(out / "checkpoints.csv")
    assert len(checkpoints) == 8 and (checkpoints["status"] == "ok").sum() == 7
    assert len(pd.read_csv(out / "layers.csv")) == len(layers) == 7 * 4


def test_an_interrupted_sweep_leaves_the_last_complete_batch(zoo, tmp_path, monkeypatch):
    monkeypatch.setattr(sweep_run, "BATCH_SECONDS", 0.0)
    out = tmp_path / "out"

    def progress(done, failed, total):
        if done == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        rankscope.sweep(sorted((zoo / "grid").iterdir())[:10], out, jobs=1, progress=progress)
    checkpoints = pd.read_parquet(out / "checkpoints.parquet")
    assert list(checkpoints["id"]) == [f"lora-{i:03d}" for i in range(4)]
    assert len(pd.read_parquet(out / "layers.parquet")) == 4 * 4
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints.parquet", "layers.parquet"]  # no temporaries


def test_cli_sweep_globs_lists_and_errors(zoo, tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text(f"# two more\n{zoo / 'broken' / 'damaged'}\n{zoo / 'families' / 'bora-r8-b4'}\n")
    out = tmp_path / "out"
    result = CliRunner().invoke(
        main, ["sweep", str(zoo / "grid" / "lora-00[0-2]"), "--from", str(listing), "-o", str(out), "--jobs", "1",
               "--table", "csv", "--threshold", "0.5"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "damaged/adapter_model.safetensors" in result.stderr and "4 of 5 checkpoints analysed" in result.stderr
    checkpoints = pd.read_csv(out / "checkpoints.csv")
    assert list(checkpoints["status"]) == ["ok", "ok", "ok", "error", "ok"]
    layers = pd.read_csv(out / "layers.csv")
    assert "count_above[0.5]" in layers.columns and "count_above[0.005]" not in layers.columns
    failed = CliRunner().invoke(main, ["sweep", str(zoo / "broken"), "-o", str(tmp_path / "bad"), "--table", "csv"])
    assert failed.exit_code == 1 and "no checkpoint could be analysed" in failed.stderr
    assert pd.read_csv(tmp_path / "bad" / "checkpoints.csv")["status"].tolist() == ["error"]
    usage = CliRunner().invoke(main, ["sweep", "-o", str(out)])
    assert usage.exit_code == 2 and "INPUTS" in usage.stderr
    usage = CliRunner().invoke(main, ["sweep", str(zoo / "grid" / "lora-000"), "-o", str(out), "--weights", "1"])
    assert usage.exit_code == 2 and "--compose" in usage.stderr


def test_a_link_back_up_the_tree_is_not_followed(tmp_path):
    """A directory symlink to an ancestor (a cycle) is left out with a warning: each adapter found once, not once
    per trip round the loop."""
    from rankscope.sweeps.inputs import discover

    _lora(tmp_path / "zoo" / "a", 1)
    _lora(tmp_path / "zoo" / "deeper" / "b", 2)
    (tmp_path / "zoo" / "deeper" / "up").symlink_to(tmp_path / "zoo", target_is_directory=True)
    warnings: list[str] = []
    items = discover([tmp_path / "zoo"], warnings)
    assert sorted(Path(item.path).name for item in items) == ["a", "b"]
    assert any("a link back to" in w and "(a cycle); not followed" in w for w in warnings)
