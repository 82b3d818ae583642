"""DoRA and (IA)³ — the updates that need the base weights — against PEFT's own ``merge_and_unload()``.

The reference ΔW of a layer is PEFT's merged weight (merged in float64) minus the base weight; its full
float64 spectrum (``torch.linalg.svdvals`` here) is compared with rankscope's dense spectrum. The base is given
as a model directory (``model.safetensors``), as shards with an index, or as one safetensors file.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")

from peft import IA3Config, LoraConfig, get_peft_model
from peft.tuners.ia3 import IA3Layer
from peft.tuners.lora import LoraLayer
from safetensors.torch import save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

import rankscope

from .factories import one_line_error as assert_one_line_error
from .factories import run_spectrum as spectrum

REL_TOL = 1e-5  # on singular values ≥ FLOOR·σ₁
FLOOR = 1e-6


@pytest.fixture(autouse=True)
def _quiet_peft():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns about fan_in_fan_out and the like
        yield


# -- tiny base models -----------------------------------------------------------------------------------------


class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 12)
        self.emb = nn.Embedding(20, 8)
        self.c2 = nn.Conv2d(4, 6, 3)
        self.head = nn.Linear(12, 5)  # not targeted


class GPT2Like(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c_attn = Conv1D(18, 10)  # weight (in, out) = (10, 18)
        self.c_fc = Conv1D(14, 10)


class FeedForward(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.k = nn.Linear(16, 12)
        self.ff = nn.Linear(12, 16)
        self.c2 = nn.Conv2d(4, 6, 3)
        self.cf = nn.Conv2d(6, 4, 1)
        self.cg = nn.Conv2d(6, 4, 3, groups=2)


# -- building adapters and PEFT's ground truth ----------------------------------------------------------------


def plain_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone().contiguous() for key, value in model.state_dict().items()}


def analysed(delta: torch.Tensor, base_module: nn.Module) -> torch.Tensor:
    """ΔW (base layout) as the analysed (out, in·k…) matrix: Conv1D and embeddings are stored transposed."""
    if isinstance(base_module, (Conv1D, nn.Embedding)):
        return delta.T
    return delta.reshape(delta.shape[0], -1)


def merged_deltas(peft_model, base: dict[str, torch.Tensor], layer_type: type, adapter: str = "default") -> dict:
    """{layer name: (analysed ΔW float64, the PEFT layer)} from PEFT's merge in float64."""
    twin = copy.deepcopy(peft_model).double()
    twin.set_adapter(adapter)
    merged = twin.merge_and_unload().state_dict()
    out = {}
    for name, module in peft_model.named_modules():
        if isinstance(module, layer_type):
            name = name.removeprefix("base_model.model.")
            delta = merged[f"{name}.weight"] - base[f"{name}.weight"].double()
            out[name] = (analysed(delta, module.get_base_layer()), module)
    return out


def randomise_magnitudes(peft_model, seed: int) -> None:
    """A trained magnitude: PEFT initialises m = ‖W0 + sBA‖ (then ΔW = sBA, rank r); perturb it."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(1 + 0.3 * torch.randn(param.shape, generator=generator))


def dora_model(build: type, seed: int = 0, **config):
    torch.manual_seed(seed)
    model = build()
    base = plain_state(model)
    peft_model = get_peft_model(model, LoraConfig(use_dora=True, init_lora_weights=False, **config))
    randomise_magnitudes(peft_model, seed)
    return peft_model, base


def write_base(base: dict[str, torch.Tensor], where: Path, layout: str) -> Path:
    """The base model as a directory with model.safetensors, as two shards + index, or as one file."""
    if layout == "file":
        where.parent.mkdir(parents=True, exist_ok=True)
        save_file(base, str(where.with_suffix(".safetensors")))
        return where.with_suffix(".safetensors")
    where.mkdir(parents=True, exist_ok=True)
    if layout == "dir":
        save_file(base, str(where / "model.safetensors"))
        return where
    keys = sorted(base)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for file, names in shards.items():
        save_file({k: base[k] for k in names}, str(where / file))
    weight_map = {k: file for file, names in shards.items() for k in names}
    (where / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return where


def adapter_params(layer: nn.Module, adapter: str = "default") -> int:
    return sum(
        p.numel() for n, p in layer.named_parameters() if not n.startswith("base_layer") and adapter in n.split(".")
    )


def directional(layer: LoraLayer, adapter: str = "default") -> torch.Tensor:
    """s·B·A from PEFT's own layer, as the analysed matrix."""
    if adapter in layer.lora_embedding_A:
        a, b = layer.lora_embedding_A[adapter], layer.lora_embedding_B[adapter]
    else:
        a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    r = a.shape[0]
    return layer.scaling[adapter] * b.detach().double().reshape(-1, r) @ a.detach().double().reshape(r, -1)


