"""rankscope compare: matching by name, side-by-side values, ratios, and alignment against dense references."""

from __future__ import annotations

import csv
import io
import json

import pytest
import torch
from click.testing import CliRunner

import rankscope
from rankscope.analysis.comparison import compare
from rankscope.cli import main

from .factories import lora_config, random_factors, write_lora

HIDDEN = 24


def dense(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    return scale * b.double() @ a.double()


@pytest.fixture()
def pair(tmp_path):
    """Two adapters of one base: 'small' (r=2) and 'big' (r=8, sharing small's directions in q_proj), plus an
    extra layer only 'big' adapts."""
    small, big = {}, {}
    for i in range(3):
        for module in ("q_proj", "v_proj"):
            name = f"model.layers.{i}.self_attn.{module}"
            a, b = random_factors(HIDDEN, HIDDEN, 8, seed=10 * i + len(module))
            small[name] = (
                (a[:2].clone(), b[:, :2].clone()) if module == "q_proj" else random_factors(HIDDEN, HIDDEN, 2, 99 + i)
            )
            big[name] = (a, b)
    big["model.layers.0.mlp.up_proj"] = random_factors(2 * HIDDEN, HIDDEN, 8, 7)
    return (
        write_lora(tmp_path / "small", small, lora_config(r=2, lora_alpha=4)),
        write_lora(tmp_path / "big", big, lora_config(r=8, lora_alpha=16)),
        small,
        big,
    )


def test_values_ratios_and_unmatched(pair):
    small_dir, big_dir, small, big = pair
    analyses = [rankscope.analyze(rankscope.load(p)) for p in (small_dir, big_dir)]
    comparison = compare(analyses, ["small", "big"])
    assert [layer.name for layer in comparison.layers] == sorted(small, key=lambda n: (int(n.split(".")[2]), n))
    assert comparison.unmatched == {"big": ["model.layers.0.mlp.up_proj"]}
    first = comparison.layers[0]
    values = [comparison.values(r) for r in first.records]
    assert values[0]["rank_bound"] == 2 and values[1]["rank_bound"] == 8
    assert values[0]["params"] == 2 * 2 * HIDDEN and values[1]["params"] == 8 * 2 * HIDDEN
    a, b = big[first.name]
    energy = float(dense(a, b, 2.0).pow(2).sum())
    assert values[1]["energy"] == pytest.approx(energy, rel=1e-10)
    summary = comparison.summary()
    ratio = summary["ratios_to_first"]["big"]
    assert ratio["params"] == pytest.approx(4.0)
    means = summary["per_label"]
    assert ratio["mean_count_above"] == pytest.approx(
        means["big"]["mean_count_above"] / means["small"]["mean_count_above"]
    )
    assert summary["headlines"][0].startswith("big reaches ")


def test_alignment_across_checkpoints_matches_dense(pair):
    small_dir, big_dir, small, big = pair
    comparison = compare([rankscope.analyze(rankscope.load(p)) for p in (small_dir, big_dir)], ["small", "big"])
    by_name = {layer.name: layer for layer in comparison.layers}
    for name in ("model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"):
        first = dense(*small[name], 2.0)
        second = dense(*big[name], 2.0)
        cosine = float((first * second).sum() / (first.norm() * second.norm()))
        alignment = by_name[name].alignment
        assert alignment["cosine"][0][1] == pytest.approx(cosine, abs=1e-10)
        u1 = torch.linalg.svd(first)[0][:, :2]
        u2 = torch.linalg.svd(second)[0][:, :2]  # k = min of the two ranks = 2
        overlap = float((u1.T @ u2).pow(2).sum() / 2)
        assert alignment["left_overlap"][0][1] == pytest.approx(overlap, abs=1e-8)
        assert alignment["left_baseline"][0][1] == pytest.approx(2 / HIDDEN)


def _principal_overlap(first: torch.Tensor, second: torch.Tensor, k: int, side: int) -> float:
    u1, u2 = (torch.linalg.svd(x if side == 0 else x.T)[0][:, :k] for x in (first, second))
    return float((u1.T @ u2).pow(2).sum() / k)


def test_alignment_in_batches_of_many_shapes_matches_dense(tmp_path, monkeypatch):
    """Layers of three shapes aligned a few at a time (the factor stacks' memory reused from batch to batch):
    every layer's cosine and both sides' overlaps against dense float64 SVDs."""
    from rankscope.analysis import comparison as comparison_module
    from rankscope.measures import alignment_batched

    monkeypatch.setattr(comparison_module, "_ALIGNED_AT_ONCE", 4)
    monkeypatch.setattr(alignment_batched, "_STACK_NUMBERS", 2 * 2 * HIDDEN * 11)  # two layers a batch
    shapes = {"self_attn.q_proj": (HIDDEN, HIDDEN), "mlp.up_proj": (2 * HIDDEN, HIDDEN),
              "mlp.down_proj": (HIDDEN, 2 * HIDDEN)}  # fmt: skip
    one, two = {}, {}
    for i in range(3):
        for j, (module, (m, n)) in enumerate(shapes.items()):
            name = f"model.layers.{i}.{module}"
            one[name] = random_factors(m, n, 3, seed=100 * i + j)
            a, b = random_factors(m, n, 8, seed=100 * i + j + 50)
            two[name] = (torch.cat([one[name][0][:2], a[2:]]), torch.cat([one[name][1][:, :2], b[:, 2:]], dim=1))
    paths = [write_lora(tmp_path / "one", one, lora_config(r=3, lora_alpha=3)),
             write_lora(tmp_path / "two", two, lora_config(r=8, lora_alpha=16))]  # fmt: skip
    comparison = compare([rankscope.analyze(rankscope.load(p)) for p in paths])
    assert len(comparison.layers) == 9
    for layer in comparison.layers:
        first, second = dense(*one[layer.name], 1.0), dense(*two[layer.name], 2.0)
        cosine = float((first * second).sum() / (first.norm() * second.norm()))
        assert layer.alignment["cosine"][0][1] == pytest.approx(cosine, abs=1e-10), layer.name
        for side, key in ((0, "left_overlap"), (1, "right_overlap")):
            expected = _principal_overlap(first, second, 3, side)
            assert layer.alignment[key][0][1] == pytest.approx(expected, abs=1e-8), (layer.name, key)


def test_cli_outputs(pair, tmp_path):
    small_dir, big_dir, _, _ = pair
    out = tmp_path / "out"
    out.mkdir()
    result = CliRunner().invoke(
        main,
        ["compare", str(small_dir), str(big_dir), "--labels", "lora,bora", "--json", str(out / "c.json"),
         "--csv", str(out / "c.csv"), "--markdown", str(out / "c.md")],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "bora reaches" in result.stdout and "only in bora: 1 layers" in result.stdout
    doc = json.loads((out / "c.json").read_text())
    assert doc["schema"] == "rankscope.compare/1" and doc["labels"] == ["lora", "bora"]
    assert len(doc["layers"]) == 6 and doc["unmatched"] == {"bora": ["model.layers.0.mlp.up_proj"]}
    assert set(doc["layers"][0]["values"]) == {"lora", "bora"}
    rows = list(csv.DictReader(io.StringIO((out / "c.csv").read_text())))
    assert len(rows) == 6 and rows[0]["lora:rank_bound"] == "2" and rows[0]["bora:rank_bound"] == "8"
    markdown = (out / "c.md").read_text()
    assert "| module | checkpoint |" in markdown and "**all**" in markdown


def test_no_shared_layer_and_bad_labels(pair, tmp_path):
    small_dir, _, _, _ = pair
    other = write_lora(tmp_path / "other", {"encoder.fc": random_factors(8, 8, 2, 1)}, lora_config(r=2))
    runner = CliRunner()
    result = runner.invoke(main, ["compare", str(small_dir), str(other)])
    assert result.exit_code == 1 and "no layer name is shared" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert runner.invoke(main, ["compare", str(small_dir)]).exit_code == 2
    assert runner.invoke(main, ["compare", str(small_dir), str(other), "--labels", "a"]).exit_code == 2


def test_same_checkpoint_twice_is_perfectly_aligned(pair):
    small_dir, _, _, _ = pair
    analysis = rankscope.analyze(rankscope.load(small_dir))
    comparison = compare([analysis, analysis], ["x", "y"])
    summary = comparison.summary()
    assert summary["alignment"]["mean_cosine"] == pytest.approx(1.0)
    assert summary["alignment"]["mean_left_overlap"] == pytest.approx(1.0)
    assert summary["ratios_to_first"]["y"]["mean_erank"] == pytest.approx(1.0)


def test_layers_of_different_shapes_are_warned_about_and_not_aligned(tmp_path):
    """Two adapters of different base models that happen to share layer names."""
    small = write_lora(tmp_path / "small", {"model.layers.0.q": random_factors(8, 8, 2, 1)}, lora_config(r=2))
    large = write_lora(tmp_path / "large", {"model.layers.0.q": random_factors(16, 8, 2, 2)}, lora_config(r=2))
    comparison = compare([rankscope.analyze(rankscope.load(p)) for p in (small, large)])
    assert comparison.layers[0].alignment is None
    assert len(comparison.warnings) == 1 and "differ in shape" in comparison.warnings[0]
    assert "8×8 in small, 16×8 in large" in comparison.warnings[0]
    result = CliRunner().invoke(main, ["compare", str(small), str(large), "--json", "-", "-q"])
    assert result.exit_code == 0, result.output
    assert "differ in shape" in result.stderr
    assert json.loads(result.stdout)["warnings"] == comparison.warnings


def test_no_alignment_keeps_the_metrics_and_skips_the_alignment(pair):
    first, second, _, _ = pair
    result = CliRunner().invoke(main, ["compare", str(first), str(second), "--no-alignment", "--json", "-", "-q"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["layers"] and all(layer["alignment"] is None for layer in document["layers"])
    assert all(layer["values"] for layer in document["layers"])


def test_baseline_picks_what_the_ratios_are_to(pair):
    small_dir, big_dir, _, _ = pair
    result = CliRunner().invoke(
        main, ["compare", str(small_dir), str(big_dir), "--baseline", "big", "--json", "-", "-q"]
    )
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["labels"] == ["big", "small"]
    ratios = document["summary"]["ratios_to_first"]
    assert list(ratios) == ["small"] and ratios["small"]["params"] < 1  # small has fewer parameters than big
    wrong = CliRunner().invoke(main, ["compare", str(small_dir), str(big_dir), "--baseline", "nope"])
    assert wrong.exit_code == 2 and "baseline 'nope' is none of the labels small, big" in wrong.stderr


def test_counts_use_a_threshold_every_analysis_computed(pair):
    small_dir, big_dir, _, _ = pair
    a = rankscope.analyze(rankscope.load(small_dir), thresholds=(0.01, 0.005))
    b = rankscope.analyze(rankscope.load(big_dir), thresholds=0.005)
    comparison = compare([a, b], ["small", "big"])
    assert comparison.threshold == 0.005  # the baseline's first τ is not b's: the shared one counts
    layer = comparison.layers[0]
    sigma = torch.tensor(layer.records[1].singular_values)
    assert comparison.values(layer.records[1])["count_above"] == int((sigma > 0.005).sum())
    c = rankscope.analyze(rankscope.load(big_dir), thresholds=0.02)
    with pytest.raises(rankscope.UsageProblem, match=r"share no thresholds value \(small: 0.01, 0.005; big: 0.02\)"):
        compare([a, c], ["small", "big"])


def test_a_layer_invalid_in_one_checkpoint_is_left_out_of_every_labels_means(pair, tmp_path):
    """Two copies of one adapter, one with a NaN in a layer: every ratio 1 (the same layers on both sides), the
    means those of the valid layers computed here, the layer counted as not compared and said in the headline."""
    _, big_dir, _, big = pair
    broken = dict(big)
    name = "model.layers.1.self_attn.v_proj"
    a, b = broken[name]
    b = b.clone()
    b[0, 0] = float("nan")
    broken[name] = (a, b)
    broken_dir = write_lora(tmp_path / "broken", broken, lora_config(r=8, lora_alpha=16))
    analyses = [rankscope.analyze(rankscope.load(p)) for p in (big_dir, broken_dir)]
    summary = compare(analyses, ["big", "broken"]).summary()
    assert summary["not_compared"] == 1
    assert all(value == pytest.approx(1.0) for value in summary["ratios_to_first"]["broken"].values())
    valid = [n for n in big if n != name]
    energies = [float(dense(*big[n], 2.0).pow(2).sum()) for n in valid]
    for label in ("big", "broken"):
        assert summary["per_label"][label]["layers"] == len(valid)
        assert summary["per_label"][label]["mean_energy"] == pytest.approx(sum(energies) / len(energies), rel=1e-10)
    assert "over the 6 layers valid in every checkpoint; 1 invalid in one left out" in summary["headlines"][0]
