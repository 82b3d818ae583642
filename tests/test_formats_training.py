"""Training checkpoints — a PEFT-wrapped model's whole state dict, plain or as Lightning saves it — against
PEFT's own ``merge_and_unload()`` (merged in float64, minus the base weight; svdvals computed here)."""

from __future__ import annotations

import copy
import json
import shutil
import warnings
from dataclasses import dataclass

import pytest
import torch

pytest.importorskip("peft")

from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn

import rankscope
from rankscope.formats import detect
from rankscope.formats.common.source import locate

from .factories import one_line_error as assert_one_line_error
from .factories import run_spectrum as spectrum

REL_TOL = 1e-5
FLOOR = 1e-6


@pytest.fixture(autouse=True)
def _quiet_peft():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 12)
        self.emb = nn.Embedding(20, 8)
        self.c2 = nn.Conv2d(4, 6, 3)
        self.head = nn.Linear(12, 5)  # not targeted: its weights are base-model weights in the state dict


@dataclass
class HyperParameters:
    """What Lightning pickles under ``hyper_parameters``: an object that weights_only refuses."""

    lr: float
    rank: int


CONFIG = {"r": 4, "lora_alpha": 8, "target_modules": ["lin", "emb", "c2"]}  # s = 2


def peft_model(seed: int = 0, adapter: str = "default", **config):
    torch.manual_seed(seed)
    model = Mixed()
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    wrapped = get_peft_model(model, LoraConfig(init_lora_weights=False, **(config or CONFIG)), adapter_name=adapter)
    return wrapped, base


def analysed(delta: torch.Tensor, module: nn.Module) -> torch.Tensor:
    return delta.T if isinstance(module, nn.Embedding) else delta.reshape(delta.shape[0], -1)


def references(model, base, adapter: str = "default") -> dict[str, torch.Tensor]:
    """{layer: analysed ΔW} of ``adapter`` from PEFT's merge in float64."""
    twin = copy.deepcopy(model).double()
    twin.set_adapter(adapter)
    merged = twin.merge_and_unload().state_dict()
    return {
        name.removeprefix("base_model.model."): analysed(
            merged[f"{name.removeprefix('base_model.model.')}.weight"]
            - base[f"{name.removeprefix('base_model.model.')}.weight"].double(),
            module.get_base_layer(),
        )
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer) and adapter in module.r
    }


def assert_spectra(analysis, expected: dict[str, torch.Tensor], *, rank: int | None, factor: float = 1.0) -> None:
    """σ of each layer against svdvals(expected ΔW)/factor: the top ``rank`` (None: the full spectrum)."""
    records = {record.name: record for record in analysis}
    assert set(records) == set(expected)
    for name, delta in expected.items():
        record = records[name]
        assert record.valid, record.error
        reference = torch.linalg.svdvals(delta) / factor
        k = rank if rank is not None else min(delta.shape)
        got = torch.tensor(record.singular_values, dtype=torch.float64)
        assert got.shape == (k,) and record.rank_bound == k
        assert reference[min(k, 4) - 1] > 1e-3 * reference[0]
        big = reference[:k] >= FLOOR * reference[0]
        rel = ((got[big] - reference[:k][big]).abs() / reference[:k][big]).max().item()
        assert rel <= REL_TOL, f"{name}: relative error {rel:.2e}"
        assert reference[k:].numel() == 0 or reference[k:].max() <= FLOOR * reference[0]


@pytest.fixture(scope="module")
def lora_state():
    model, base = peft_model()
    return model.state_dict(), references(model, base)


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin"])
def test_plain_state_dict(lora_state, tmp_path, suffix):
    state, expected = lora_state
    path = tmp_path / f"model{suffix}"
    torch.save(state, path)
    assert detect(locate(path)).name == "training"
    checkpoint = rankscope.load(path, alpha=8)
    assert (checkpoint.family, checkpoint.adapter_type) == ("lora", "LORA") and checkpoint.other_adapters == []
    assert_spectra(rankscope.analyze(checkpoint), expected, rank=4)
    assert all(layer.scale == 2.0 for layer in checkpoint.layers)
    # every tensor is used or listed: the base model's weights as such
    used = {key for key in state if ".lora_" in key}
    assert {s.key for s in checkpoint.skipped} == set(state) - used
    assert {s.reason for s in checkpoint.skipped} == {"base model weight"}
    assert "base_model.model.lin.base_layer.weight" in {s.key for s in checkpoint.skipped}
    assert "base_model.model.head.weight" in {s.key for s in checkpoint.skipped}


