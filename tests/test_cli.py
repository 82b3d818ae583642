"""The spectrum command end to end: outputs, contract, options, and one real process."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from rankscope.cli import main

from .factories import llama_like, lora_config, random_factors, write_lora


@pytest.fixture()
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture()
def adapter(tmp_path: Path) -> Path:
    return llama_like(tmp_path / "adapter", layers=12, hidden=24, rank=4)


def spectrum(runner: CliRunner, *args: str):
    return runner.invoke(main, ["spectrum", *map(str, args)], catch_exceptions=False)


def expected_sigma(a: torch.Tensor, b: torch.Tensor, scale: float) -> list[float]:
    return torch.linalg.svdvals(scale * b.double() @ a.double())[: a.shape[0]].tolist()


def test_table_and_summary(runner, adapter):
    result = spectrum(runner, adapter)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split()[:4] == ["layer", "m×n", "r≤", "σ₁"]
    assert "model.layers.11.self_attn.v_proj" in result.stdout
    assert "24 layers" in result.stdout or "24/24 layers" in result.stdout
    assert "q_proj" in result.stdout.split("module")[-1]


def test_json_contract(runner, adapter, tmp_path):
    out = tmp_path / "out.json"
    result = spectrum(runner, adapter, "--json", out, "--threshold", "0.005", "--threshold", "0.01", "-q")
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"non-finite {c} in JSON"))
    assert doc["schema"] == "rankscope.spectrum/1"
    assert doc["checkpoint"]["family"] == "lora" and doc["checkpoint"]["adapter_type"] == "LORA"
    assert doc["skipped"] == []
    names = [layer["name"] for layer in doc["layers"]]
    assert names.index("model.layers.2.self_attn.q_proj") < names.index("model.layers.10.self_attn.q_proj")
    layer = doc["layers"][0]
    for key in ("name", "family", "shape", "matrix_shape", "rank_bound", "params", "scale", "exact", "valid"):
        assert key in layer
    assert layer["scale"] == 2.0 and layer["rank_bound"] == 4 and layer["params"] == 4 * 24 * 2
    assert set(layer["metrics"]["count_above"]) == {"0.005", "0.01"}
    assert set(layer["metrics"]["energy_rank"]) == {"0.9", "0.95", "0.99"}
    a, b = random_factors(24, 24, 4, 0)
    assert layer["name"] == "model.layers.0.self_attn.q_proj"
    assert layer["singular_values"] == pytest.approx(expected_sigma(a, b, 2.0), rel=1e-10)
    assert doc["summary"]["layers"] == 24 and set(doc["summary"]["by_module"]) == {"q_proj", "v_proj"}


def test_json_layout_one_layer_a_line_same_values_as_json_dumps(runner, adapter, tmp_path):
    out = tmp_path / "out.json"
    assert spectrum(runner, adapter, "--json", out, "-q").exit_code == 0
    text = out.read_text()
    doc = json.loads(text)
    lines = text.splitlines()
    start = lines.index('  "layers": [')
    assert lines[start + len(doc["layers"]) + 1] == "  ],"  # the layers take one line each, nothing more
    for layer in doc["layers"]:  # each record on one line of its own, as json.dumps writes it compact
        assert f"    {json.dumps(layer, ensure_ascii=False)}," in lines or f"    {json.dumps(layer)}" in lines
    assert lines[0] == "{" and lines[-1] == "}" and '  "summary": {' in lines


def test_json_refuses_non_finite_and_converts_like_json_dumps():
    from rankscope.report.json import dumps

    odd = {"a": (1, 2.5), "b": [], "c": {}, "d": [{"x": None}, {"y": "ü"}], "e": {1: "int key"}, "f": [[1], [2]]}
    assert json.loads(dumps(odd)) == json.loads(json.dumps(odd))
    for bad in ({"x": float("nan")}, {"x": [{"y": float("inf")}]}, {"x": {"y": [float("-inf")]}}):
        with pytest.raises(ValueError):
            dumps(bad)


def test_json_to_stdout_moves_the_table_to_stderr(runner, adapter):
    result = spectrum(runner, adapter, "--json", "-")
    assert result.exit_code == 0
    doc = json.loads(result.stdout)
    assert len(doc["layers"]) == 24
    assert "layer" in result.stderr and "σ₁" in result.stderr


def test_csv(runner, adapter, tmp_path):
    out = tmp_path / "layers.csv"
    assert spectrum(runner, adapter, "--csv", out, "-q").exit_code == 0
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert len(rows) == 24
    assert rows[0]["name"] == "model.layers.0.self_attn.q_proj" and rows[0]["shape"] == "24x24"
    assert int(rows[0]["count_above[0.005]"]) == 4 and float(rows[0]["erank"]) > 1


def test_layer_filter_and_unscaled(runner, adapter):
    result = spectrum(runner, adapter, "--layers", r"layers\.1\..*q_proj", "--unscaled", "--json", "-", "-q")
    doc = json.loads(result.stdout)
    assert [layer["name"] for layer in doc["layers"]] == ["model.layers.1.self_attn.q_proj"]
    assert doc["scaled"] is False and "without α/r" in doc["scaling"]
    a, b = random_factors(24, 24, 4, 10)
    assert doc["layers"][0]["singular_values"] == pytest.approx(expected_sigma(a, b, 1.0), rel=1e-10)
    assert spectrum(runner, adapter, "--layers", "nothing_matches").exit_code == 1
    assert spectrum(runner, adapter, "--layers", "(").exit_code == 2  # a usage mistake, not a bad input


def test_dense_path_agrees(runner, adapter):
    factored = json.loads(spectrum(runner, adapter, "--json", "-", "-q").stdout)
    dense = json.loads(spectrum(runner, adapter, "--json", "-", "-q", "--dense", "--device", "cpu").stdout)
    layer_f, layer_d = factored["layers"][3], dense["layers"][3]
    assert len(layer_d["singular_values"]) == 24 and layer_d["exact"] is True
    assert layer_d["singular_values"][:4] == pytest.approx(layer_f["singular_values"], rel=1e-9)
    approx = json.loads(spectrum(runner, adapter, "--json", "-", "-q", "--dense", "--dense-dtype", "float32").stdout)
    assert approx["layers"][0]["exact"] is False


def test_rslora_and_patterns(runner, tmp_path):
    factors = {
        "model.layers.0.mlp.up_proj": random_factors(16, 8, 4, 1),
        "model.layers.0.mlp.down_proj": random_factors(8, 16, 2, 2),
    }
    config = lora_config(
        r=4, lora_alpha=8, use_rslora=True, rank_pattern={"down_proj": 2}, alpha_pattern={"down_proj": 3}
    )
    doc = json.loads(spectrum(runner, write_lora(tmp_path / "a", factors, config), "--json", "-", "-q").stdout)
    scales = {layer["name"].rsplit(".", 1)[-1]: layer["scale"] for layer in doc["layers"]}
    assert scales["up_proj"] == pytest.approx(8 / 2) and scales["down_proj"] == pytest.approx(3 / 2**0.5)
    assert doc["checkpoint"]["adapter_type"] == "RSLORA"


def test_zero_update_is_valid_with_zero_metrics(runner, tmp_path):
    a, _ = random_factors(8, 8, 4, 0)
    directory = write_lora(tmp_path / "z", {"lin": (a, torch.zeros(8, 4))}, lora_config())
    doc = json.loads(spectrum(runner, directory, "--json", "-", "-q").stdout)
    metrics = doc["layers"][0]["metrics"]
    assert metrics["erank"] == 0 and metrics["stable_rank"] == 0 and metrics["count_above"]["0.005"] == 0


def test_version_and_help(runner):
    assert runner.invoke(main, ["--version"]).output.startswith("rankscope, version")
    assert "--threshold" in runner.invoke(main, ["spectrum", "--help"]).output


def test_installed_command_runs_as_a_process(adapter, tmp_path):
    out = tmp_path / "out.json"
    exe = Path(sys.executable).with_name("rankscope")
    command = [str(exe)] if exe.exists() else [sys.executable, "-m", "rankscope.cli"]
    proc = subprocess.run(
        [*command, "spectrum", str(adapter), "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert proc.returncode == 0, proc.stderr
    assert "model.layers.0.self_attn.q_proj" in proc.stdout
    assert json.loads(out.read_text())["summary"]["valid_layers"] == 24


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--layers", "("], "--layers '(' is not a valid regular expression"),
        (["--threshold", "-1"], "threshold -1.0 must be a finite number ≥ 0"),
        (["--energy", "2"], "energy fraction 2.0 is not in (0, 1]"),
        (["--format", "nope"], "--format 'nope' is unknown"),
        (["--alpha", "-1"], "--alpha must be a finite positive number"),
        (["--mode", "sequential"], "--mode applies only with --compose"),
        (["--weights", "1,2"], "--weights applies only with --compose"),
        (["--json", "-", "--csv", "-"], "--json and --csv both write to stdout"),
        (["--no-such-option"], "No such option '--no-such-option'"),
    ],
)
def test_usage_mistakes_exit_2_with_one_line(runner, adapter, tmp_path, args, message):
    result = spectrum(runner, adapter, *args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rankscope: error: ") and message in lines[0]
    assert "Traceback" not in result.output


def test_one_file_named_twice_is_refused_before_anything_is_written(runner, adapter, tmp_path):
    out = tmp_path / "both.out"
    result = spectrum(runner, adapter, "--json", out, "--csv", tmp_path / "." / "both.out")
    assert result.exit_code == 2 and "both write to" in result.stderr
    assert not out.exists()


def test_version_and_help_import_no_torch():
    """``rankscope --version``/``--help`` answer at once: the package is a lazy façade (PEP 562)."""
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from rankscope.cli import main\n"
        "for args in (['--version'], ['--help'], ['spectrum', '--help']):\n"
        "    assert CliRunner().invoke(main, args).exit_code == 0, args\n"
        "heavy = sorted(m for m in ('torch', 'numpy', 'matplotlib', 'safetensors') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
        "import rankscope\n"
        "assert sorted(rankscope.__all__) == sorted(n for n in rankscope.__all__ if hasattr(rankscope, n))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_every_threshold_gets_a_column(runner, adapter):
    result = spectrum(runner, adapter, "--threshold", "0.005", "--threshold", "1e9")
    assert result.exit_code == 0, result.output
    header, _, first = result.stdout.splitlines()[:3]
    assert "#σ>0.005" in header and "#σ>1e+09" in header
    cells = first.split()
    assert cells[header.split().index("#σ>1e+09")] == "0"  # no σ is that large
