"""MELoRA reader against a reference module written from the official forward (ChasonShi/MELoRA)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file
from torch import nn
from torch.nn import functional as F

import rankscope
from rankscope.cli import main
from rankscope.formats import melora
from rankscope.formats.common.source import locate

from .factories import assert_spectrum, records

PREFIX = "base_model.model."
Q_PROJ = "model.layers.0.self_attn.q_proj"
V_PROJ = "model.layers.0.self_attn.v_proj"


class MELoRAReference(nn.Module):
    """The official forward: cut x into n slices along the last dim, y_i = s_i·B_i(A_i(x_i)), concatenate.

    ``lora_A``/``lora_B`` are ModuleLists of bias-free Linears, so the state dict holds ``lora_A.<i>.weight``
    (r_i, in/n) and ``lora_B.<i>.weight`` (out/n, r_i), as the official code saves them; s_i = α_i/r_i.
    """

    def __init__(self, out_features: int, in_features: int, ranks: list[int], alphas: list[float], seed: int = 0):
        super().__init__()
        n = len(ranks)
        self.slice = in_features // n
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.lora_A = nn.ModuleList(nn.Linear(self.slice, r, bias=False) for r in ranks)
            self.lora_B = nn.ModuleList(nn.Linear(r, out_features // n, bias=False) for r in ranks)
            for b in self.lora_B:  # the official init zeroes B; a trained adapter's is not
                nn.init.normal_(b.weight)
        self.scaling = [alpha / r for alpha, r in zip(alphas, ranks, strict=True)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = []
        for i, (a, b) in enumerate(zip(self.lora_A, self.lora_B, strict=True)):
            x_i = x[..., i * self.slice : (i + 1) * self.slice]
            outputs.append(F.linear(F.linear(x_i, a.weight.double()), b.weight.double()) * self.scaling[i])
        return torch.cat(outputs, dim=-1)

    def delta_weight(self) -> torch.Tensor:
        with torch.no_grad():
            n_in = self.slice * len(self.lora_A)
            return self.forward(torch.eye(n_in, dtype=torch.float64)).T

    def tensors(self, module: str) -> dict[str, torch.Tensor]:
        return {f"{PREFIX}{module}.{key}": value.detach().clone() for key, value in self.state_dict().items()}


def melora_config(r, alpha) -> dict:
    return {"peft_type": "MELORA", "r": r, "lora_alpha": alpha, "mode": "melora", "target_modules": ["q_proj"]}


def write(directory: Path, tensors: dict, config: dict | None, *, safetensors: bool = False) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    if safetensors:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / "adapter_model.safetensors"))
    else:
        torch.save(tensors, str(directory / "adapter_model.bin"))
    if config is not None:
        (directory / "adapter_config.json").write_text(json.dumps(config))
    return directory


@pytest.mark.parametrize("safetensors", [False, True], ids=["bin", "safetensors"])
def test_eight_rank_one_minis_reach_rank_eight(tmp_path, safetensors):
    """`run 'melora' 1 8`: 8 minis of rank 1, equivalent rank 8, with 8× fewer parameters than LoRA r=8."""
    reference = MELoRAReference(32, 32, [1] * 8, [16] * 8)
    path = write(
        tmp_path / "melora", reference.tensors(Q_PROJ), melora_config([1] * 8, [16] * 8), safetensors=safetensors
    )
    checkpoint = rankscope.load(path)
    assert (checkpoint.family, checkpoint.adapter_type) == ("melora", "MELORA")
    assert checkpoint.skipped == []
    [record] = rankscope.analyze(checkpoint)
    delta = reference.delta_weight()
    assert record.name == Q_PROJ and record.family == "melora" and record.valid and record.exact
    assert record.shape == [32, 32] and record.matrix_shape == [32, 32]
    assert record.rank_bound == 8 and record.params == 8 * (4 + 4) and record.scale == 16.0
    sigma = torch.tensor(record.singular_values)
    assert int((sigma > 1e-8 * sigma[0]).sum()) == int(torch.linalg.matrix_rank(delta)) == 8
    assert_spectrum(record, delta)


def test_mixed_ranks_and_alphas(tmp_path):
    """r = [1, 2, 3, 2], α = [4, 2, 9, 8]: scales 4, 1, 3, 4 differ, so no single scale (JSON null)."""
    ranks, alphas = [1, 2, 3, 2], [4, 2, 9, 8]
    reference = MELoRAReference(20, 12, ranks, alphas, seed=1)
    [record] = records(write(tmp_path / "melora", reference.tensors(Q_PROJ), melora_config(ranks, alphas))).values()
    assert record.rank_bound == 8 and record.scale is None
    assert record.shape == [20, 12] and record.params == sum(r * 3 + 5 * r for r in ranks)
    assert_spectrum(record, reference.delta_weight())


def test_sum_of_ranks_above_min_m_n(tmp_path):
    """Σ r_i = 12 > min(m, n) = 8 (each mini 2×4 with r_i = 3): the bound is 8 and the spectrum is full."""
    reference = MELoRAReference(8, 16, [3] * 4, [6] * 4, seed=2)
    [record] = records(write(tmp_path / "melora", reference.tensors(Q_PROJ), melora_config([3] * 4, [6] * 4))).values()
    assert record.rank_bound == 8 and record.scale == 2.0
    assert_spectrum(record, reference.delta_weight())


def test_scalar_r_and_alpha_take_the_mini_count_from_the_keys(tmp_path):
    reference, other = MELoRAReference(16, 16, [2] * 4, [8] * 4, seed=3), MELoRAReference(24, 16, [2] * 8, [8] * 8)
    tensors = {**reference.tensors(Q_PROJ), **other.tensors(V_PROJ)}
    got = records(write(tmp_path / "melora", tensors, melora_config(2, 8)))
    assert got[Q_PROJ].scale == got[V_PROJ].scale == 4.0 and got[V_PROJ].rank_bound == 16
    assert_spectrum(got[Q_PROJ], reference.delta_weight())
    assert_spectrum(got[V_PROJ], other.delta_weight())


def test_bf16_factors(tmp_path):
    reference = MELoRAReference(16, 8, [2] * 4, [4] * 4, seed=4).to(torch.bfloat16)
    [record] = records(write(tmp_path / "melora", reference.tensors(Q_PROJ), melora_config(2, 4))).values()
    assert_spectrum(record, reference.delta_weight())


def test_forced_format_without_config(tmp_path):
    """A bare .bin is not detected as MELoRA (its peft_type says so); --format melora and --alpha read it."""
    reference = MELoRAReference(8, 8, [1] * 4, [3] * 4)
    path = write(tmp_path / "melora", reference.tensors(Q_PROJ), None) / "adapter_model.bin"
    assert not melora.detect(locate(path))
    [record] = records(path, format="melora", alpha=3.0).values()
    assert record.scale == 3.0
    assert_spectrum(record, reference.delta_weight())
    assert "scale 1" in rankscope.load(path, format="melora").warnings[0]


def _good_and(bad: dict, drop: tuple[str, ...]) -> tuple[dict[str, torch.Tensor], MELoRAReference]:
    """Analyse a checkpoint with a good q_proj (4 minis of rank 2) and v_proj's tensors changed by ``bad``."""
    good = MELoRAReference(8, 8, [2] * 4, [4] * 4, seed=5)
    tensors = {**good.tensors(Q_PROJ), **MELoRAReference(8, 8, [2] * 4, [4] * 4, seed=6).tensors(V_PROJ)}
    for suffix in drop:
        del tensors[f"{PREFIX}{V_PROJ}.{suffix}"]
    tensors.update({f"{PREFIX}{V_PROJ}.{suffix}": value for suffix, value in bad.items()})
    return tensors, good


