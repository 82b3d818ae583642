"""The adapters trained by examples/train_adapters.py: every bundled family reads, and the script stays runnable.

The script itself checks each adapter against its own trained forward pass when it saves it; here the bundled
files are checked again from their stored tensors with formulas written in this file (BoRA's blocks, BoostLoRA's
softmax weights, HydraLoRA's heads), so a change in rankscope that breaks a bundled family fails a test.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import rankscope

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINTS = ROOT / "examples" / "checkpoints"
SUMMARY = json.loads((CHECKPOINTS / "adapters.json").read_text())
ADAPTERS = SUMMARY["adapters"]
PREFIX = "base_model.model."

EXPECTED = {  # name → (the adapter type rankscope detects, rank bound of every layer)
    "lora-r8": ("LORA", 8),
    "lora-r32": ("LORA", 32),
    "lora-r8-alpha16e": ("LORA", 8),
    "dora-r8": ("DORA", 64),  # dense: the magnitude rescales whole rows, so ΔW can have full rank
    "bora-r8-b8": ("BORA", 64),
    "bora-r8-b4": ("BORA", 32),
    "melora-8x1": ("MELORA", 8),
    "hydralora-r8-h3": ("HYDRALORA", 8),
    "boostlora-sum-k2": ("BOOSTLORA", 8),
    "boostlora-sum-k3": ("BOOSTLORA", 12),
    "boostlora-seq-k3": ("COMPOSITION", 12),
}
SCALES = {name: 2.0 for name in EXPECTED} | {"lora-r8-alpha16e": 2.0 * math.e}  # α/r; BoostLoRA: 8/4


def analysed(name: str, **options) -> rankscope.Analysis:
    base = CHECKPOINTS / "tiny-base" if name.startswith("dora") else None
    return rankscope.analyze(rankscope.load(CHECKPOINTS / ADAPTERS[name]["path"], base=base), **options)


def stored(name: str) -> dict[str, torch.Tensor]:
    directory = CHECKPOINTS / ADAPTERS[name]["path"]
    if (directory / "adapter_model.safetensors").is_file():
        return load_file(directory / "adapter_model.safetensors")
    return torch.load(directory / "adapter_model.bin", weights_only=True)


def assert_spectrum(values: list[float], delta: torch.Tensor) -> None:
    """rankscope's σ equal svdvals(ΔW) (float64) on its rank bound, and ΔW has nothing beyond it."""
    expected = torch.linalg.svdvals(delta.double())
    got = torch.tensor(values, dtype=torch.float64)
    assert torch.allclose(got, expected[: len(got)], rtol=1e-6, atol=1e-9 * expected[0].item())
    tail = expected[len(got) :]
    assert len(tail) == 0 or tail.max().item() <= 1e-9 * expected[0].item()


def test_the_bundle_lists_every_family_trained_and_checked():
    assert set(ADAPTERS) == set(EXPECTED) and SUMMARY["quick"] is False
    for name, record in ADAPTERS.items():
        assert record["passed"], (name, record["checks"])
        assert record["val_loss_code"] < SUMMARY["val_loss_code_base"], name  # the fine-tune did something
        assert (CHECKPOINTS / record["path"]).is_dir(), name


def test_the_bundle_stays_small():
    size = sum(f.stat().st_size for f in (CHECKPOINTS / "adapters").rglob("*") if f.is_file())
    assert size < 3_000_000


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_bundled_family_loads_with_finite_metrics(name):
    analysis = analysed(name)
    adapter_type, bound = EXPECTED[name]
    assert analysis.checkpoint.adapter_type == adapter_type
    assert len(analysis) == 12 and not analysis.invalid
    for record in analysis:
        assert record.rank_bound == bound and record.scale == pytest.approx(SCALES[name])
        numbers = [v for v in record.metrics.values() if isinstance(v, float | int)]
        numbers += [v for v in record.metrics.values() if isinstance(v, dict) for v in v.values()]
        assert numbers and all(math.isfinite(v) for v in numbers)
        assert all(math.isfinite(s) for s in record.singular_values)
    # the parameters rankscope counts are the ones the script trained (HydraLoRA's router, BoostLoRA's logits…)
    assert sum(r.params for r in analysis) + analysis.checkpoint.shared_params == ADAPTERS[name]["trainable_params"]


