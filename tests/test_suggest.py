"""``suggest``: rank rules against ranks worked out here from known spectra, the PEFT fields pasted into a real
``LoraConfig``, and the command's outputs and errors."""

from __future__ import annotations

import csv
import io
import json
import math

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import rankscope
from rankscope.cli import main
from rankscope.resize import parse_rule, suggest
from tests.factories import lora_config, quiet_library_warnings, write_lora  # noqa: F401

SIGMA = [4.0, 2.0, 1.0, 0.5, 0.25, 0.01]  # the spectrum of ΔW = s·B·A, built exactly below
SCALE = 2.0  # α/r = 12/6


def factors_with(sigma: list[float], m: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with s·B·A = U·diag(σ)·Vᵀ for random orthonormal U, V (s = SCALE): the spectrum is σ exactly."""
    generator = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(m, len(sigma), generator=generator, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(n, len(sigma), generator=generator, dtype=torch.float64))[0]
    b = u * torch.tensor(sigma, dtype=torch.float64) / SCALE
    return v.T.contiguous(), b


@pytest.fixture
def adapter(tmp_path):
    """q_proj (16×16) and v_proj (24×16) in two layers; layer 1's v_proj is a zero update."""
    factors = {}
    for i in range(2):
        factors[f"model.layers.{i}.self_attn.q_proj"] = factors_with(SIGMA, 16, 16, seed=i)
        a, b = factors_with([s / (i + 1) for s in SIGMA], 24, 16, seed=10 + i)
        factors[f"model.layers.{i}.self_attn.v_proj"] = (a, b * 0 if i == 1 else b)
    return write_lora(tmp_path / "adapter", factors, lora_config(r=6, lora_alpha=12))


def run(*args) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(map(str, args)))
    return result.exit_code, result.stdout, result.stderr


def reference_rank(rule: str, sigma: list[float]) -> int:
    """The rules as the issue defines them, written out over a list."""
    kind, _, raw = rule.partition(":")
    value = float(raw) if raw else None
    total2, total1 = sum(s * s for s in sigma), sum(sigma)
    cumulative = lambda terms, goal: next(k for k in range(1, len(terms) + 1) if sum(terms[:k]) >= goal * (1 - 1e-12))  # noqa: E731
    if kind == "energy":
        return cumulative([s * s for s in sigma], value * total2)
    if kind == "sv_fro":
        fro = [math.sqrt(sum(s * s for s in sigma[:k]) / total2) for k in range(1, len(sigma) + 1)]
        return next(k for k, f in enumerate(fro, 1) if f >= value - 1e-12)
    if kind == "sv_cumulative":
        return cumulative(sigma, value * total1)
    if kind == "count":
        return sum(s > value for s in sigma)
    if kind == "rel":
        return sum(s > value * sigma[0] for s in sigma)
    if kind == "sv_ratio":
        return sum(s > sigma[0] / value for s in sigma)
    if kind == "erank":
        p = [s / total1 for s in sigma]
        return math.ceil(math.exp(-sum(x * math.log(x) for x in p)) - 1e-9)
    if kind == "fixed":
        return int(value)
    raise AssertionError(rule)


RULES = ["energy:0.9", "energy:0.99", "sv_fro:0.95", "sv_cumulative:0.8", "count:0.3", "rel:0.2", "sv_ratio:10"]
RULES += ["erank", "fixed:3"]


@pytest.mark.parametrize("rule", RULES)
def test_each_rule_against_its_definition(adapter, rule):
    analysis = rankscope.analyze(rankscope.load(adapter))
    suggestion = suggest(analysis, rule)
    by_name = {layer.name: layer for layer in suggestion.layers}
    for i in range(2):
        assert by_name[f"model.layers.{i}.self_attn.q_proj"].rank == reference_rank(rule, SIGMA)
    assert by_name["model.layers.0.self_attn.v_proj"].rank == reference_rank(rule, SIGMA)
    assert by_name["model.layers.1.self_attn.v_proj"].rank == 0  # zero update


