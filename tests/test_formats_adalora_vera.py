"""AdaLoRA and VeRA readers against PEFT itself.

Every checkpoint here is written by PEFT's ``save_pretrained``; the ground truth of a layer is PEFT's own
``merge_and_unload()`` weight minus the base weight, merged in float64 (the float32 factors convert exactly),
and its singular values are taken here with ``torch.linalg.svdvals``. AdaLoRA checkpoints are pruned by PEFT's
own rank allocator (``update_and_allocate`` on a fake loss) and compared with the model PEFT reloads from the
file, which is what the file means.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("peft")

from peft import AdaLoraConfig, PeftModel, VeraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers.pytorch_utils import Conv1D

import rankscope
from rankscope.formats.vera import regenerate_projections

from .factories import run_spectrum as run_cli

REL_TOL = 1e-12  # exact factored paths against a float64 SVD (measured: ≤ 3e-15 on every layer here)
TAIL_TOL = 1e-9  # the reference spectrum beyond rank_bound, relative to σ₁


@pytest.fixture(autouse=True)
def _quiet_peft():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns about fan_in_fan_out flips, save_projection, …
        yield


# -- tiny base models --------------------------------------------------------------------------------------


class Net(nn.Module):
    """Linear layers (one narrower than init_r) and a Conv2d, with a forward pass for AdaLoRA's allocator."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(16, 24)
        self.down = nn.Linear(24, 16)
        self.narrow = nn.Linear(16, 3)
        self.conv = nn.Conv2d(4, 6, 3)

    def forward(self, x: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        hidden = self.down(torch.tanh(self.up(x)))
        return self.narrow(hidden).pow(2).sum() + self.conv(image).pow(2).sum()


class GPT2Like(nn.Module):
    """transformers' Conv1D layers: weight stored (in, out)."""

    def __init__(self) -> None:
        super().__init__()
        self.c_attn = Conv1D(18, 10)  # Conv1D(nf=out, nx=in)
        self.c_proj = Conv1D(10, 10)


class Wide(nn.Module):
    """Linear layers of different fan-in and fan-out, so VeRA slices its shared projections differently."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(16, 12)
        self.b = nn.Linear(12, 20)
        self.c = nn.Linear(8, 20)


class Mixed(nn.Module):
    """A Linear and a Conv1D: PEFT flips fan_in_fan_out per module and saves only the last value."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(10, 14)
        self.c1 = Conv1D(6, 10)  # weight (10, 6): in 10, out 6


# -- helpers -----------------------------------------------------------------------------------------------


def float64_base(model: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone().double() for key, value in model.state_dict().items()}


def save_base(base: dict[str, torch.Tensor], path: Path) -> Path:
    """The base model's weights (float32) as one safetensors file (for ``--base``)."""
    save_file({k: v.float().contiguous() for k, v in base.items()}, str(path))
    return path


def merged_deltas(peft_model, base: dict[str, torch.Tensor], names) -> dict[str, torch.Tensor]:
    """PEFT's merge in float64 minus the base weight, per layer, in the base weight's layout."""
    merged = copy.deepcopy(peft_model).double().merge_and_unload().state_dict()
    return {name: merged[f"{name}.weight"] - base[f"{name}.weight"] for name in names}


def as_matrix(delta: torch.Tensor, base_module: nn.Module) -> torch.Tensor:
    """ΔW as the (out, in·∏k) matrix rankscope analyses."""
    return delta.T if isinstance(base_module, Conv1D) else delta.reshape(delta.shape[0], -1)


def assert_spectrum(record, matrix: torch.Tensor, rank_bound: int) -> None:
    expected = torch.linalg.svdvals(matrix)
    assert record.valid, record.error
    got = torch.tensor(record.singular_values, dtype=torch.float64)
    assert record.rank_bound == rank_bound
    assert got.shape == (rank_bound,), f"{record.name}: {got.shape[0]} values, expected {rank_bound}"
    if rank_bound == 0:
        assert expected.max().item() <= 1e-12, f"{record.name}: PEFT's ΔW is not zero"
        return
    assert expected[rank_bound - 1] > 1e-3 * expected[0], "test setup: the reference must reach rank_bound"
    rel = ((got - expected[:rank_bound]).abs() / expected[:rank_bound]).max().item()
    assert rel <= REL_TOL, f"{record.name}: relative error {rel:.2e}\n got {got}\n ref {expected[:rank_bound]}"
    tail = expected[rank_bound:]
    assert tail.numel() == 0 or tail.max().item() <= TAIL_TOL * expected[0].item(), f"{record.name}: rank too high"


def by_name(checkpoint_or_analysis) -> dict:
    items = checkpoint_or_analysis.layers if hasattr(checkpoint_or_analysis, "layers") else checkpoint_or_analysis
    return {item.name: item for item in items}


def rewrite(path: Path, edit) -> None:
    """Load a saved adapter's tensors, let ``edit`` change the dict, write it back."""
    tensors = load_file(str(path / "adapter_model.safetensors"))
    edit(tensors)
    save_file(tensors, str(path / "adapter_model.safetensors"))


def edit_config(path: Path, **changes) -> None:
    config = json.loads((path / "adapter_config.json").read_text())
    config.update(changes)
    for key, value in list(config.items()):
        if value is _DELETE:
            del config[key]
    (path / "adapter_config.json").write_text(json.dumps(config))


_DELETE = object()


# -- AdaLoRA -----------------------------------------------------------------------------------------------

ADA_TARGETS = ["up", "down", "narrow", "conv"]


def adalora_model(seed: int = 0, **config):
    """A randomised AdaLoRA model (PEFT zeroes E at init, so ΔW would be 0) and its float64 base weights."""
    torch.manual_seed(seed)
    model = Net()
    state = copy.deepcopy(model.state_dict())
    base = float64_base(model)
    settings = {"init_r": 6, "target_r": 3, "tinit": 0, "tfinal": 1, "total_step": 5, "lora_alpha": 8}
    settings.update(config)
    peft_model = get_peft_model(model, AdaLoraConfig(target_modules=ADA_TARGETS, **settings))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if any(part in name for part in (".lora_A.", ".lora_E.", ".lora_B.")):
                param.copy_(torch.randn_like(param))
    return peft_model, base, state


def prune(peft_model, steps: int) -> dict:
    """Run PEFT's rank allocator on a fake loss for ``steps`` steps; returns its rank_pattern."""
    generator = torch.Generator().manual_seed(1)
    for step in range(1, steps + 1):
        loss = peft_model(torch.randn(5, 16, generator=generator), torch.randn(2, 4, 5, 5, generator=generator))
        loss.backward()
        peft_model.base_model.update_and_allocate(step)
        peft_model.zero_grad()
    return peft_model.peft_config["default"].rank_pattern


def reload(directory: Path, state: dict):
    """The model PEFT builds from the saved adapter (resized to the kept ranks)."""
    model = Net()
    model.load_state_dict(state)
    return PeftModel.from_pretrained(model, directory)


def adalora_layers(peft_model) -> dict:
    return {name: peft_model.base_model.model.get_submodule(name) for name in ADA_TARGETS}


@pytest.mark.parametrize("alpha", [8, 0])
def test_adalora_pruned_matches_peft(tmp_path, alpha):
    peft_model, base, state = adalora_model(lora_alpha=alpha)
    pattern = prune(peft_model, steps=4)  # step 4 = total_step − tfinal: the final allocation
    kept = {key.split(".lora_E")[0]: sum(mask) for key, mask in pattern.items()}
    assert sum(kept.values()) == 3 * len(ADA_TARGETS) and set(kept.values()) != {6}, "test setup: ranks were pruned"
    trained = merged_deltas(peft_model, base, ADA_TARGETS)
    peft_model.save_pretrained(tmp_path)
    stored = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert {k for k in stored} == {f"base_model.model.{n}.lora_{x}" for n in ADA_TARGETS for x in "AEB"}

    reloaded = reload(tmp_path, state)
    reference = merged_deltas(reloaded, base, ADA_TARGETS)
    checkpoint = rankscope.load(tmp_path)
    assert (checkpoint.family, checkpoint.adapter_type) == ("adalora", "ADALORA")
    assert checkpoint.skipped == []
    records = by_name(rankscope.analyze(checkpoint))
    assert set(records) == set(ADA_TARGETS)
    for name, layer in adalora_layers(reloaded).items():
        record, base_layer = records[name], layer.get_base_layer()
        k = layer.lora_A["default"].shape[0]
        assert k == kept[name] == stored[f"base_model.model.{name}.lora_A"].shape[0]
        matrix = as_matrix(reference[name], base_layer)
        assert_spectrum(record, matrix, min(k, *matrix.shape))
        if alpha > 0:  # the trained model (masked E, full init_r) merges to the same ΔW
            assert torch.allclose(trained[name], reference[name], rtol=0, atol=1e-12)
        peft_scale = layer.scaling["default"] / (layer.ranknum["default"].item() + 1e-5)
        assert record.scale == pytest.approx(peft_scale, rel=1e-12)
        assert record.params == sum(getattr(layer, f"lora_{x}")["default"].numel() for x in "AEB")
        assert record.matrix_shape == list(matrix.shape)
        assert record.exact is True and record.family == "adalora"
    if alpha <= 0:
        assert any("lora_alpha=0" in w for w in checkpoint.warnings)


def test_adalora_unpruned_linear_and_conv_with_base(tmp_path):
    peft_model, base, _ = adalora_model(seed=3)
    peft_model.save_pretrained(tmp_path)
    reference = merged_deltas(peft_model, base, ADA_TARGETS)
    base_file = save_base(base, tmp_path / "base.safetensors")
    without = by_name(rankscope.analyze(rankscope.load(tmp_path)))
    with_base = by_name(rankscope.analyze(rankscope.load(tmp_path, base=base_file)))
    for name, layer in adalora_layers(peft_model).items():
        base_layer = layer.get_base_layer()
        matrix = as_matrix(reference[name], base_layer)
        rank_bound = min(6, *matrix.shape)  # narrow (out 3) stays below init_r
        for records in (without, with_base):
            assert_spectrum(records[name], matrix, rank_bound)
            assert records[name].scale == pytest.approx(8 / (6 + 1e-5), rel=1e-12)
            assert records[name].params == 6 * (matrix.shape[0] + matrix.shape[1] + 1)
        # the base model tells a Conv2d from a Linear; the adapter file alone cannot (A is 2-D for both)
        assert with_base[name].shape == list(base_layer.weight.shape)
        assert with_base[name].kind == ("conv2d" if name == "conv" else "linear")
        assert without[name].shape == list(matrix.shape)


def test_adalora_conv1d_fan_in_fan_out(tmp_path):
    torch.manual_seed(0)
    model = GPT2Like()
    base = float64_base(model)
    config = AdaLoraConfig(init_r=4, target_r=2, total_step=5, lora_alpha=16, target_modules=["c_attn", "c_proj"])
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if ".lora_" in name:
                param.copy_(torch.randn_like(param))
    peft_model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    reference = merged_deltas(peft_model, base, ["c_attn", "c_proj"])
    records = by_name(rankscope.analyze(rankscope.load(tmp_path)))
    for name in ("c_attn", "c_proj"):
        base_layer = peft_model.base_model.model.get_submodule(name).get_base_layer()
        assert_spectrum(records[name], as_matrix(reference[name], base_layer), 4)
        assert records[name].shape == list(base_layer.weight.shape)  # (in, out)
        assert records[name].kind == "conv1d_gpt2"
        assert records[name].scale == pytest.approx(16 / (4 + 1e-5), rel=1e-12)


@pytest.fixture()
def adalora_dir(tmp_path) -> Path:
    peft_model, _, _ = adalora_model(seed=5)
    prune(peft_model, steps=4)
    peft_model.save_pretrained(tmp_path / "ada")
    return tmp_path / "ada"


def _bad_layer(directory: Path, name: str) -> str:
    records = by_name(rankscope.analyze(rankscope.load(directory)))
    assert sum(not r.valid for r in records.values()) == 1, "only the damaged layer is invalid"
    assert not records[name].valid and records[name].metrics is None
    return records[name].error


def test_adalora_inconsistent_k_and_nan(adalora_dir):
    key = "base_model.model.up.lora_{}"

    rewrite(adalora_dir, lambda t: t.update({key.format("E"): torch.ones(t[key.format("A")].shape[0] + 1, 1)}))
    error = _bad_layer(adalora_dir, "up")
    assert key.format("E") in error and "rows of" in error

    def widen_b(tensors):
        b = tensors[key.format("B")]
        tensors[key.format("B")] = torch.cat([b, torch.ones(b.shape[0], 1)], dim=1)
        tensors[key.format("E")] = torch.ones(tensors[key.format("A")].shape[0], 1)

    rewrite(adalora_dir, widen_b)
    error = _bad_layer(adalora_dir, "up")
    assert key.format("B") in error and "rank mismatch" in error

    def nan_in_e(tensors):
        tensors[key.format("B")] = tensors[key.format("B")][:, :-1].contiguous()
        tensors[key.format("E")][0, 0] = float("nan")

    rewrite(adalora_dir, nan_in_e)
    error = _bad_layer(adalora_dir, "up")
    assert error == f"{key.format('E')}: 1 NaN and 0 Inf values"


def test_adalora_rank_pattern_disagrees_with_tensors(adalora_dir):
    config = json.loads((adalora_dir / "adapter_config.json").read_text())
    config["rank_pattern"]["down.lora_E"] = [True] * 6
    (adalora_dir / "adapter_config.json").write_text(json.dumps(config))
    kept = load_file(str(adalora_dir / "adapter_model.safetensors"))["base_model.model.down.lora_A"].shape[0]
    assert kept < 6, "test setup: the allocator pruned 'down'"
    error = _bad_layer(adalora_dir, "down")
    assert (
        error
        == f"base_model.model.down.lora_A: rank_pattern keeps 6 of its 6 ranks but the stored factors have k={kept}"
    )


def test_adalora_missing_init_r_is_a_one_line_error(adalora_dir):
    edit_config(adalora_dir, init_r=_DELETE)
    with pytest.raises(rankscope.CheckpointError, match="init_r"):
        rankscope.load(adalora_dir)
    result = run_cli(adalora_dir)
    assert result.exit_code == 1
    assert "init_r" in result.stderr and "adapter_config.json" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_adalora_without_config_is_detected_and_unscaled(adalora_dir, tmp_path):
    bare = tmp_path / "bare.safetensors"
    bare.write_bytes((adalora_dir / "adapter_model.safetensors").read_bytes())
    checkpoint = rankscope.load(bare)
    assert checkpoint.family == "adalora"
    assert any("scale 1 is assumed" in w for w in checkpoint.warnings)
    tensors = load_file(str(bare))
    a, e, b = (tensors[f"base_model.model.down.lora_{x}"].double() for x in "AEB")
    record = by_name(rankscope.analyze(checkpoint))["down"]
    assert record.scale == 1.0
    expected = torch.linalg.svdvals(b @ (a * e))  # the bare B·diag(E)·A, computed here
    assert torch.allclose(
        torch.tensor(record.singular_values, dtype=torch.float64), expected[: a.shape[0]], rtol=1e-9, atol=1e-12
    )


def test_adalora_cli_json(adalora_dir):
    result = run_cli(adalora_dir, "--json", "-", "-q")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["checkpoint"]["family"] == "adalora" and doc["checkpoint"]["adapter_type"] == "ADALORA"
    assert {layer["name"] for layer in doc["layers"]} == set(ADA_TARGETS)
    assert all(layer["valid"] and layer["exact"] for layer in doc["layers"])


# -- VeRA --------------------------------------------------------------------------------------------------


def vera_model(build=Wide, seed: int = 0, **config):
    """A VeRA model with random λ_b and λ_d (PEFT starts λ_b at zero, so ΔW would be 0)."""
    torch.manual_seed(seed)
    model = build()
    base = float64_base(model)
    targets = [name for name, module in model.named_modules() if isinstance(module, (nn.Linear, Conv1D))]
    peft_model = get_peft_model(model, VeraConfig(r=4, target_modules=targets, **config))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "vera_lambda" in name:  # |λ| in [0.5, 1.5): no near-zero λ_d, so ΔW keeps rank r
                param.copy_((torch.rand_like(param) + 0.5) * torch.randn_like(param).sign())
    return peft_model, base, targets


def vera_layers(peft_model, names) -> dict:
    return {name: peft_model.base_model.model.get_submodule(name) for name in names}


def trainable(layer) -> int:
    return sum(p.numel() for n, p in layer.named_parameters() if p.requires_grad and "base_layer" not in n)


def test_vera_matches_peft_with_base(tmp_path):
    peft_model, base, names = vera_model()
    peft_model.save_pretrained(tmp_path / "vera")
    stored = load_file(str(tmp_path / "vera" / "adapter_model.safetensors"))
    assert stored["base_model.vera_A"].shape == (4, 16) and stored["base_model.vera_B"].shape == (20, 4)
    reference = merged_deltas(peft_model, base, names)
    base_file = save_base(base, tmp_path / "base.safetensors")
    checkpoint = rankscope.load(tmp_path / "vera", base=base_file)
    assert (checkpoint.family, checkpoint.adapter_type) == ("vera", "VERA")
    assert checkpoint.skipped == [] and checkpoint.shared_params == 0
    # A and B are frozen buffers in PEFT: the trainable parameters are the λs alone
    assert checkpoint.params == peft_model.get_nb_trainable_parameters()[0]
    assert any("frozen" in w and "[4, 16]" in w and "[20, 4]" in w for w in checkpoint.warnings)
    assert not any("--base" in w for w in checkpoint.warnings)
    records = by_name(rankscope.analyze(checkpoint))
    for name, layer in vera_layers(peft_model, names).items():
        base_layer = layer.get_base_layer()
        matrix = as_matrix(reference[name], base_layer)
        assert_spectrum(records[name], matrix, 4)
        assert records[name].shape == list(base_layer.weight.shape) == records[name].matrix_shape
        assert records[name].params == trainable(layer) == matrix.shape[0] + 4
        assert records[name].scale == 1.0 and records[name].family == "vera"


def test_vera_without_base_assumes_full_width(tmp_path):
    peft_model, base, names = vera_model()
    peft_model.save_pretrained(tmp_path)
    reference = merged_deltas(peft_model, base, names)
    checkpoint = rankscope.load(tmp_path)
    assert any("--base" in w and "16 columns" in w for w in checkpoint.warnings)
    records = by_name(rankscope.analyze(checkpoint))
    # 'a' has the widest fan-in (16): exact; 'b' and 'c' (12 and 8 inputs) are analysed at width 16
    assert_spectrum(records["a"], reference["a"], 4)
    assert records["b"].matrix_shape == [20, 16]


def test_vera_mixed_linear_and_conv1d(tmp_path):
    peft_model, base, names = vera_model(Mixed, seed=2)
    peft_model.save_pretrained(tmp_path / "vera")
    # the saved flag is the last module's: it is wrong for 'lin', and the base weights settle it
    assert json.loads((tmp_path / "vera" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    reference = merged_deltas(peft_model, base, names)
    base_file = save_base(base, tmp_path / "base.safetensors")
    records = by_name(rankscope.analyze(rankscope.load(tmp_path / "vera", base=base_file)))
    for name, layer in vera_layers(peft_model, names).items():
        base_layer = layer.get_base_layer()
        assert_spectrum(records[name], as_matrix(reference[name], base_layer), 4)
        assert records[name].shape == list(base_layer.weight.shape)
    assert records["lin"].kind == "linear" and records["c1"].kind == "conv1d_gpt2"
    assert records["c1"].matrix_shape == [6, 10]


def test_vera_redraws_unsaved_projections_like_peft(tmp_path):
    peft_model, base, names = vera_model(seed=4, save_projection=False, projection_prng_key=1234)
    peft_model.save_pretrained(tmp_path / "vera")
    assert not any("vera_A" in key for key in load_file(str(tmp_path / "vera" / "adapter_model.safetensors")))
    a, b = regenerate_projections(1234, 4, 16, 20)
    assert torch.equal(a, peft_model.base_model.vera_A["default"])
    assert torch.equal(b, peft_model.base_model.vera_B["default"])

    with pytest.raises(rankscope.CheckpointError, match=r"'base_model.vera_A'.*save_projection=false.*pass base=PATH"):
        rankscope.load(tmp_path / "vera")
    result = run_cli(tmp_path / "vera")
    assert result.exit_code == 1 and "base_model.vera_A" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr

    reference = merged_deltas(peft_model, base, names)
    base_file = save_base(base, tmp_path / "base.safetensors")
    checkpoint = rankscope.load(tmp_path / "vera", base=base_file)
    assert any("redrawn from projection_prng_key=1234" in w for w in checkpoint.warnings)
    records = by_name(rankscope.analyze(checkpoint))
    for name, layer in vera_layers(peft_model, names).items():
        assert_spectrum(records[name], as_matrix(reference[name], layer.get_base_layer()), 4)


@pytest.fixture()
def vera_dir(tmp_path) -> Path:
    peft_model, base, _ = vera_model(seed=6)
    peft_model.save_pretrained(tmp_path / "vera")
    save_base(base, tmp_path / "base.safetensors")
    return tmp_path / "vera"


def _bad_vera_layer(directory: Path, name: str, base: Path | None = None) -> str:
    records = by_name(rankscope.analyze(rankscope.load(directory, base=base)))
    assert sum(not r.valid for r in records.values()) == 1, "only the damaged layer is invalid"
    assert not records[name].valid
    return records[name].error


def test_vera_layer_wider_than_the_shared_projections(vera_dir):
    key = "base_model.model.b.vera_lambda_b"
    rewrite(vera_dir, lambda t: t.update({key: torch.ones(21)}))  # vera_B has 20 rows
    error = _bad_vera_layer(vera_dir, "b")
    assert error == f"{key}: the layer has 21 outputs but the shared vera_B has only 20 rows"


def test_vera_base_layer_wider_than_vera_a(vera_dir, tmp_path):
    wide = load_file(str(vera_dir.parent / "base.safetensors"))
    wide["c.weight"] = torch.ones(20, 17)  # 17 inputs; vera_A has 16 columns
    save_file(wide, str(tmp_path / "wide.safetensors"))
    error = _bad_vera_layer(vera_dir, "c", base=tmp_path / "wide.safetensors")
    assert "base_model.model.c.vera_lambda_b" in error and "17 inputs" in error and "16 columns" in error


def test_vera_lambda_d_length_and_nan(vera_dir):
    key_d = "base_model.model.a.vera_lambda_d"
    rewrite(vera_dir, lambda t: t.update({key_d: torch.ones(5)}))
    assert _bad_vera_layer(vera_dir, "a") == f"{key_d}: has 5 entries but the shared vera_A has r=4 rows"
    key_b = "base_model.model.a.vera_lambda_b"

    def nan_in_b(tensors):
        tensors[key_d] = torch.ones(4)
        tensors[key_b][3] = float("inf")

    rewrite(vera_dir, nan_in_b)
    assert _bad_vera_layer(vera_dir, "a") == f"{key_b}: 0 NaN and 1 Inf values"


@pytest.mark.parametrize("missing", ["base_model.vera_A", "base_model.vera_B"])
def test_vera_missing_shared_tensor(vera_dir, missing):
    rewrite(vera_dir, lambda t: t.pop(missing))
    with pytest.raises(rankscope.CheckpointError, match=rf"'{missing}'.*missing.*save_projection=true"):
        rankscope.load(vera_dir)
    result = run_cli(vera_dir)
    assert result.exit_code == 1 and missing in result.stderr and "adapter_model.safetensors" in result.stderr


def test_vera_nonfinite_shared_tensor(vera_dir):
    rewrite(vera_dir, lambda t: t["base_model.vera_A"].__setitem__((0, 0), float("nan")))
    with pytest.raises(rankscope.CheckpointError, match=r"'base_model.vera_A'.*1 NaN"):
        rankscope.load(vera_dir)


def test_vera_cli_json(vera_dir):
    result = run_cli(vera_dir, "--json", "-", "-q", "--base", vera_dir.parent / "base.safetensors")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["checkpoint"]["family"] == "vera" and doc["skipped"] == []
    assert [layer["matrix_shape"] for layer in doc["layers"]] == [[12, 16], [20, 12], [20, 8]]
    assert [layer["params"] for layer in doc["layers"]] == [16, 24, 24]


class WideHead(Wide):
    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(20, 3)


def test_vera_bf16_file_and_skipped_tensors(tmp_path):
    torch.manual_seed(7)
    model = WideHead()
    base = float64_base(model)
    config = VeraConfig(r=4, target_modules=["a", "b", "c"], bias="vera_only", modules_to_save=["head"])
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "vera_lambda" in name:
                param.copy_((torch.rand_like(param) + 0.5) * torch.randn_like(param).sign())
    peft_model.save_pretrained(tmp_path / "vera")
    rewrite(tmp_path / "vera", lambda t: t.update({k: v.to(torch.bfloat16) for k, v in t.items()}))
    checkpoint = rankscope.load(tmp_path / "vera", base=save_base(base, tmp_path / "base.safetensors"))
    skipped = {item.key: item.reason for item in checkpoint.skipped}
    assert set(skipped) == {"base_model.model.head.weight", "base_model.model.head.bias"}
    assert "modules_to_save" in skipped["base_model.model.head.bias"]
    # the paper's ΔW from the bf16 values, formed here in float64
    tensors = {k: v.double() for k, v in load_file(str(tmp_path / "vera" / "adapter_model.safetensors")).items()}
    # bias="vera_only" saved each layer's whole bias (here the base's, rounded to bf16): against the base, Δb
    layers = {layer.name: layer for layer in checkpoint.layers}
    for name in ("a", "b", "c"):
        change = tensors[f"base_model.model.{name}.base_layer.bias"] - base[f"{name}.bias"]
        assert layers[name].bias_scaled is False and torch.equal(layers[name].bias_update, change)
    without_base = {item.key: item.reason for item in rankscope.load(tmp_path / "vera").skipped}
    assert "bias='vera_only'" in without_base["base_model.model.a.base_layer.bias"]
    records = by_name(rankscope.analyze(checkpoint))
    for name in ("a", "b", "c"):
        out, width = base[f"{name}.weight"].shape
        lambda_b = tensors[f"base_model.model.{name}.vera_lambda_b"]
        lambda_d = tensors[f"base_model.model.{name}.vera_lambda_d"]
        delta = (
            torch.diag(lambda_b)
            @ tensors["base_model.vera_B"][:out]
            @ torch.diag(lambda_d)
            @ tensors["base_model.vera_A"][:, :width]
        )
        assert_spectrum(records[name], delta, 4)
