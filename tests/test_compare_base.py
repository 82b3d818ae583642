"""``rankscope compare A B --base BASE``: a PEFT LoRA against a full fine-tune of the same base, the base-aware
metrics side by side (JSON values, CSV columns, the terminal table, the summary), each checked against direct
float64 formulas written here: ‖ΔW‖_F/‖W₀‖_F, σ₁(ΔW)/σ₁(W₀) and the intruder count of Shuttleworth et al. 2024.
"""

from __future__ import annotations

import csv
import io
import json

import pytest
import torch
import transformers
from click.testing import CliRunner
from safetensors.torch import load_file

from rankscope.cli import main

from .factories import quiet_library_warnings  # noqa: F401  (autouse)

TARGETS = ("q_proj", "v_proj")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(base dir, LoRA dir, full fine-tune dir, {label: {layer: ΔW float64}}, {layer: W₀ float64})."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("compare_base")
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(root / "base")
    base = {k: v.double() for k, v in load_file(str(root / "base" / "model.safetensors")).items()}
    # a full fine-tune: every attention and MLP matrix moved by a full-rank perturbation (so the LoRA's two
    # targets are matched, the rest only in the full model)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.ndim == 2 and ("self_attn" in name or "mlp" in name):
                parameter.add_(0.02 * torch.randn(parameter.shape, generator=generator))
    model.save_pretrained(root / "full")
    full = load_file(str(root / "full" / "model.safetensors"))
    lora_model = get_peft_model(
        transformers.LlamaForCausalLM.from_pretrained(root / "base"),
        LoraConfig(r=4, lora_alpha=8, target_modules=list(TARGETS), init_lora_weights=False),
    )
    lora_model.save_pretrained(root / "lora")
    deltas: dict[str, dict[str, torch.Tensor]] = {"lora": {}, "full": {}}
    for name, module in lora_model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            layer = name.removeprefix("base_model.model.")
            b, a = module.lora_B["default"].weight.double(), module.lora_A["default"].weight.double()
            deltas["lora"][layer] = module.scaling["default"] * (b @ a)
            deltas["full"][layer] = full[f"{layer}.weight"].double() - base[f"{layer}.weight"]
    weights = {layer: base[f"{layer}.weight"] for layer in deltas["lora"]}
    return root / "base", root / "lora", root / "full", deltas, weights


def _intruder_count(w0: torch.Tensor, delta: torch.Tensor, k: int = 10, epsilon: float = 0.5) -> int:
    u0 = torch.linalg.svd(w0, full_matrices=False).U
    u = torch.linalg.svd(w0 + delta, full_matrices=False).U
    return int(((u[:, :k].T @ u0).abs().max(dim=1).values < epsilon).sum())