def assert_full_spectrum(record, matrix: torch.Tensor, *, beyond: int | None = None) -> None:
    """rankscope's σ (all min(m, n) of them) against svdvals of ``matrix``; ``beyond``: the reference must
    have rank above it (so that s·B·A alone, of rank r, could not pass)."""
    assert record.valid, record.error
    expected = torch.linalg.svdvals(matrix)
    got = torch.tensor(record.singular_values, dtype=torch.float64)
    assert got.shape == expected.shape, f"{record.name}: {got.shape} values, expected {expected.shape}"
    if beyond is not None:
        assert expected[beyond] > 1e-3 * expected[0], "test setup: the reference must exceed rank r"
    big = expected >= FLOOR * expected[0]
    rel = ((got[big] - expected[big]).abs() / expected[big]).max().item()
    assert rel <= REL_TOL, f"{record.name}: relative error {rel:.2e}\n got {got}\n ref {expected}"
    assert got[~big].numel() == 0 or got[~big].max().item() <= 10 * FLOOR * expected[0].item()


def by_name(analysis) -> dict:
    return {record.name: record for record in analysis}


# -- DoRA -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dora_mixed(tmp_path_factory):
    """A DoRA adapter on Linear + Embedding + Conv2d, its base weights, and PEFT's merged ΔW per layer."""
    peft_model, base = dora_model(Mixed, r=4, lora_alpha=8, target_modules=["lin", "emb", "c2"])
    directory = tmp_path_factory.mktemp("dora") / "adapter"
    peft_model.save_pretrained(directory)
    return directory, base, merged_deltas(peft_model, base, LoraLayer)


@pytest.mark.parametrize("layout", ["dir", "sharded", "file"])
def test_dora_matches_peft_merge(dora_mixed, tmp_path, layout):
    directory, base, references = dora_mixed
    checkpoint = rankscope.load(directory, base=write_base(base, tmp_path / "base", layout))
    assert (checkpoint.family, checkpoint.adapter_type) == ("lora", "DORA")
    assert checkpoint.skipped == [] and checkpoint.warnings == []
    records = by_name(rankscope.analyze(checkpoint))
    assert set(records) == {"lin", "emb", "c2"}
    for name, (delta, layer) in references.items():
        record = records[name]
        assert_full_spectrum(record, delta, beyond=4)
        assert record.shape == list(base[f"{name}.weight"].shape)
        assert record.matrix_shape == list(delta.shape)
        assert record.rank_bound == min(delta.shape)
        assert record.params == adapter_params(layer)
        assert record.scale == pytest.approx(layer.scaling["default"]) and record.scale == 2.0
        assert record.exact is True and record.family == "lora"


