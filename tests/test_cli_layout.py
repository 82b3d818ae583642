"""What ``compare`` and ``report`` print around their results: progress over every phase (only on a terminal),
messages labelled by checkpoint, tables that fit the terminal, checkpoints in natural order."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

import rankscope
from rankscope.cli import main
from rankscope.report import progress as progress_module

from .factories import llama_like, random_factors, write_lora


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """checkpoint-500 … checkpoint-5500 (11 adapters of one base), and ``noconfig``: an adapter whose missing
    config makes the load warn."""
    root = tmp_path_factory.mktemp("layout")
    for index, step in enumerate(range(500, 6000, 500)):
        llama_like(root / f"checkpoint-{step}", layers=2, hidden=16, rank=2, seed=index)
    write_lora(root / "noconfig", {"model.layers.0.self_attn.q_proj": random_factors(16, 16, 2, 9)}, None)
    return root


def _steps(runs: Path, count: int = 11) -> list[str]:
    return sorted(str(p) for p in runs.glob("checkpoint-*"))[:count]  # string order, as a shell glob gives them


def test_no_progress_when_stderr_is_not_a_terminal(runs, tmp_path):
    paths = _steps(runs, 3)
    result = CliRunner().invoke(main, ["report", *paths, "-o", str(tmp_path / "r"), "--figures", "none"])
    assert result.exit_code == 0, result.output
    assert "\r" not in result.stderr and "analysing" not in result.stderr and "figures" not in result.stderr


def test_progress_names_every_phase_on_a_terminal(runs, tmp_path, monkeypatch):
    monkeypatch.setattr(progress_module, "_is_terminal", lambda stream: True)
    paths = _steps(runs, 2)
    result = CliRunner().invoke(main, ["report", *paths, "-o", str(tmp_path / "r"), "--figures", "none"])
    assert result.exit_code == 0, result.output
    shown = [part.replace("\x1b[K", "") for part in result.stderr.split("\r")]
    phases = ["loading 1/2", "analysing 1/2", "loading 2/2", "analysing 2/2", "comparing", "figures", "writing"]
    positions = [next(i for i, text in enumerate(shown) if text.startswith(phase)) for phase in phases]
    assert positions == sorted(positions)  # each phase shown, in order
    assert any(text.startswith("figures [") for text in shown)  # with its bar
    result = CliRunner().invoke(main, ["compare", *paths, "--json", str(tmp_path / "c.json")])
    assert result.exit_code == 0 and "\rcomparing" in result.stderr and "\ranalysing 2/2" in result.stderr


def test_messages_say_which_checkpoint_they_are_about(runs, tmp_path):
    paths = [str(runs / "checkpoint-500"), str(runs / "noconfig")]
    out = tmp_path / "r"
    result = CliRunner().invoke(main, ["report", *paths, "-o", str(out), "--figures", "none"])
    assert result.exit_code == 0, result.output
    warning = next(line for line in result.stderr.splitlines() if "adapter_config.json" in line)
    assert warning.startswith("rankscope: warning: noconfig: ")
    assert "checkpoint-500" not in warning
    markdown = (out / "summary.md").read_text()
    assert "- **noconfig**: ⚠ no adapter\\_config.json" in markdown
    page = (out / "index.html").read_text()
    assert "⚠ <b>noconfig</b>: no adapter_config.json" in page
    result = CliRunner().invoke(main, ["compare", *paths, "-q"])
    assert "rankscope: warning: noconfig: no adapter_config.json" in result.stderr
    single = CliRunner().invoke(main, ["report", paths[1], "-o", str(tmp_path / "one"), "--figures", "none"])
    assert f"warning: {paths[1]}: no adapter_config.json" in single.stderr  # one checkpoint: its path, as before


def test_eleven_checkpoints_fit_a_100_column_terminal(runs):
    result = CliRunner().invoke(main, ["compare", *_steps(runs)], env={"COLUMNS": "100"})
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert max(len(line) for line in lines) <= 100, max(lines, key=len)
    for step in range(500, 6000, 500):  # every checkpoint's numbers are still there
        assert any(f"checkpoint-{step} " in line for line in lines)
    assert sum("layers.1.self_attn.v_proj" in line for line in lines) == 1  # once: its first row
    wide = CliRunner().invoke(main, ["compare", *_steps(runs, 2)], env={"COLUMNS": "300"})
    assert "checkpoint-1000 erank" in wide.stdout  # room enough: one row per layer, checkpoints side by side
    narrow = CliRunner().invoke(main, ["compare", *_steps(runs, 3)], env={"COLUMNS": "60"})
    assert max(len(line) for line in narrow.stdout.splitlines()) <= 60


def test_globbed_steps_are_in_natural_order_and_explicit_orders_stay(runs, tmp_path):
    paths = sorted(str(runs / f"checkpoint-{step}") for step in (500, 1000, 1500))  # as a shell glob lists them
    assert [Path(p).name for p in paths] == ["checkpoint-1000", "checkpoint-1500", "checkpoint-500"]
    result = CliRunner().invoke(main, ["compare", *paths, "--json", str(tmp_path / "c.json"), "-q"])
    assert result.exit_code == 0, result.output
    labels = json.loads((tmp_path / "c.json").read_text())["labels"]
    assert labels == ["checkpoint-500", "checkpoint-1000", "checkpoint-1500"]  # the earliest step is the baseline
    given = [paths[1], paths[0]]
    CliRunner().invoke(main, ["compare", *given, "--json", str(tmp_path / "d.json"), "-q"])
    assert json.loads((tmp_path / "d.json").read_text())["labels"] == ["checkpoint-1500", "checkpoint-1000"]


def test_sibling_adapters_are_listed_in_natural_order(tmp_path):
    root = llama_like(tmp_path / "run", layers=1, hidden=8, rank=2)
    for step in (1000, 500, 1500):
        llama_like(root / f"checkpoint-{step}", layers=1, hidden=8, rank=2)
    assert rankscope.load(root).other_adapters == ["checkpoint-500", "checkpoint-1000", "checkpoint-1500"]