def test_a_folder_of_training_state_reads_the_model_beside_it(lora_state, tmp_path):
    """accelerate's save_state folder (or a Trainer checkpoint without adapter files): the model's state dict beside
    optimizer.bin, scheduler.bin, random_states_0.pkl … is the one tensor file read; the others are never weights."""
    from safetensors.torch import save_file

    state, expected = lora_state
    save_file(
        {key: value.detach().clone().contiguous() for key, value in state.items()}, str(tmp_path / "model.safetensors")
    )
    for name in ("optimizer.bin", "scheduler.bin", "scaler.pt", "random_states_0.pkl", "rng_state.pth"):
        torch.save({"state": {}}, tmp_path / name)
    checkpoint = rankscope.load(tmp_path, alpha=8)
    assert checkpoint.weights_file == tmp_path / "model.safetensors"
    assert_spectra(rankscope.analyze(checkpoint), expected, rank=4)


def test_alpha_unknown_without_a_config(lora_state, tmp_path):
    state, expected = lora_state
    torch.save(state, tmp_path / "model.pt")
    checkpoint = rankscope.load(tmp_path / "model.pt")
    assert any("--alpha" in w and "scale 1" in w for w in checkpoint.warnings)
    assert all(layer.scale == 1.0 for layer in checkpoint.layers)
    assert_spectra(rankscope.analyze(checkpoint), expected, rank=4, factor=2.0)


def test_adapter_config_beside_the_file(tmp_path):
    model, base = peft_model(seed=1, r=4, lora_alpha=12, use_rslora=True, target_modules=["lin", "c2"])
    model.save_pretrained(tmp_path / "saved")
    shutil.copy(tmp_path / "saved" / "adapter_config.json", tmp_path / "adapter_config.json")
    torch.save(model.state_dict(), tmp_path / "model.pt")
    checkpoint = rankscope.load(tmp_path / "model.pt")
    assert checkpoint.warnings == [] and checkpoint.adapter_type == "RSLORA"
    assert all(layer.scale == pytest.approx(6.0) for layer in checkpoint.layers)
    assert_spectra(rankscope.analyze(checkpoint), references(model, base), rank=4)


def test_lightning_checkpoint(lora_state, tmp_path):
    state, expected = lora_state
    path = tmp_path / "epoch=3.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in state.items()}, "epoch": 3, "global_step": 30}, path)
    result = spectrum(path, "--alpha", "8", "--json", "-", "-q")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["checkpoint"]["family"] == "lora"
    layers = {layer["name"]: layer for layer in doc["layers"]}
    assert set(layers) == {"lin", "emb", "c2"}  # Lightning's "model." attribute prefix stripped with PEFT's
    reference = torch.linalg.svdvals(expected["c2"])[:4]
    assert layers["c2"]["singular_values"] == pytest.approx(reference.tolist(), rel=REL_TOL)


def test_lightning_hyper_parameters_need_trust_pickle(lora_state, tmp_path):
    state, expected = lora_state
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": state, "epoch": 3, "hyper_parameters": HyperParameters(1e-3, 4)}, path)
    assert_one_line_error(spectrum(path), str(path), "weights_only", "--trust-pickle")
    result = spectrum(path, "--trust-pickle", "--alpha", "8", "--json", "-", "-q")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    lin = {layer["name"]: layer for layer in doc["layers"]}["lin"]
    assert lin["singular_values"] == pytest.approx(torch.linalg.svdvals(expected["lin"])[:4].tolist(), rel=REL_TOL)


@pytest.fixture(scope="module")
def two_adapters(tmp_path_factory):
    """A state dict holding adapters ``default`` (lin, emb, c2) and ``second`` (lin only, r=2, α=6)."""
    model, base = peft_model(seed=2)
    model.add_adapter("second", LoraConfig(r=2, lora_alpha=6, target_modules=["lin"], init_lora_weights=False))
    path = tmp_path_factory.mktemp("two") / "model.pt"
    torch.save(model.state_dict(), path)
    return path, references(model, base, "default"), references(model, base, "second")


def test_several_adapters_default_first(two_adapters):
    path, default, _ = two_adapters
    checkpoint = rankscope.load(path, alpha=8)
    assert checkpoint.other_adapters == ["second"]
    assert_spectra(rankscope.analyze(checkpoint), default, rank=4)
    reasons = {s.key: s.reason for s in checkpoint.skipped}
    assert "adapter 'second'" in reasons["base_model.model.lin.lora_A.second.weight"]
    assert "--adapter second" in reasons["base_model.model.lin.lora_B.second.weight"]