def test_errors_and_retained_energy_against_a_dense_svd(adapter):
    checkpoint = rankscope.load(adapter)
    suggestion = suggest(rankscope.analyze(checkpoint), "energy:0.95")
    for layer, source in zip(suggestion.layers, checkpoint.layers, strict=True):
        sigma = torch.linalg.svdvals(source.update.materialize())
        k = layer.rank
        kept = float((sigma[:k] ** 2).sum() / (sigma**2).sum()) if sigma[0] > 0 else 1.0
        assert layer.retained_energy == pytest.approx(kept)
        assert layer.spectral_error == pytest.approx(float(sigma[k]), abs=1e-12)
        assert layer.frobenius_error == pytest.approx(float(torch.sqrt((sigma[k:] ** 2).sum())), abs=1e-12)
        assert layer.params_after == k * sum(source.update.shape)


def test_params_budget_is_greedy_by_energy_per_parameter(adapter):
    budget = 150
    suggestion = suggest(rankscope.analyze(rankscope.load(adapter)), f"params:{budget}")
    # by hand: each direction costs m+n (32 for q_proj, 40 for v_proj); take the largest σ²/(m+n) while it fits
    items = sorted(
        [(s * s / 32, "q0") for s in SIGMA] + [(s * s / 32, "q1") for s in SIGMA] + [(s * s / 40, "v0") for s in SIGMA],
        reverse=True,
    )
    left, want = budget, {"q0": 0, "q1": 0, "v0": 0}
    for _, key in items:
        cost = 40 if key == "v0" else 32
        if cost <= left:
            want[key], left = want[key] + 1, left - cost
    got = {layer.name: layer.rank for layer in suggestion.layers}
    # the two q_proj layers have the same σ (ties broken by rounding): which of them takes a tied direction is
    # arbitrary, how many the two take together and what is left for v_proj is not
    q0, q1 = got["model.layers.0.self_attn.q_proj"], got["model.layers.1.self_attn.q_proj"]
    assert q0 + q1 == want["q0"] + want["q1"]
    assert sorted((q0, q1)) == sorted((want["q0"], want["q1"]))
    assert got["model.layers.0.self_attn.v_proj"] == want["v0"]
    assert suggestion.params_after <= budget


def test_clamping_and_zero_layers_are_said(adapter):
    code, _, err = run("suggest", adapter, "--rule", "fixed:10", "--max-rank", "4", "--min-rank", "1")
    assert code == 0, err
    assert "clamped to --max-rank 4" in err
    assert "zero update, so rank 0" in err and "exclude_modules" in err
    code, _, err = run("suggest", adapter, "--rule", "fixed:10")
    assert "clamped to the layer's rank bound 6" in err