def test_dora_gpt2_conv1d_fan_in_fan_out(tmp_path):
    peft_model, base = dora_model(
        GPT2Like, seed=1, r=3, lora_alpha=6, use_rslora=True, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True
    )
    peft_model.save_pretrained(tmp_path / "adapter")
    records = by_name(
        rankscope.analyze(rankscope.load(tmp_path / "adapter", base=write_base(base, tmp_path / "b", "dir")))
    )
    for name, (delta, _) in merged_deltas(peft_model, base, LoraLayer).items():
        assert_full_spectrum(records[name], delta, beyond=3)
        assert records[name].shape == list(base[f"{name}.weight"].shape)  # (in, out) as Conv1D stores it
        assert records[name].matrix_shape == [base[f"{name}.weight"].shape[1], base[f"{name}.weight"].shape[0]]
        assert records[name].scale == pytest.approx(6 / 3**0.5)


def test_dora_reads_only_the_base_tensors_it_needs(dora_mixed, tmp_path, monkeypatch):
    directory, base, _ = dora_mixed
    base_path = write_base(base, tmp_path / "base", "sharded")
    read = []
    original = rankscope.core.tensorfile.TensorFile.get

    def spy(self, key):
        if Path(self.path).parent == base_path:
            read.append(key)
        return original(self, key)

    monkeypatch.setattr(rankscope.core.tensorfile.TensorFile, "get", spy)
    checkpoint = rankscope.load(directory, base=base_path)
    assert read == []  # nothing is read before the spectrum needs it
    rankscope.analyze(checkpoint)
    # only the adapted layers' weights (each may be read more than once: the base-relative metrics read W₀ again)
    assert sorted(set(read)) == ["c2.weight", "emb.weight", "lin.weight"]


def test_dora_directional_only(dora_mixed):
    directory, _, references = dora_mixed
    checkpoint = rankscope.load(directory, directional_only=True)
    assert checkpoint.adapter_type == "DORA_DIRECTIONAL"
    assert any("directional" in w and "--base" in w for w in checkpoint.warnings)
    assert sorted(s.key for s in checkpoint.skipped) == [
        f"base_model.model.{name}.lora_magnitude_vector" for name in ("c2", "emb", "lin")
    ]
    records = by_name(rankscope.analyze(checkpoint))
    for name, (_, layer) in references.items():
        record = records[name]
        expected = torch.linalg.svdvals(directional(layer))
        got = torch.tensor(record.singular_values, dtype=torch.float64)
        assert record.rank_bound == 4 and got.shape == (4,) and record.exact is True
        assert ((got - expected[:4]).abs() / expected[:4]).max().item() <= 1e-6
        assert expected[4:].max().item() <= 1e-9 * expected[0].item()
        assert record.params == adapter_params(layer)  # the magnitude is still a trained parameter


def test_dora_cli_end_to_end(dora_mixed, tmp_path):
    directory, base, references = dora_mixed
    result = spectrum(directory, "--base", write_base(base, tmp_path / "base", "dir"), "--json", "-", "-q")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["checkpoint"]["adapter_type"] == "DORA"
    layer = {record["name"]: record for record in doc["layers"]}["lin"]
    assert len(layer["singular_values"]) == 12 and layer["rank_bound"] == 12 and layer["exact"] is True
    expected = torch.linalg.svdvals(references["lin"][0])
    assert layer["singular_values"] == pytest.approx(expected.tolist(), rel=REL_TOL)


def test_unscaled_says_it_does_not_apply_to_dora(dora_mixed, tmp_path):
    directory, base, references = dora_mixed
    result = spectrum(
        directory, "--base", write_base(base, tmp_path / "base", "dir"), "--unscaled", "--json", "-", "-q"
    )
    doc = json.loads(result.stdout)
    assert any("--unscaled does not apply to 3 layer(s)" in w for w in doc["warnings"])
    layer = {record["name"]: record for record in doc["layers"]}["lin"]
    expected = torch.linalg.svdvals(references["lin"][0])  # still ΔW as applied: DoRA is not proportional to s
    assert layer["singular_values"] == pytest.approx(expected.tolist(), rel=REL_TOL)


