"""BoRA reader against a reference module written from the paper's forward pass (arXiv 2508.06953)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file
from torch import nn

import rankscope
from rankscope.cli import main
from rankscope.formats import bora
from rankscope.formats.common.source import locate

from .factories import assert_spectrum, llama_like, records

PREFIX = "base_model.model."
Q_PROJ = "model.layers.0.self_attn.q_proj"
V_PROJ = "model.layers.0.self_attn.v_proj"


class BoRAReference(nn.Module):
    """The paper's forward: split x (…, n) into b segments x_k; Y_j = s·Σ_k B_j Σ_jk A_k x_k; output [Y_1 … Y_b].

    Σ_jk = diag(exp(σ_jk / mean|σ|)) with one mean over the whole σ (b, b, r); ``norm=False`` drops the
    division, ``exp=False`` the exponential. Computed in float64 from the stored (possibly bf16) values.
    """

    def __init__(self, m: int, n: int, r: int, b: int, *, seed: int = 0, dtype=torch.float32, **variant) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.lora_A = nn.Parameter(torch.randn(r, n, generator=g).to(dtype))
        self.lora_B = nn.Parameter(torch.randn(m, r, generator=g).to(dtype))
        self.lora_sigma = nn.Parameter(torch.randn(b, b, r, generator=g).to(dtype))
        self.blocks = b
        self.exp, self.norm = variant.get("exp", True), variant.get("norm", True)

    def sigma(self) -> torch.Tensor:
        sigma = self.lora_sigma.detach().double()
        if self.norm:
            sigma = sigma / sigma.abs().mean()
        return sigma.exp() if self.exp else sigma

    def forward(self, x: torch.Tensor, scale: float) -> torch.Tensor:
        b = self.blocks
        segments = x.double().chunk(b, dim=-1)
        a_blocks = self.lora_A.detach().double().chunk(b, dim=1)
        b_blocks = self.lora_B.detach().double().chunk(b, dim=0)
        sigma = self.sigma()
        outputs = [
            sum(((segments[k] @ a_blocks[k].T) * sigma[j, k]) @ b_blocks[j].T for k in range(b)) for j in range(b)
        ]
        return scale * torch.cat(outputs, dim=-1)

    def delta_weight(self, scale: float) -> torch.Tensor:
        n = self.lora_A.shape[1]
        return self.forward(torch.eye(n, dtype=torch.float64), scale).T

    def tensors(self, module: str, sigma_suffix: str = "") -> dict[str, torch.Tensor]:
        return {
            f"{PREFIX}{module}.lora_A.weight": self.lora_A.detach().contiguous(),
            f"{PREFIX}{module}.lora_B.weight": self.lora_B.detach().contiguous(),
            f"{PREFIX}{module}.lora_sigma{sigma_suffix}": self.lora_sigma.detach().contiguous(),
        }


def bora_config(**overrides) -> dict:
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "use_rslora": False, "rank_pattern": {}}
    config.update({"alpha_pattern": {}, "fan_in_fan_out": False, "target_modules": ["q_proj", "v_proj"]})
    config.update(overrides)
    return config


def write(directory: Path, tensors: dict[str, torch.Tensor], config: dict | None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    if config is not None:
        (directory / "adapter_config.json").write_text(json.dumps(config))
    return directory


@dataclass(frozen=True)
class Case:
    id: str
    m: int = 24
    n: int = 16
    r: int = 2
    b: int = 4
    config: tuple = ()  # config overrides as (key, value) pairs
    variant: tuple = ()  # reference switches: (("exp", False),)
    dtype: torch.dtype = torch.float32
    sigma_suffix: str = ""

    def scale(self, config: dict) -> float:
        alpha = config["lora_alpha"]
        return alpha / math.sqrt(self.r) if config.get("use_rslora") else alpha / self.r


CASES = [
    Case("peft-type-lora"),
    Case("peft-type-bora-weight-suffix", config=(("peft_type", "BORA"),), sigma_suffix=".weight"),
    Case("no-exp", config=(("bora_exp", False),), variant=(("exp", False),)),
    Case("no-norm", config=(("bora_norm", False),), variant=(("norm", False),)),
    Case("neither", config=(("bora_exp", False), ("bora_norm", False)), variant=(("exp", False), ("norm", False))),
    Case("explicit-true-and-null", config=(("bora_exp", True), ("bora_norm", None))),
    Case("rslora", r=4, config=(("r", 4), ("lora_alpha", 8), ("use_rslora", True))),
    Case("bf16", dtype=torch.bfloat16),
    Case("b-r-above-min-m-n", m=8, n=12, r=4, b=4, config=(("r", 4),)),
    Case("one-block-is-lora-like", m=10, n=6, r=3, b=1, config=(("r", 3),)),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_matches_reference_forward(tmp_path, case):
    config = bora_config(**dict(case.config))
    reference = BoRAReference(case.m, case.n, case.r, case.b, dtype=case.dtype, **dict(case.variant))
    path = write(tmp_path / "bora", reference.tensors(Q_PROJ, case.sigma_suffix), config)
    checkpoint = rankscope.load(path)
    assert (checkpoint.family, checkpoint.adapter_type) == ("bora", "BORA")
    assert checkpoint.skipped == []
    [record] = rankscope.analyze(checkpoint)
    scale = case.scale(config)
    assert record.name == Q_PROJ and record.family == "bora" and record.valid and record.exact
    assert record.shape == [case.m, case.n] and record.matrix_shape == [case.m, case.n]
    assert record.rank_bound == min(case.m, case.n, case.b * case.r)
    assert record.params == case.r * case.n + case.m * case.r + case.b * case.b * case.r
    assert record.scale == pytest.approx(scale, rel=1e-12)
    assert_spectrum(record, reference.delta_weight(scale))


def test_random_factors_reach_rank_b_times_r(tmp_path):
    """m = n = 32, r = 2, b = 4: the block structure lifts the rank from r = 2 to b·r = 8."""
    reference = BoRAReference(32, 32, 2, 4, seed=3)
    [record] = records(write(tmp_path / "bora", reference.tensors(Q_PROJ), bora_config())).values()
    delta = reference.delta_weight(2.0)
    sigma = torch.tensor(record.singular_values, dtype=torch.float64)
    assert record.rank_bound == 8
    assert int((sigma > 1e-8 * sigma[0]).sum()) == int(torch.linalg.matrix_rank(delta)) == 8
    assert_spectrum(record, delta)


def test_patterns_and_fan_in_fan_out(tmp_path):
    """alpha_pattern / rank_pattern pick α and r per layer as in LoRA; fan_in_fan_out reports (in, out)."""
    q, v = BoRAReference(16, 8, 2, 2, seed=1), BoRAReference(16, 8, 4, 2, seed=2)
    config = bora_config(alpha_pattern={"v_proj": 12}, rank_pattern={"v_proj": 4}, fan_in_fan_out=True)
    got = records(write(tmp_path / "bora", {**q.tensors(Q_PROJ), **v.tensors(V_PROJ)}, config))
    assert got[Q_PROJ].scale == 2.0 and got[V_PROJ].scale == 3.0
    assert got[V_PROJ].shape == [8, 16] and got[V_PROJ].matrix_shape == [16, 8]
    assert_spectrum(got[Q_PROJ], q.delta_weight(2.0))
    assert_spectrum(got[V_PROJ], v.delta_weight(3.0))


def test_bare_file_without_config(tmp_path):
    """No adapter_config.json: detected by its lora_sigma keys; --alpha gives α (r from the tensors)."""
    reference = BoRAReference(12, 12, 3, 3)
    path = write(tmp_path / "bora", reference.tensors(Q_PROJ), None) / "adapter_model.safetensors"
    [record] = records(path, alpha=6.0).values()
    assert record.scale == 2.0
    assert_spectrum(record, reference.delta_weight(2.0))
    checkpoint = rankscope.load(path)
    assert checkpoint.family == "bora" and "scale 1" in checkpoint.warnings[0]


def test_detection(tmp_path):
    reference = BoRAReference(8, 8, 2, 2)
    assert bora.detect(locate(write(tmp_path / "bora", reference.tensors(Q_PROJ), bora_config())))
    factors_only = {k: v for k, v in reference.tensors(Q_PROJ).items() if "sigma" not in k}
    assert bora.detect(locate(write(tmp_path / "typed", factors_only, bora_config(peft_type="BORA"))))
    assert not bora.detect(locate(write(tmp_path / "plain", factors_only, bora_config())))
    assert not bora.detect(locate(llama_like(tmp_path / "lora", layers=1, hidden=8)))
    other = write(tmp_path / "other", reference.tensors(Q_PROJ), bora_config(peft_type="MELORA"))
    assert not bora.detect(locate(other))


def _bad_sigma(shape: tuple[int, ...], fill: float | None = None) -> torch.Tensor:
    sigma = torch.randn(*shape, generator=torch.Generator().manual_seed(len(shape)))
    return sigma.fill_(fill) if fill is not None else sigma


SIGMA = f"{PREFIX}{V_PROJ}.lora_sigma"
A_KEY, B_KEY = f"{PREFIX}{V_PROJ}.lora_A.weight", f"{PREFIX}{V_PROJ}.lora_B.weight"
BAD = {
    "sigma-2d": ({SIGMA: _bad_sigma((4, 4))}, (8, 8), f"{SIGMA}: expected shape (b, b, r) with r=2", "[4, 4]"),
    "sigma-r-mismatch": ({SIGMA: _bad_sigma((4, 4, 3))}, (8, 8), f"{SIGMA}: expected shape (b, b, r) with r=2", "3]"),
    "sigma-not-square": ({SIGMA: _bad_sigma((4, 2, 2))}, (8, 8), f"{SIGMA}: expected shape (b, b, r)", "[4, 2, 2]"),
    "b-not-dividing-m": ({SIGMA: _bad_sigma((4, 4, 2))}, (30, 8), f"{SIGMA}: b=4 blocks do not divide m=30", B_KEY),
    "b-not-dividing-n": ({SIGMA: _bad_sigma((4, 4, 2))}, (8, 6), f"{SIGMA}: b=4 blocks do not divide n=6", A_KEY),
    "nan-sigma": ({SIGMA: _bad_sigma((4, 4, 2), float("nan"))}, (8, 8), f"{SIGMA}: 32 NaN and 0 Inf values", ""),
    "zero-sigma": ({SIGMA: _bad_sigma((4, 4, 2), 0.0)}, (8, 8), f"{SIGMA}: Σ = exp(σ/mean|σ|) is not finite", "= 0)"),
    "sigma-without-factors": ({SIGMA: _bad_sigma((4, 4, 2))}, None, f"{SIGMA}: has no matching lora_A.weight and", ""),
    "factors-without-sigma": ({}, (8, 8), f"{A_KEY}: has no matching lora_sigma", ""),
    "both-spellings": (
        {SIGMA: _bad_sigma((2, 2, 2)), SIGMA + ".weight": _bad_sigma((2, 2, 2))},
        (8, 8),
        SIGMA,
        "stored twice, also as",
    ),
}


@pytest.mark.parametrize("case", list(BAD), ids=str)
def test_bad_layer_is_invalid_and_the_rest_analysed(tmp_path, case):
    extra, shape, message, detail = BAD[case]
    good = BoRAReference(8, 8, 2, 2)
    tensors = {**good.tensors(Q_PROJ), **extra}
    if shape is not None:
        m, n = shape
        g = torch.Generator().manual_seed(7)
        tensors.update({A_KEY: torch.randn(2, n, generator=g), B_KEY: torch.randn(m, 2, generator=g)})
    got = records(write(tmp_path / "bora", tensors, bora_config()))
    assert got[Q_PROJ].valid
    assert_spectrum(got[Q_PROJ], good.delta_weight(2.0))
    bad = got[V_PROJ]
    assert not bad.valid and bad.metrics is None
    assert bad.error.startswith(message) and detail in bad.error and "\n" not in bad.error


def test_config_errors(tmp_path):
    reference = BoRAReference(8, 8, 2, 2)
    path = write(tmp_path / "a", reference.tensors(Q_PROJ), bora_config(bora_exp="yes"))
    with pytest.raises(rankscope.CheckpointError, match=r"adapter_config.json: bora_exp must be true or false"):
        rankscope.load(path)
    path = write(tmp_path / "b", reference.tensors(Q_PROJ), bora_config(use_dora=True))
    with pytest.raises(rankscope.UnsupportedAdapterError, match="use_dora is set"):
        rankscope.load(path)
    path = write(tmp_path / "c", reference.tensors(Q_PROJ), bora_config(r="two"))
    with pytest.raises(rankscope.CheckpointError, match=f"r of layer {Q_PROJ} must be a positive integer"):
        rankscope.load(path)
    [record] = records(write(tmp_path / "d", reference.tensors(Q_PROJ), bora_config(r=3))).values()
    assert (
        record.error == f"{PREFIX}{Q_PROJ}.lora_A.weight: the config gives r=3 for this layer but the tensor has 2 rows"
    )


def test_cli_json(tmp_path):
    reference = BoRAReference(32, 32, 2, 4, seed=5)
    path = write(tmp_path / "bora", reference.tensors(Q_PROJ, ".weight"), bora_config(peft_type="BORA"))
    result = CliRunner().invoke(main, ["spectrum", str(path), "--json", "-", "-q"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["checkpoint"]["family"] == "bora" and doc["checkpoint"]["adapter_type"] == "BORA"
    [layer] = doc["layers"]
    assert layer["family"] == "bora" and layer["rank_bound"] == 8 and layer["scale"] == 2.0 and layer["exact"]
    expected = torch.linalg.svdvals(reference.delta_weight(2.0))[:8]
    assert layer["singular_values"] == pytest.approx(expected.tolist(), rel=1e-6)


def test_cli_exit_1_when_no_layer_can_be_analysed(tmp_path):
    tensors = {SIGMA: torch.randn(4, 4, 2), A_KEY: torch.randn(2, 6), B_KEY: torch.randn(8, 2)}
    path = write(tmp_path / "bora", tensors, bora_config())
    result = CliRunner().invoke(main, ["spectrum", str(path), "-q"])
    assert result.exit_code == 1
    assert "b=4 blocks do not divide n=6" in result.stderr and "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1