def test_json_document(adapter, tmp_path):
    target = tmp_path / "s.json"
    code, _, err = run("suggest", adapter, "--rule", "energy:0.9", "--json", target, "-q")
    assert code == 0, err
    doc = json.loads(target.read_text())
    assert doc["schema"] == "rankscope.suggest/1"
    assert {"r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "exclude_modules", "layers"} <= set(doc)
    assert doc["exclude_modules"] == ["model.layers.1.self_attn.v_proj"]
    k = reference_rank("energy:0.9", SIGMA)
    assert doc["r"] == k and doc["lora_alpha"] == SCALE * k  # α_k = s·k keeps the scale 2
    fields = {"name", "rank", "current_rank", "retained_energy", "spectral_error", "frobenius_error"}
    assert fields <= set(doc["layers"][0])
    assert doc["totals"]["params_before"] == 2 * 6 * 32 + 2 * 6 * 40
    assert not any(key.startswith("base_model") for key in doc["rank_pattern"])


def test_csv_and_table(adapter, tmp_path):
    code, out, err = run("suggest", adapter, "--rule", "erank", "--csv", "-")
    assert code == 0, err
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [row["name"] for row in rows][:1] == ["model.layers.0.self_attn.q_proj"]
    assert len(rows) == 4 and rows[0]["rank"] == str(reference_rank("erank", SIGMA))
    code, out, _ = run("suggest", adapter, "--rule", "erank")
    assert "LoraConfig: r=" in out and "energy kept" in out


@pytest.mark.parametrize(
    "rule",
    [
        "energy:0",
        "energy:1.5",
        "fixed:-1",
        "fixed:2.5",
        "count:-1",
        "rel:1",
        "sv_ratio:0.5",
        "bogus",
        "energy",
        "erank:3",
        "params:0",
        "energy:abc",
        "",
    ],
)
def test_bad_rules_exit_2_with_the_accepted_forms(adapter, rule):
    code, _, err = run("suggest", adapter, "--rule", rule)
    assert code == 2
    assert "accepted forms are energy:P, fixed:K" in err and "params:N" in err and "--rule" in err


def test_rule_values_parse():
    assert parse_rule("params:2k").value == 2000 and parse_rule("ERANK").kind == "erank"
    assert parse_rule("energy:1").value == 1.0 and str(parse_rule("fixed:4")) == "fixed:4"


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList()
        for _ in range(2):
            block = nn.Module()
            block.self_attn = nn.Module()
            block.self_attn.q_proj = nn.Linear(16, 16)
            block.self_attn.v_proj = nn.Linear(16, 24)
            self.model.layers.append(block)


@pytest.mark.parametrize("rslora", [False, True])
def test_fields_pasted_into_lora_config_give_each_layer_its_rank_and_scale(tmp_path, rslora):
    from peft import LoraConfig, get_peft_model

    factors = {}
    for i in range(2):
        factors[f"model.layers.{i}.self_attn.q_proj"] = factors_with(SIGMA, 16, 16, seed=i)
        factors[f"model.layers.{i}.self_attn.v_proj"] = factors_with(
            SIGMA[: 2 + 2 * i] + [0.0] * (4 - 2 * i), 24, 16, seed=5 + i
        )
    zero_a, zero_b = factors_with(SIGMA, 24, 16, seed=9)
    factors["model.layers.1.self_attn.v_proj"] = (zero_a, zero_b * 0)
    source = write_lora(tmp_path / "a", factors, lora_config(r=6, lora_alpha=12, use_rslora=rslora))
    checkpoint = rankscope.load(source)
    suggestion = suggest(rankscope.analyze(checkpoint), "energy:0.9")
    config = LoraConfig(target_modules=["q_proj", "v_proj"], **suggestion.lora_config())
    model = get_peft_model(Net(), config)
    layers = {
        name.removeprefix("base_model.model."): module
        for name, module in model.named_modules()
        if hasattr(module, "lora_A") and "default" in module.lora_A
    }
    wanted = {layer.name: layer.rank for layer in suggestion.layers if layer.rank}
    assert {name: layer.lora_A["default"].weight.shape[0] for name, layer in layers.items()} == wanted
    assert "model.layers.1.self_attn.v_proj" not in layers  # rank 0 → exclude_modules
    source_scale = 12 / math.sqrt(6) if rslora else 2.0
    for name, layer in layers.items():
        assert layer.scaling["default"] == pytest.approx(source_scale), name


def test_resize_figure_frontier_bounds_every_rule(adapter):
    from matplotlib.figure import Figure

    from rankscope.figures.resize import resize_figure

    checkpoint = rankscope.load(adapter)
    analysis = rankscope.analyze(checkpoint)
    axis = Figure().subplots()
    resize_figure(analysis, ["energy:0.9", "fixed:2"], ax=axis)
    vertical = [line for line in axis.lines if len(set(line.get_xdata())) == 1 and len(line.get_xdata()) == 2]
    curve, *points = [line for line in axis.lines if line not in vertical]
    ys = list(curve.get_ydata())
    # the frontier by hand: every layer's σ² from a dense SVD, largest first
    sigmas = [torch.linalg.svdvals(layer.update.materialize()) for layer in checkpoint.layers]
    squares = sorted((float(s) ** 2 for sigma in sigmas for s in sigma if s > 1e-12), reverse=True)
    assert ys[3] == pytest.approx(sum(squares[:3]) / sum(squares)) and ys[-1] == pytest.approx(1.0)
    assert [p.get_xdata()[0] for p in points] == [3 * reference_rank("energy:0.9", SIGMA), 3 * 2]
    for point in points:
        x, y = point.get_xdata()[0], point.get_ydata()[0]
        assert y <= ys[int(x)] + 1e-12  # no rule beats the best allocation of its total rank