def test_dora_without_base_is_refused(dora_mixed):
    directory, _, _ = dora_mixed
    assert_one_line_error(spectrum(directory), str(directory), "--base PATH", "--directional-only")


def test_dora_base_of_another_shape(dora_mixed, tmp_path):
    directory, base, _ = dora_mixed
    wrong = dict(base, **{"lin.weight": torch.randn(13, 16)})
    base_path = write_base(wrong, tmp_path / "wrong", "dir")
    assert_one_line_error(
        spectrum(directory, "--base", base_path), str(base_path), "'lin.weight'", "[13, 16]", "[12, 16]"
    )


def test_dora_base_missing_a_layer(dora_mixed, tmp_path):
    directory, base, _ = dora_mixed
    partial = {k: v for k, v in base.items() if k != "emb.weight"}
    base_path = write_base(partial, tmp_path / "partial", "file")
    records = by_name(rankscope.analyze(rankscope.load(directory, base=base_path)))
    assert not records["emb"].valid and records["lin"].valid and records["c2"].valid
    assert "lora_magnitude_vector" in records["emb"].error and "'emb'" in records["emb"].error
    assert str(base_path) in records["emb"].error
    result = spectrum(directory, "--base", base_path, "-q")
    assert result.exit_code == 0 and "layer emb is invalid" in result.stderr
    assert spectrum(directory, "--base", base_path, "-q", "--strict").exit_code == 1


def test_dora_base_path_missing(dora_mixed, tmp_path):
    directory, _, _ = dora_mixed
    missing = tmp_path / "no-such-model"
    assert_one_line_error(spectrum(directory, "--base", missing), str(missing), "no such file or directory")


def test_dora_forced_as_plain_lora_is_refused(dora_mixed):
    directory, _, _ = dora_mixed
    assert_one_line_error(spectrum(directory, "--format", "lora"), "dora format")


def test_dora_magnitude_of_the_wrong_length(dora_mixed, tmp_path):
    from safetensors.torch import load_file

    directory, base, _ = dora_mixed
    broken = tmp_path / "broken"
    broken.mkdir()
    tensors = load_file(str(directory / "adapter_model.safetensors"))
    tensors["base_model.model.lin.lora_magnitude_vector"] = torch.ones(7)
    save_file(tensors, str(broken / "adapter_model.safetensors"))
    (broken / "adapter_config.json").write_text((directory / "adapter_config.json").read_text())
    records = by_name(rankscope.analyze(rankscope.load(broken, base=write_base(base, tmp_path / "b", "dir"))))
    assert not records["lin"].valid and "7 magnitudes" in records["lin"].error and records["emb"].valid


# -- (IA)³ ----------------------------------------------------------------------------------------------------


def ia3_model(build: type, seed: int, **config):
    torch.manual_seed(seed)
    model = build()
    base = plain_state(model)
    return get_peft_model(model, IA3Config(init_ia3_weights=False, **config)), base


@pytest.fixture(scope="module")
def ia3_adapter(tmp_path_factory):
    peft_model, base = ia3_model(
        FeedForward, 2, target_modules=["k", "ff", "c2", "cf", "cg"], feedforward_modules=["ff", "cf", "cg"]
    )
    root = tmp_path_factory.mktemp("ia3")
    peft_model.save_pretrained(root / "adapter")
    twin = copy.deepcopy(peft_model).double().merge_and_unload().state_dict()
    return (
        root / "adapter",
        write_base(base, root / "base", "dir"),
        base,
        twin,
        merged_deltas(peft_model, base, IA3Layer),
    )