def test_adapter_option_picks_one(two_adapters):
    path, _, second = two_adapters
    checkpoint = rankscope.load(path, adapter="second", alpha=6)
    assert checkpoint.other_adapters == ["default"] and checkpoint.layers[0].scale == 3.0
    assert_spectra(rankscope.analyze(checkpoint), second, rank=2)
    result = spectrum(path, "--adapter", "second", "--alpha", "6", "--json", "-", "-q")
    assert result.exit_code == 0, result.output
    assert [layer["name"] for layer in json.loads(result.stdout)["layers"]] == ["lin"]


def test_unknown_adapter_name(two_adapters):
    path = two_adapters[0]
    assert_one_line_error(spectrum(path, "--adapter", "third"), str(path), "'third'")


def test_named_adapters_without_default_need_a_choice(tmp_path):
    model, base = peft_model(seed=3, adapter="alpha")
    model.add_adapter("beta", LoraConfig(r=3, lora_alpha=3, target_modules=["lin"], init_lora_weights=False))
    torch.save(model.state_dict(), tmp_path / "model.pt")
    assert_one_line_error(spectrum(tmp_path / "model.pt"), "alpha, beta", "--adapter NAME")
    checkpoint = rankscope.load(tmp_path / "model.pt", adapter="beta", alpha=3)
    assert_spectra(rankscope.analyze(checkpoint), references(model, base, "beta"), rank=3)


@pytest.fixture(scope="module")
def dora_training(tmp_path_factory):
    """A DoRA model's whole state dict (the base weights inside it) and PEFT's merged ΔW."""
    model, base = peft_model(seed=4, use_dora=True, **CONFIG)
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():  # a trained magnitude (PEFT starts from m = ‖W0 + sBA‖, where ΔW = sBA)
        for name, param in model.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(1 + 0.3 * torch.randn(param.shape, generator=generator))
    directory = tmp_path_factory.mktemp("dora")
    torch.save({"state_dict": model.state_dict(), "epoch": 1}, directory / "dora.ckpt")
    return directory / "dora.ckpt", model, references(model, base)


def test_dora_inside_a_training_checkpoint_needs_no_base(dora_training):
    path, _, expected = dora_training
    checkpoint = rankscope.load(path, alpha=8)
    assert checkpoint.adapter_type == "DORA"
    assert_spectra(rankscope.analyze(checkpoint), expected, rank=None)
    reasons = {s.reason for s in checkpoint.skipped}
    # the base weights, and the checkpoint's entries beside its state_dict (epoch …), are listed, not dropped
    assert reasons == {"base model weight", "beside the state_dict (int)"}
    result = spectrum(path, "--alpha", "8", "--json", "-", "-q")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["checkpoint"]["adapter_type"] == "DORA"


def test_dora_training_checkpoint_directional_only(dora_training):
    path, model, _ = dora_training
    checkpoint = rankscope.load(path, alpha=8, directional_only=True)
    assert checkpoint.adapter_type == "DORA_DIRECTIONAL"
    layer = model.base_model.model.lin
    directional = 2.0 * layer.lora_B["default"].weight.double() @ layer.lora_A["default"].weight.double()
    record = {r.name: r for r in rankscope.analyze(checkpoint)}["lin"]
    expected = torch.linalg.svdvals(directional.detach())[:4]
    assert record.singular_values == pytest.approx(expected.tolist(), rel=1e-9)
    assert "base_model.model.lin.lora_magnitude_vector.default.weight" in {s.key for s in checkpoint.skipped}


def test_dora_training_checkpoint_missing_its_base_layer(dora_training, tmp_path):
    path, _, _ = dora_training
    state = torch.load(path, weights_only=True)["state_dict"]
    del state["base_model.model.emb.base_layer.weight"]
    torch.save(state, tmp_path / "partial.pt")
    records = {r.name: r for r in rankscope.analyze(rankscope.load(tmp_path / "partial.pt", alpha=8))}
    assert records["lin"].valid and not records["emb"].valid
    assert "base model has no weight for layer 'emb'" in records["emb"].error


def test_adapter_option_on_a_saved_adapter_file(tmp_path):
    model, _ = peft_model(seed=5)
    model.save_pretrained(tmp_path / "saved")
    path = tmp_path / "saved" / "adapter_model.safetensors"
    assert_one_line_error(spectrum(path, "--adapter", "default"), str(path), "no adapter named 'default'")