@pytest.mark.parametrize("name", ["bora-r8-b8", "bora-r8-b4"])
def test_bora_matches_the_block_formula_and_reports_its_count_above_tau(name):
    tensors = stored(name)
    config = json.loads((CHECKPOINTS / ADAPTERS[name]["path"] / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    for record in analysed(name, thresholds=(0.005, 0.05)):
        key = PREFIX + record.name
        a, b, sigma = (tensors[f"{key}.{s}"].double() for s in ("lora_A.weight", "lora_B.weight", "lora_sigma"))
        blocks = sigma.shape[0]
        diagonals = torch.exp(sigma / sigma.abs().mean())
        rows = [  # ΔW_jk = s·B_j Σ_jk A_k, written block by block as the paper does
            torch.cat([scale * b_j @ torch.diag(diagonals[j, k]) @ a_k for k, a_k in enumerate(a.chunk(blocks, 1))], 1)
            for j, b_j in enumerate(b.chunk(blocks, 0))
        ]
        delta = torch.cat(rows, 0)
        assert_spectrum(record.singular_values, delta)
        count = record.metric("count_above", 0.005)
        assert count == int((torch.linalg.svdvals(delta) > 0.005).sum())
        assert config["r"] < count <= blocks * config["r"]  # trained BoRA exceeds LoRA's bound r in every layer
        assert record.metric("count_above", 0.05) <= count


@pytest.mark.parametrize("name", ["boostlora-sum-k2", "boostlora-sum-k3"])
def test_weighted_sums_report_their_learned_weights_and_energy(name):
    tensors = stored(name)
    k = int(name[-1])
    for record in analysed(name):
        key = PREFIX + record.name
        weights = torch.softmax(tensors[f"{key}.boost_weights"].double(), dim=0)
        composition = record.composition
        assert composition["weights"]["normalize"] == "softmax"
        assert composition["weights"]["normalized"] == pytest.approx(weights.tolist(), abs=1e-12)
        assert sum(composition["energy_shares"]["values"]) == pytest.approx(1.0)
        for concentration in (composition["weights"]["concentration"], composition["energy_shares"]["concentration"]):
            assert 1.0 <= concentration["effective_number"] <= k + 1e-9
            assert 0.0 <= concentration["normalized_entropy"] <= 1.0 + 1e-9
        delta = sum(
            w * 2.0 * tensors[f"{key}.lora_B.{i}.weight"].double() @ tensors[f"{key}.lora_A.{i}.weight"].double()
            for i, w in enumerate(weights)
        )
        assert_spectrum(record.singular_values, delta)
        assert len(record.components) == k and math.isfinite(composition["rank_gain"])


def test_sequential_rounds_have_a_growth_curve():
    directory = CHECKPOINTS / ADAPTERS["boostlora-seq-k3"]["path"]
    rounds = [load_file(directory / f"round{t}" / "adapter_model.safetensors") for t in (1, 2, 3)]
    for record in analysed("boostlora-seq-k3"):
        composition = record.composition
        assert (
            composition["weights"]["normalized"] == [1.0, 1.0, 1.0] and composition["weights"]["mode"] == "sequential"
        )
        growth = composition["growth"]
        assert [g["components"] for g in growth] == [1, 2, 3] and [g["rank_bound"] for g in growth] == [4, 8, 12]
        key = PREFIX + record.name
        partial = torch.zeros(record.shape, dtype=torch.float64)
        for point, tensors in zip(growth, rounds, strict=True):
            partial = (
                partial + 2.0 * tensors[f"{key}.lora_B.weight"].double() @ tensors[f"{key}.lora_A.weight"].double()
            )
            assert point["metrics"]["frobenius"] == pytest.approx(torch.linalg.matrix_norm(partial).item(), rel=1e-9)
        assert_spectrum(record.singular_values, partial)


def test_hydra_heads_are_components_and_the_layer_is_the_uniform_mean():
    tensors = stored("hydralora-r8-h3")
    for record in analysed("hydralora-r8-h3"):
        key = PREFIX + record.name
        a = tensors[f"{key}.lora_A.weight"].double()
        heads = [2.0 * tensors[f"{key}.lora_B{i}.weight"].double() @ a for i in range(3)]
        assert len(record.components) == 3
        for component, head in zip(record.components, heads, strict=True):
            assert_spectrum(component.singular_values, head)
        assert_spectrum(record.singular_values, sum(heads) / 3)


def test_training_script_quick_run(tmp_path):
    proc = subprocess.run(
        # one thread: bitwise the same result, and no waiting on a second thread when other jobs share the cores
        [
            sys.executable,
            str(ROOT / "examples" / "train_adapters.py"),
            "--quick",
            "--threads",
            "1",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    summary = json.loads((tmp_path / "adapters.json").read_text())
    assert summary["quick"] is True and set(summary["adapters"]) == set(EXPECTED)
    assert all(record["passed"] for record in summary["adapters"].values())
    for name, record in summary["adapters"].items():
        base = CHECKPOINTS / "tiny-base" if name.startswith("dora") else None
        analysis = rankscope.analyze(rankscope.load(tmp_path / record["path"], base=base))
        assert len(analysis) == 12 and not analysis.invalid, name