V = f"{PREFIX}{V_PROJ}"
BAD = {
    "missing-B": ({}, ("lora_B.3.weight",), f"{V}.lora_A.3.weight: has no matching lora_B.3.weight"),
    "B-without-A": ({}, ("lora_A.1.weight",), f"{V}.lora_B.1.weight: has no matching lora_A.1.weight"),
    "gap-in-indices": ({}, ("lora_A.2.weight", "lora_B.2.weight"), f"{V}.lora_A.3.weight: mini indices [0, 1, 3]"),
    "input-slices-differ": (
        {"lora_A.2.weight": torch.ones(2, 3)},
        (),
        f"{V}.lora_A.2.weight: mini 2 covers 3 input features but mini 0 covers 2",
    ),
    "output-slices-differ": (
        {"lora_B.1.weight": torch.ones(4, 2)},
        (),
        f"{V}.lora_B.1.weight: mini 1 covers 4 outputs but mini 0 covers 2",
    ),
    "rank-mismatch": ({"lora_B.0.weight": torch.ones(2, 3)}, (), f"{V}.lora_B.0.weight: rank mismatch"),
    "config-rank-mismatch": (
        {"lora_A.1.weight": torch.ones(3, 2), "lora_B.1.weight": torch.ones(2, 3)},
        (),
        f"{V}.lora_A.1.weight: the config gives r=2 for mini 1 but the tensor has 3 rows",
    ),
    "nan": ({"lora_A.0.weight": torch.full((2, 2), float("nan"))}, (), f"{V}.lora_A.0.weight: 4 NaN and 0 Inf"),
    "not-a-matrix": ({"lora_A.0.weight": torch.ones(2, 2, 1)}, (), f"{V}.lora_A.0.weight: expected a matrix"),
}