def test_compare_shows_base_metrics_side_by_side(pair, tmp_path, monkeypatch):
    monkeypatch.setenv("RANKSCOPE_CACHE", str(tmp_path / "cache"))
    base, lora, full, deltas, weights = pair
    result = CliRunner().invoke(
        main,
        ["compare", str(lora), str(full), "--base", str(base), "--labels", "lora,full",
         "--json", str(tmp_path / "c.json"), "--csv", str(tmp_path / "c.csv")],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    document = json.loads((tmp_path / "c.json").read_text())
    rows = {row["name"]: row for row in csv.DictReader(io.StringIO((tmp_path / "c.csv").read_text()))}
    assert {layer["name"] for layer in document["layers"]} == set(weights) == set(rows)
    counts = {"lora": [], "full": []}
    for layer in document["layers"]:
        w0 = weights[layer["name"]]
        for label in ("lora", "full"):
            delta = deltas[label][layer["name"]]
            values = layer["values"][label]
            relative = float(delta.norm() / w0.norm())
            sigma = float(torch.linalg.svdvals(delta)[0] / torch.linalg.svdvals(w0)[0])
            count = _intruder_count(w0, delta)
            assert values["relative_update"] == pytest.approx(relative, rel=1e-10)
            assert values["relative_sigma_max"] == pytest.approx(sigma, rel=1e-10)
            assert values["intruder_count"] == count
            assert float(rows[layer["name"]][f"{label}:relative_update"]) == pytest.approx(relative, rel=1e-9)
            assert int(rows[layer["name"]][f"{label}:intruder_count"]) == count
            counts[label].append(count)
    # the two updates differ in size, so a swapped or shared value would fail the checks above
    assert document["layers"][0]["values"]["lora"]["relative_update"] != pytest.approx(
        document["layers"][0]["values"]["full"]["relative_update"], rel=1e-3
    )
    summary = document["summary"]["per_label"]
    for label in ("lora", "full"):
        expected = sum(float(deltas[label][n].norm() / weights[n].norm()) for n in weights) / len(weights)
        assert summary[label]["mean_relative_update"] == pytest.approx(expected, rel=1e-10)
        assert summary[label]["mean_intruder_count"] == pytest.approx(sum(counts[label]) / len(weights))
    # the terminal table: one ΔW/W₀ and intruder column per checkpoint, with the values shown
    assert "lora ΔW/W₀" in result.stdout and "full intr." in result.stdout
    first = document["layers"][0]
    row = next(line for line in result.stdout.splitlines() if line.startswith(first["name"]))
    assert format(first["values"]["full"]["relative_update"], ".3g") in row
    assert "against the base: lora ‖ΔW‖/‖W₀‖" in result.stdout


BASE_KEYS = ("relative_update", "relative_sigma_max", "intruder_count")


def test_compare_without_base_has_no_base_columns(pair, tmp_path):
    """Without --base every output is as it was before base metrics came to compare: no base CSV columns, no base
    JSON keys (values, summary means, ratios), no base table columns."""
    _, lora, _, _, _ = pair
    result = CliRunner().invoke(
        main,
        ["compare", str(lora), str(lora), "--labels", "a,b", "--json", str(tmp_path / "c.json"),
         "--csv", str(tmp_path / "c.csv"), "--markdown", str(tmp_path / "c.md")],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    document = json.loads((tmp_path / "c.json").read_text())
    header = (tmp_path / "c.csv").read_text().splitlines()[0].split(",")
    assert not [column for column in header if column.split(":")[-1] in BASE_KEYS]
    assert [column for column in header if column.startswith("a:")] == [
        f"a:{key}" for key in ("rank_bound", "params", "count_above", "energy", "erank", "stable_rank",
                               "utilization", "erank_per_kparam")
    ]  # fmt: skip
    assert all(set(v).isdisjoint(BASE_KEYS) for layer in document["layers"] for v in layer["values"].values())
    summary = document["summary"]
    assert all(not key.endswith(BASE_KEYS) for values in summary["per_label"].values() for key in values)
    assert "mean_relative_update" not in summary["ratios_to_first"]["b"]
    assert "mean_relative_update" not in json.dumps(summary["by_module"])
    markdown = (tmp_path / "c.md").read_text()
    for text in (result.output, markdown):
        assert "ΔW/W₀" not in text and "intr." not in text and "against the base" not in text


def test_markdown_and_report_show_the_base_columns(pair, tmp_path, monkeypatch):
    """compare --markdown (means by module type) and the HTML page of report A B --base (the matched-layers table)
    show the same base columns as the terminal, from report/tables.py."""
    monkeypatch.setenv("RANKSCOPE_CACHE", str(tmp_path / "cache"))
    base, lora, full, deltas, weights = pair
    result = CliRunner().invoke(
        main,
        ["compare", str(lora), str(full), "--base", str(base), "--labels", "lora,full",
         "--markdown", str(tmp_path / "c.md"), "--json", str(tmp_path / "c.json")],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    markdown = (tmp_path / "c.md").read_text()
    header = next(line for line in markdown.splitlines() if line.startswith("| module"))
    assert header.rstrip(" |").endswith("ΔW/W₀ | intr.")
    overall = {line.split(" | ")[1]: line for line in markdown.splitlines() if line.startswith("| **all**")}
    for label in ("lora", "full"):
        expected = sum(float(deltas[label][n].norm() / weights[n].norm()) for n in weights) / len(weights)
        assert f"| {format(expected, '.3g')} |" in overall[label], overall
    report = CliRunner().invoke(
        main,
        ["report", str(lora), str(full), "--base", str(base), "--labels", "lora,full", "-o", str(tmp_path / "rep"),
         "--figures", "none", "-q"],
    )  # fmt: skip
    assert report.exit_code == 0, report.output
    page = (tmp_path / "rep" / "index.html").read_text()
    for title in ("lora ΔW/W₀", "lora intr.", "full ΔW/W₀", "full intr."):
        assert f">{title}</th>" in page, title
    name = next(iter(weights))
    relative = float(deltas["full"][name].norm() / weights[name].norm())
    assert format(relative, ".3g") in page


def test_narrow_terminal_table_keeps_the_base_columns(pair, tmp_path, monkeypatch):
    import rankscope
    from rankscope.analysis.comparison import compare
    from rankscope.report.terminal import comparison_table

    monkeypatch.setenv("RANKSCOPE_CACHE", str(tmp_path / "cache"))
    base, lora, full, deltas, weights = pair
    analyses = [rankscope.analyze(rankscope.load(path, base=base)) for path in (lora, full)]
    comparison = compare(analyses, ["lora", "full"], alignment=False)
    text = comparison_table(comparison, width=100)
    assert "ΔW/W₀" in text and max(len(line) for line in text.splitlines()) <= 100
    name = comparison.layers[0].name
    lines = [line for line in text.splitlines() if "full" in line and not line.startswith("layer")]
    relative = float(deltas["full"][name].norm() / weights[name].norm())
    assert any(format(relative, ".3g") in line for line in lines), text
