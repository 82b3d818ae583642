"""HydraLoRA against a reference module written from the published forward pass."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import rankscope
from rankscope.cli import main

PREFIX = "base_model.model.model.layers.0.mlp.up_proj"


class HydraReference(nn.Module):
    """y = s·Σ_i softmax(W_route x)_i · B_i(A x), as in HydraLoRA's lora.Linear."""

    def __init__(self, in_features: int, out_features: int, r: int, heads: int, alpha: float) -> None:
        super().__init__()
        self.lora_A = nn.Linear(in_features, r, bias=False)
        for i in range(heads):
            setattr(self, f"lora_B{i}", nn.Linear(r, out_features, bias=False))
            nn.init.normal_(getattr(self, f"lora_B{i}").weight)
        self.lora_route = nn.Linear(in_features, heads, bias=False)
        self.heads, self.scaling = heads, alpha / r

    def head(self, i: int, x: torch.Tensor) -> torch.Tensor:
        return getattr(self, f"lora_B{i}")(self.lora_A(x)) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        route = torch.softmax(self.lora_route(x), dim=-1)
        return sum(route[..., i : i + 1] * self.head(i, x) for i in range(self.heads))


def save(module: HydraReference, directory: Path, *, config: dict, drop: str | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    state = {f"{PREFIX}.{k}": v.detach().clone() for k, v in module.state_dict().items() if k != drop}
    torch.save(state, directory / "adapter_model.bin")
    (directory / "adapter_config.json").write_text(json.dumps(config))
    return directory


@pytest.fixture()
def hydra(tmp_path):
    torch.manual_seed(0)
    module = HydraReference(20, 16, r=3, heads=4, alpha=12).double()
    nn.init.zeros_(module.lora_route.weight)  # a uniform router: the forward is then the mean update exactly
    config = {"peft_type": "LORA", "r": 3, "lora_alpha": 12, "lora_nums": 4, "target_modules": ["up_proj"]}
    return module, save(module, tmp_path / "hydra", config=config)


def test_mean_update_and_heads_match_the_reference(hydra, monkeypatch):
    """… the heads aligned in the coordinates of their joined factor's R (no pass over them of its own)."""
    from rankscope.measures import alignment_batched

    monkeypatch.setattr(alignment_batched, "aligned_batch", lambda *_: pytest.fail("the heads were read again"))
    module, directory = hydra
    ckpt = rankscope.load(directory)
    assert ckpt.family == "hydralora" and [s.key for s in ckpt.skipped] == [f"{PREFIX}.lora_route.weight"]
    (record,) = rankscope.analyze(ckpt)
    eye = torch.eye(20, dtype=torch.float64)
    with torch.no_grad():
        mean_update = module(eye).T
        heads = [module.head(i, eye).T for i in range(4)]
    assert record.name == "model.layers.0.mlp.up_proj" and record.rank_bound == 3
    assert record.singular_values == pytest.approx(torch.linalg.svdvals(mean_update)[:3].tolist(), rel=1e-10)
    assert record.params == 3 * 20 + 4 * 16 * 3 + 4 * 20
    assert [c.name for c in record.components] == ["head0", "head1", "head2", "head3"]
    for component, head in zip(record.components, heads, strict=True):
        assert component.singular_values == pytest.approx(torch.linalg.svdvals(head)[:3].tolist(), rel=1e-10)
    cosines = record.alignment["cosine"]
    for i in range(4):
        for j in range(4):
            expected = float((heads[i] * heads[j]).sum() / (heads[i].norm() * heads[j].norm()))
            assert cosines[i][j] == pytest.approx(expected, abs=1e-10)
    # the heads share A, so their right (input) subspaces coincide exactly: overlap 1
    assert record.alignment["right_overlap"][0][3] == pytest.approx(1.0)
    u0 = torch.linalg.svd(heads[0])[0][:, :3]
    u2 = torch.linalg.svd(heads[2])[0][:, :3]
    assert record.alignment["left_overlap"][0][2] == pytest.approx(float((u0.T @ u2).pow(2).sum() / 3), rel=1e-8)
    assert record.alignment["left_baseline"][0][2] == pytest.approx(3 / 16)


def test_the_shared_a_is_read_once_for_the_mean_and_every_head(hydra, monkeypatch):
    """The mean head holds Aᵀ and each head A: one pass over A for all of them (the same memory), and one over
    the heads side by side, [B_1 … B_4], whose Gram gives each head's, the mean's (JᵀGJ) and the alignment's
    cross-Grams; σ as the reference module's."""
    from rankscope.core import triangular
    from rankscope.core.factor_cache import FACTOR_CACHE

    module, directory = hydra
    FACTOR_CACHE.clear()
    passes = []
    original = triangular._gram
    monkeypatch.setattr(
        triangular, "_gram", lambda factor, workspace: passes.append(factor.shape) or original(factor, workspace)
    )
    (record,) = rankscope.analyze(rankscope.load(directory))
    assert sorted(passes) == [(16, 12), (20, 3)]  # the 4 heads joined (16 × 12), A once (20 × 3)
    with torch.no_grad():
        mean_update = module(torch.eye(20, dtype=torch.float64)).T
    assert record.singular_values == pytest.approx(torch.linalg.svdvals(mean_update)[:3].tolist(), rel=1e-10)


def test_json_has_components_and_alignment(hydra):
    _, directory = hydra
    result = CliRunner().invoke(main, ["spectrum", str(directory), "--json", "-", "-q"])
    assert result.exit_code == 0, result.output
    layer = json.loads(result.stdout)["layers"][0]
    assert layer["family"] == "hydralora" and len(layer["components"]) == 4
    assert len(layer["alignment"]["left_overlap"]) == 4


def test_missing_head_is_reported(tmp_path):
    module = HydraReference(8, 8, r=2, heads=3, alpha=4)
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "lora_nums": 3}
    directory = save(module, tmp_path / "h", config=config, drop="lora_B1.weight")
    result = CliRunner().invoke(main, ["spectrum", str(directory)])
    assert result.exit_code == 1
    assert "missing lora_B1.weight" in result.stderr and "adapter_model.bin" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_many_layers_mean_heads_derived_together_match_the_reference(tmp_path, monkeypatch):
    """Five layers of two shapes: their mean heads' Grams are derived in one batched product per layout; one
    layer's heads nearly cancel (the derived Gram is refused there and Householder QR takes it). Every layer's σ
    against svdvals of the reference module's mean update."""
    from rankscope.core import factored

    calls = []
    derive = factored._sum_r_factors

    def counted(sides, summed, *rest):
        calls.append(len(summed))
        return derive(sides, summed, *rest)

    monkeypatch.setattr(factored, "_sum_r_factors", counted)
    torch.manual_seed(3)
    shapes = {0: (20, 16), 1: (20, 16), 2: (12, 24), 3: (20, 16), 4: (12, 24)}
    state, modules = {}, {}
    for layer, (n, m) in shapes.items():
        module = HydraReference(n, m, r=3, heads=4, alpha=12).double()
        nn.init.zeros_(module.lora_route.weight)
        if layer == 3:  # head 3 = −(heads 0 + 1 + 2) + 1e-9·noise: the mean is ~1e-9 of the heads
            with torch.no_grad():
                rest = module.lora_B0.weight + module.lora_B1.weight + module.lora_B2.weight
                module.lora_B3.weight.copy_(-rest + 1e-9 * torch.randn_like(rest))
        modules[layer] = module
        prefix = f"base_model.model.model.layers.{layer}.mlp.up_proj"
        state.update({f"{prefix}.{k}": v.detach().clone() for k, v in module.state_dict().items()})
    directory = tmp_path / "many"
    directory.mkdir()
    torch.save(state, directory / "adapter_model.bin")
    config = {"peft_type": "LORA", "r": 3, "lora_alpha": 12, "lora_nums": 4, "target_modules": ["up_proj"]}
    (directory / "adapter_config.json").write_text(json.dumps(config))
    records = {r.name: r for r in rankscope.analyze(rankscope.load(directory))}
    assert max(calls) == 5  # all five sums in one call
    for layer, module in modules.items():
        with torch.no_grad():
            mean_update = module(torch.eye(shapes[layer][0], dtype=torch.float64)).T
        expected = torch.linalg.svdvals(mean_update)[:3]
        found = records[f"model.layers.{layer}.mlp.up_proj"].singular_values
        # layer 3's sum itself rounds at ε·‖B_i‖ (~1e-16 against a mean of ~1e-9): neither side knows more
        absolute = 1e-15 if layer == 3 else 0.0
        assert found == pytest.approx(expected.tolist(), rel=1e-8, abs=absolute), layer