@pytest.mark.parametrize("case", list(BAD), ids=str)
def test_bad_layer_is_invalid_and_the_rest_analysed(tmp_path, case):
    bad, drop, message = BAD[case]
    tensors, good = _good_and(bad, drop=drop)
    got = records(write(tmp_path / "melora", tensors, melora_config([2] * 4, [4] * 4)))
    assert got[Q_PROJ].valid
    assert_spectrum(got[Q_PROJ], good.delta_weight())
    assert not got[V_PROJ].valid and got[V_PROJ].metrics is None
    assert got[V_PROJ].error.startswith(message), got[V_PROJ].error


def test_config_list_length_against_keys(tmp_path):
    """The config lists 4 minis; a module stored with 8 is invalid, one with 4 is analysed."""
    four, eight = MELoRAReference(8, 8, [1] * 4, [2] * 4), MELoRAReference(8, 8, [1] * 8, [2] * 8)
    tensors = {**four.tensors(Q_PROJ), **eight.tensors(V_PROJ)}
    got = records(write(tmp_path / "melora", tensors, melora_config([1] * 4, [2] * 4)))
    assert_spectrum(got[Q_PROJ], four.delta_weight())
    assert got[V_PROJ].error == f"{V}.lora_A.0.weight: the config lists 4 minis (r) but this module stores 8"


@pytest.mark.parametrize(
    ("r", "alpha", "message"),
    [
        ([1, 1], [2, 2, 2], "r lists 2 minis but lora_alpha lists 3"),
        ([], [], "r is an empty list"),
        ([1, 0], [2, 2], "r must be a positive integer, found 0"),
        ([1.5, 1], [2, 2], r"r must be a positive integer, found 1.5"),
    ],
)
def test_bad_config(tmp_path, r, alpha, message):
    tensors = MELoRAReference(8, 8, [1] * 2, [2] * 2).tensors(Q_PROJ)
    path = write(tmp_path / "melora", tensors, melora_config(r, alpha))
    with pytest.raises(rankscope.CheckpointError, match=rf"adapter_config.json: {message}"):
        rankscope.load(path)


def test_cli_json(tmp_path):
    ranks, alphas = [1, 2, 1, 2], [2, 2, 3, 8]
    reference = MELoRAReference(16, 16, ranks, alphas, seed=7)
    path = write(tmp_path / "melora", reference.tensors(Q_PROJ), melora_config(ranks, alphas))
    result = CliRunner().invoke(main, ["spectrum", str(path), "--json", "-", "-q"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["checkpoint"]["family"] == "melora" and doc["checkpoint"]["adapter_type"] == "MELORA"
    [layer] = doc["layers"]
    assert layer["family"] == "melora" and layer["rank_bound"] == 6 and layer["scale"] is None and layer["exact"]
    expected = torch.linalg.svdvals(reference.delta_weight())[:6]
    assert layer["singular_values"] == pytest.approx(expected.tolist(), rel=1e-6)


def test_cli_exit_1_when_no_layer_can_be_analysed(tmp_path):
    tensors = MELoRAReference(8, 8, [1] * 4, [2] * 4).tensors(Q_PROJ)
    del tensors[f"{PREFIX}{Q_PROJ}.lora_B.2.weight"]
    result = CliRunner().invoke(main, ["spectrum", str(write(tmp_path / "m", tensors, melora_config(1, 2))), "-q"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "lora_A.2.weight: has no matching lora_B.2.weight" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