def test_ia3_matches_peft_merge(ia3_adapter):
    directory, base_path, base, merged, references = ia3_adapter
    checkpoint = rankscope.load(directory, base=base_path)
    assert (checkpoint.family, checkpoint.adapter_type) == ("ia3", "IA3") and checkpoint.skipped == []
    records = by_name(rankscope.analyze(checkpoint))
    assert set(records) == {"k", "ff", "c2", "cf", "cg"}
    for name, (delta, layer) in references.items():
        record = records[name]
        assert_full_spectrum(record, delta)
        assert record.shape == list(base[f"{name}.weight"].shape) and record.matrix_shape == list(delta.shape)
        assert record.rank_bound == min(delta.shape) and record.scale is None and record.exact is True
        assert record.params == adapter_params(layer) and record.family == "ia3"
        bias_change = merged[f"{name}.bias"] - base[f"{name}.bias"].double()
        if layer.is_feedforward:  # an input scaling leaves the bias alone
            assert record.bias_update is None and bias_change.abs().max() == 0
        else:
            assert record.bias_update["norm"] == pytest.approx(bias_change.norm().item(), rel=1e-9)


def test_ia3_base_only_forms_the_update_under_no_base_measures(ia3_adapter, tmp_path, monkeypatch):
    """--no-base-measures: the base forms ΔW (σ still PEFT's merge's), no layer is measured against it (no 'base'
    object, no W₀ decomposition cached); the default measures every layer."""
    directory, base_path, _, _, references = ia3_adapter
    monkeypatch.setenv("RANKSCOPE_CACHE", str(tmp_path / "cache"))
    result = spectrum(directory, "--base", base_path, "--no-base-measures", "--json", "-", "-q")
    assert result.exit_code == 0, result.output
    layers = {record["name"]: record for record in json.loads(result.stdout)["layers"]}
    for name, (delta, _) in references.items():
        assert "base" not in layers[name]
        assert layers[name]["singular_values"] == pytest.approx(torch.linalg.svdvals(delta).tolist(), rel=REL_TOL)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.safetensors"))
    measured = spectrum(directory, "--base", base_path, "--json", "-", "-q")
    assert measured.exit_code == 0, measured.output
    assert all("relative_update" in record["base"] for record in json.loads(measured.stdout)["layers"])
    with pytest.raises(rankscope.UsageProblem, match="base_measures"):
        rankscope.analyze(rankscope.load(directory, base=base_path), base_measures="no")


def test_ia3_gpt2_conv1d(tmp_path):
    peft_model, base = ia3_model(GPT2Like, 3, target_modules=["c_attn", "c_fc"], feedforward_modules=["c_fc"])
    peft_model.save_pretrained(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    records = by_name(
        rankscope.analyze(rankscope.load(tmp_path / "adapter", base=write_base(base, tmp_path / "b", "file")))
    )
    for name, (delta, _) in merged_deltas(peft_model, base, IA3Layer).items():
        assert_full_spectrum(records[name], delta)
        assert records[name].kind == "conv1d_gpt2" and records[name].matrix_shape == list(delta.shape)


def test_ia3_without_base_is_refused(ia3_adapter):
    directory = ia3_adapter[0]
    assert_one_line_error(spectrum(directory), str(directory), "--base PATH")


def test_ia3_base_of_another_shape(ia3_adapter, tmp_path):
    directory, _, base, _, _ = ia3_adapter
    base_path = write_base(dict(base, **{"ff.weight": torch.randn(16, 11)}), tmp_path / "wrong", "dir")
    assert_one_line_error(spectrum(directory, "--base", base_path), "'ff.weight'", "[16, 11]", "[1, 12]")


def test_ia3_cli_end_to_end(ia3_adapter):
    directory, base_path, _, _, references = ia3_adapter
    result = spectrum(directory, "--base", base_path, "--json", "-", "-q")
    assert result.exit_code == 0, result.output
    layer = {record["name"]: record for record in json.loads(result.stdout)["layers"]}["cg"]
    assert layer["matrix_shape"] == [4, 27] and layer["rank_bound"] == 4
    assert layer["singular_values"] == pytest.approx(torch.linalg.svdvals(references["cg"][0]).tolist(), rel=REL_TOL)
