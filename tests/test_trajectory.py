"""rankscope trajectory: run discovery and step order, drift and relative change against a dense float64
reference, the callback's JSONL, and the command's outputs and refusals."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from rankscope.analysis.options import AnalysisOptions
from rankscope.cli import main
from rankscope.trajectory.build import checkpoint_trajectory, jsonl_trajectory
from rankscope.trajectory.discover import ordered_paths, run_checkpoints
from tests.factories import PREFIX, lora_config, random_factors, write_lora

RANK, ALPHA, HIDDEN = 4, 8, 12
MODULES = ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "model.layers.0.mlp.down_proj")


def _state(folder, step):
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": []}))


# -- discovery and order ---------------------------------------------------------------------------------------
def test_trainer_steps_come_from_trainer_state_json_else_from_the_name(tmp_path):
    for name, step in (("checkpoint-10", 30), ("checkpoint-20", 20), ("checkpoint-5", None)):
        (tmp_path / name).mkdir()
        if step is not None:
            _state(tmp_path / name, step)
    (tmp_path / "runs").mkdir()  # not a checkpoint: ignored
    found = run_checkpoints(tmp_path)
    assert [(step, path.name) for step, path in found] == [(5, "checkpoint-5"), (20, "checkpoint-20"),
                                                           (30, "checkpoint-10")]  # fmt: skip


def test_lightning_names_and_non_runs(tmp_path):
    for name in ("epoch=1-step=1000.ckpt", "epoch=0-step=90.ckpt", "epoch=0-step=500.ckpt", "last.ckpt"):
        (tmp_path / name).write_bytes(b"")
    assert [(s, p.name) for s, p in run_checkpoints(tmp_path)] == [
        (90, "epoch=0-step=90.ckpt"), (500, "epoch=0-step=500.ckpt"), (1000, "epoch=1-step=1000.ckpt")]  # fmt: skip
    adapter = write_lora(tmp_path / "adapter", {MODULES[0]: random_factors(HIDDEN, HIDDEN, RANK, 0)}, lora_config())
    assert run_checkpoints(adapter) is None
    assert run_checkpoints(adapter / "adapter_model.safetensors") is None
    assert run_checkpoints(tmp_path / "missing") is None


def test_explicit_paths_in_natural_order(tmp_path):
    paths = [tmp_path / f"ckpt-{n}" for n in (1000, 1500, 500)]  # a shell glob's order
    assert [(s, p.name) for s, p in ordered_paths(paths)] == [(500, "ckpt-500"), (1000, "ckpt-1000"),
                                                              (1500, "ckpt-1500")]  # fmt: skip
    rounds = [tmp_path / name for name in ("round2", "round10", "round1")]
    assert [p.name for _, p in ordered_paths(rounds)] == ["round1", "round2", "round10"]
    named = [tmp_path / "b-final", tmp_path / "a-final"]  # no number: positions in natural order
    assert [(s, p.name) for s, p in ordered_paths(named)] == [(0, "a-final"), (1, "b-final")]


# -- drift against a float64 dense reference -------------------------------------------------------------------
def _run(tmp_path, factors_by_step):
    """A Trainer output_dir: checkpoint-N/ per step (names out of order on purpose), trainer_state.json each."""
    run = tmp_path / "run"
    config = lora_config(r=RANK, lora_alpha=ALPHA, target_modules=["q_proj", "down_proj"])
    for step, factors in factors_by_step.items():
        folder = write_lora(run / f"checkpoint-{step}", factors, config)
        _state(folder, step)
    return run


def _dense(folder, module):
    tensors = load_file(folder / "adapter_model.safetensors")
    a = tensors[f"{PREFIX}{module}.lora_A.weight"].double()
    b = tensors[f"{PREFIX}{module}.lora_B.weight"].double()
    return (ALPHA / RANK) * b @ a


def _overlap(w_a, w_b):
    u_a, s_a = torch.linalg.svd(w_a)[:2]
    u_b, s_b = torch.linalg.svd(w_b)[:2]
    k = min(int((s_a > s_a[0] * 1e-12).sum()), int((s_b > s_b[0] * 1e-12).sum()))
    return float((u_a[:, :k].T @ u_b[:, :k]).pow(2).sum()) / k


def _drift_run(tmp_path):
    steps = {}
    for step in (100, 200, 300):
        steps[step] = {m: random_factors(HIDDEN, HIDDEN, RANK, 7 * step + i) for i, m in enumerate(MODULES)}
    # step 400 moves q_proj of layer 0 by 1e-6 of B: ‖a‖² + ‖b‖² − 2⟨a, b⟩ would cancel to rounding here
    nearly = dict(steps[300])
    a, b = nearly[MODULES[0]]
    nearly[MODULES[0]] = (a, b + 1e-6 * torch.randn(b.shape, generator=torch.Generator().manual_seed(3)))
    steps[400] = nearly
    return _run(tmp_path, steps)


def test_relative_change_and_subspace_overlaps_match_a_dense_reference(tmp_path):
    run = _drift_run(tmp_path)
    result = checkpoint_trajectory(run_checkpoints(run))
    assert result.steps == [100, 200, 300, 400]
    assert len(result.drift) == 3 * len(MODULES)
    for record in result.drift:
        now, before = run / f"checkpoint-{record['step']}", run / f"checkpoint-{record['previous_step']}"
        w_now, w_before, w_final = (_dense(f, record["layer"]) for f in (now, before, run / "checkpoint-400"))
        change = torch.linalg.matrix_norm(w_now - w_before).item()
        expected = change / torch.linalg.matrix_norm(w_now).item()
        assert record["relative_change"] == pytest.approx(expected, rel=1e-9, abs=1e-300)
        for side, reference in (("previous", w_before), ("final", w_final)):
            overlap = _overlap(w_now, reference)
            assert record[side]["left"] == pytest.approx(overlap, abs=1e-9)
            assert record[side]["right"] == pytest.approx(_overlap(w_now.T, reference.T), abs=1e-9)
            assert record[side]["drift"] == pytest.approx(1 - (record[side]["left"] + record[side]["right"]) / 2)
    tiny = next(r for r in result.drift if r["step"] == 400 and r["layer"] == MODULES[0])
    assert 1e-8 < tiny["relative_change"] < 1e-5  # the exact, tiny change, not rounding noise
    untouched = next(r for r in result.drift if r["step"] == 400 and r["layer"] == MODULES[1])
    assert untouched["relative_change"] == 0.0 and untouched["previous"]["drift"] == pytest.approx(0, abs=1e-12)


# -- the callback's JSONL --------------------------------------------------------------------------------------
def _line(step, sigma, epoch=None, name=MODULES[0]):
    layer = {"name": name, "shape": [HIDDEN, HIDDEN], "rank_bound": RANK, "sigma": sigma}
    return json.dumps({"schema": "rankscope.callback/1", "step": step, "epoch": epoch, "layers": [layer]})


def test_jsonl_metrics_from_sigma_in_step_order(tmp_path):
    path = tmp_path / "rankscope.jsonl"
    lines = [_line(20, [3.0, 1.0, 0.5, 0.001]), _line(10, [2.0, 0.2, 0.0, 0.0], 0.5), _line(20, [4.0, 2.0, 1.0, 0.1])]
    path.write_text("\n".join(lines) + "\n\n")
    result = jsonl_trajectory(path)
    assert result.steps == [10, 20] and result.points[0].epoch == 0.5 and result.drift == []
    assert any("logged more than once" in w for w in result.warnings)
    sigma = [4.0, 2.0, 1.0, 0.1]  # the last line of step 20 wins
    record = result.points[1].layers[0]
    shares = [s / sum(sigma) for s in sigma]
    assert record.metric("erank") == pytest.approx(math.exp(-sum(p * math.log(p) for p in shares)))
    assert record.metric("stable_rank") == pytest.approx(sum(s * s for s in sigma) / 16.0)
    assert record.metric("count_above", 0.005) == 4 and result.points[0].layers[0].metric("count_above", 0.005) == 2
    assert record.module_type == "q_proj"


@pytest.mark.parametrize(
    "line, message",
    [
        ("not json", "not JSON"),
        (json.dumps({"schema": "other/1", "step": 1, "layers": []}), "not a rankscope.callback/1 line"),
        (_line(1.5, [1.0]), "step must be an integer"),
        (_line(1, [1.0, 2.0]), "not in descending order"),
    ],
)
def test_bad_jsonl_is_one_line_naming_the_file_and_line(tmp_path, line, message):
    path = tmp_path / "log.jsonl"
    path.write_text(_line(0, [1.0]) + "\n" + line + "\n")
    result = CliRunner().invoke(main, ["trajectory", str(path)])
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1 and f"{path}:2" in result.stderr and message in result.stderr


# -- the command -----------------------------------------------------------------------------------------------
def test_cli_writes_json_csv_and_a_report_folder(tmp_path):
    run = _drift_run(tmp_path)
    out, report = tmp_path / "t.json", tmp_path / "report"
    args = ["trajectory", str(run), "--json", str(out), "--csv", str(tmp_path / "t.csv"), "-o", str(report)]
    result = CliRunner().invoke(main, [*args, "--figures", "svg"])
    assert result.exit_code == 0, result.output
    document = json.loads(out.read_text())
    assert document["schema"] == "rankscope.trajectory/1" and document["source"] == "checkpoints"
    assert [c["step"] for c in document["checkpoints"]] == [100, 200, 300, 400]
    assert all(type(c["step"]) is int for c in document["checkpoints"])
    first = document["checkpoints"][0]
    layer = next(r for r in first["layers"] if r["name"] == MODULES[2])
    dense = torch.linalg.svdvals(_dense(run / "checkpoint-100", MODULES[2]))[:RANK]
    assert layer["singular_values"] == pytest.approx(dense.tolist(), rel=1e-10)
    assert layer["module_type"] == "down_proj" and "erank" in layer["metrics"]
    q_types = [r for r in document["checkpoints"][2]["layers"] if r["module_type"] == "q_proj"]
    mean = sum(r["metrics"]["erank"] for r in q_types) / 2
    assert document["by_module_type"]["q_proj"]["erank"][2] == pytest.approx(mean) and len(q_types) == 2
    assert len(document["drift"]) == 9 and document["headlines"]["drift_available"]
    assert document["headlines"]["saturation_step"] == 100  # full rank from the first step
    rows = (tmp_path / "t.csv").read_text().splitlines()
    assert len(rows) == 1 + 4 * len(MODULES) and rows[0].startswith("step,path,layer,module_type")
    written = sorted(p.name for p in report.iterdir())  # the run report's page, without final/
    assert written == [".rankscope-report", "figures", "index.html", "trajectory.csv", "trajectory.json"]
    assert sorted(p.name for p in (report / "figures").iterdir()) == [
        "count_by_step.svg", "drift.svg", "erank_by_step.svg", "erank_heatmap.svg"]  # fmt: skip
    assert json.loads((report / "trajectory.json").read_text()) == document
    page = (report / "index.html").read_text()
    assert 'id="step-table"' in page and "final/index.html" not in page


def test_cli_reads_the_callback_jsonl_and_says_drift_is_not_available(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text(_line(5, [1.0, 0.5]) + "\n" + _line(10, [1.0, 0.9]) + "\n")
    result = CliRunner().invoke(main, ["trajectory", str(path), "--json", "-"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert [c["step"] for c in document["checkpoints"]] == [5, 10] and document["drift"] == []
    assert "drift is not available" in result.stderr
    assert document["headlines"]["still_growing"] is False and document["headlines"]["saturation_step"] == 5


def test_cli_refusals(tmp_path):
    runner = CliRunner()
    adapter = write_lora(tmp_path / "adapter", {MODULES[0]: random_factors(HIDDEN, HIDDEN, RANK, 0)}, lora_config())
    run = _run(tmp_path, {1: {MODULES[0]: random_factors(HIDDEN, HIDDEN, RANK, 1)}})
    again = _run(tmp_path / "again", {1: {MODULES[0]: random_factors(HIDDEN, HIDDEN, RANK, 2)}})
    cases = [
        (["trajectory", str(run / "checkpoint-1"), str(again / "checkpoint-1")], 1, "two checkpoints at step 1"),
        (["trajectory", str(tmp_path / "missing")], 1, "no such file or directory"),
        (["trajectory", str(adapter)], 1, "not a training run"),
        (["trajectory", str(run), str(adapter)], 2, "is a run folder"),
        (["trajectory", str(tmp_path / "x.jsonl"), str(adapter)], 2, "read on its own"),
        (["trajectory", str(run), "--drift-threshold", "2"], 2, "--drift-threshold"),
        (["trajectory", str(run), "--json", str(tmp_path / "a"), "--csv", str(tmp_path / "a")], 2, "both write"),
    ]
    for args, code, message in cases:
        result = runner.invoke(main, args)
        assert result.exit_code == code, (args, result.output)
        assert result.stderr.count("\n") == 1 and message in result.stderr, (args, result.stderr)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    result = runner.invoke(main, ["trajectory", str(run), "-o", str(mine), "--json", str(tmp_path / "t.json")])
    assert result.exit_code == 1 and "was not written by rankscope" in result.stderr
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"] and not (tmp_path / "t.json").exists()


def test_a_lightning_run_is_read_end_to_end(tmp_path):
    """Lightning's ``{"state_dict": …}`` files with PEFT keys (formats/training.py) in step order, not name order."""
    for step in (90, 500, 1000):
        state = {}
        for i, module in enumerate(MODULES[:2]):
            a, b = random_factors(HIDDEN, HIDDEN, RANK, step + i)
            state[f"model.{module}.lora_A.default.weight"] = a
            state[f"model.{module}.lora_B.default.weight"] = b
        epoch = 0 if step < 1000 else 1
        torch.save({"state_dict": state, "epoch": epoch}, tmp_path / f"epoch={epoch}-step={step}.ckpt")
    result = CliRunner().invoke(main, ["trajectory", str(tmp_path), "--alpha", str(ALPHA), "--json", "-", "-q"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert [c["step"] for c in document["checkpoints"]] == [90, 500, 1000]
    assert [d["previous_step"] for d in document["drift"]] == [90, 90, 500, 500]
    assert document["checkpoints"][1]["path"].endswith("epoch=0-step=500.ckpt")
    assert [c["epoch"] for c in document["checkpoints"]] == [0.0, 0.0, 1.0]  # from the file names


def test_trainer_checkpoints_carry_their_epoch(tmp_path):
    """A Trainer checkpoint's epoch is trainer_state.json's (fractional); a folder without it has none."""
    run = _run(tmp_path, {step: {MODULES[0]: random_factors(HIDDEN, HIDDEN, RANK, step)} for step in (10, 20, 30)})
    for step, epoch in ((10, 0.25), (20, 0.5)):
        (run / f"checkpoint-{step}" / "trainer_state.json").write_text(
            json.dumps({"global_step": step, "epoch": epoch, "log_history": []})
        )
    result = CliRunner().invoke(main, ["trajectory", str(run), "--json", "-", "-q"])
    assert result.exit_code == 0, result.output
    assert [(c["step"], c["epoch"]) for c in json.loads(result.stdout)["checkpoints"]] == [
        (10, 0.25),
        (20, 0.5),
        (30, None),
    ]


def test_the_shipped_trajectory_ends_at_the_bundled_adapter():
    """examples/checkpoints/trajectory (examples/train_trajectory.py): 12 Trainer checkpoints, steps from their
    trainer_state.json, the last one the bundled tiny-lora itself; its σ against a dense float64 SVD."""
    examples = Path(__file__).resolve().parents[1] / "examples" / "checkpoints"
    entries = run_checkpoints(examples / "trajectory")
    assert [step for step, _ in entries] == list(range(25, 301, 25))
    last = load_file(entries[-1][1] / "adapter_model.safetensors")
    bundled = load_file(examples / "tiny-lora" / "adapter_model.safetensors")
    assert last.keys() == bundled.keys() and all(torch.equal(last[k], bundled[k]) for k in bundled)
    result = checkpoint_trajectory(entries[-2:], AnalysisOptions(layers="q_proj"))
    name = "model.layers.1.self_attn.q_proj"
    a = last[f"{PREFIX}{name}.lora_A.weight"].double()
    b = last[f"{PREFIX}{name}.lora_B.weight"].double()
    record = next(r for r in result.points[-1].layers if r.name == name)
    expected = torch.linalg.svdvals(2.0 * b @ a)[:8]  # α/r = 16/8
    assert record.singular_values == pytest.approx(expected.tolist(), rel=1e-10)
    assert len(result.drift) == 2 and all(d["relative_change"] > 0 for d in result.drift)
