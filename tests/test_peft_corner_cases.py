"""PEFT's corner cases against PEFT 0.21 itself: LoRA on nn.MultiheadAttention, and inits that rewrite the base
weight (PiSSA, OLoRA, pissa_niter_K, CorDA, LoftQ, LoRA-GA) saved without conversion.

Every adapter is written by PEFT's ``save_pretrained``. The ground truth of a layer is the model PEFT builds
from the file on the ORIGINAL base (``PeftModel.from_pretrained``, which re-runs a PiSSA/OLoRA init), merged
with ``merge_and_unload()`` in float64, minus the original weight; svdvals taken here in float64. PEFT keeps
the rewritten base W₀ − s·B₀A₀ in float32, so that reference carries float32 rounding (~1e-8 relative,
measured): it is met at MERGE_TOL, and s·(B′A′ − B₀A₀) formed here in float64 from PEFT's own init factors
(read from the model right after ``get_peft_model``) is met at EXACT_TOL.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

pytest.importorskip("peft")

from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers.pytorch_utils import Conv1D

import rankscope
from rankscope.cli import main
from rankscope.core.base import BaseWeights
from rankscope.core.naming import layer_name

EXACT_TOL = 1e-12  # against a float64 reference with no float32 step (measured ≤ 2e-15)
MERGE_TOL = 1e-6  # against PEFT's reload, whose rewritten base is float32 (measured ≤ 4e-8)
R, ALPHA = 3, 6  # s = 2


@pytest.fixture(autouse=True)
def _quiet_peft():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns about PiSSA/OLoRA saves without conversion, fan_in_fan_out, …
        yield


class Net(nn.Module):
    """Linear layers of different shapes and an Embedding (which PEFT's PiSSA/OLoRA inits leave alone)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(16, 12)
        self.b = nn.Linear(12, 20)
        self.emb = nn.Embedding(10, 6)


class GPT2Like(nn.Module):
    """transformers' Conv1D (weight stored (in, out)): square for OLoRA, which does not transpose it."""

    def __init__(self) -> None:
        super().__init__()
        self.c_proj = Conv1D(10, 10)
        self.c_attn = Conv1D(18, 10)


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2)
        self.lin = nn.Linear(8, 8)


@dataclass
class Built:
    """A saved adapter, its base file, and PEFT's ground truth per layer (the analysed (out, in) layout)."""

    directory: Path
    base_file: Path
    merged: dict[str, torch.Tensor]  # PEFT's reload merged in float64 minus W₀
    own: dict[str, torch.Tensor]  # s·(B′A′ − B₀A₀) from PEFT's own factors, in float64
    model: nn.Module  # the trained PeftModel (before saving)


def _factors(peft_model, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    layer = peft_model.base_model.model.get_submodule(name)
    if "default" in layer.lora_A:
        return layer.lora_B["default"].weight.detach().double().clone(), layer.lora_A[
            "default"
        ].weight.detach().double()
    return layer.lora_embedding_B["default"].detach().double().clone(), layer.lora_embedding_A[
        "default"
    ].detach().double()


def _analysed(delta: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """A weight-shaped ΔW as the matrix rankscope analyses: (out, in)."""
    return delta.T if isinstance(module, (Conv1D, nn.Embedding)) else delta


def build(directory: Path, factory, init, targets, seed: int = 0, **config) -> Built:
    """PEFT's init on ``factory()``, factors perturbed (a "trained" adapter), saved without conversion."""
    torch.manual_seed(seed)
    model = factory()
    state = copy.deepcopy(model.state_dict())
    peft_model = get_peft_model(
        model, LoraConfig(r=R, lora_alpha=ALPHA, target_modules=targets, init_lora_weights=init, **config)
    )
    initial = {name: _factors(peft_model, name) for name in targets}
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.add_(0.3 * torch.randn_like(param))
    peft_model.save_pretrained(directory)
    base_file = directory.parent / f"{directory.name}-base.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(base_file))

    original = factory()
    original.load_state_dict(state)
    reloaded = PeftModel.from_pretrained(original, directory)
    merged = copy.deepcopy(reloaded).double().merge_and_unload().state_dict()
    merged_deltas, own = {}, {}
    for name in targets:
        module = factory().get_submodule(name)
        merged_deltas[name] = _analysed(merged[f"{name}.weight"] - state[f"{name}.weight"].double(), module)
        (b1, a1), (b0, a0) = _factors(reloaded, name), initial[name]
        trained = b1 @ a1
        if isinstance(module, nn.Embedding) or init in ("lora_ga", True):
            own[name] = 2.0 * trained  # not rewritten: PEFT's plain LoRA
        elif init == "olora" and isinstance(module, Conv1D):
            own[name] = 2.0 * (trained - (b0 @ a0).T)  # OLoRA subtracts s·Q_r·R_r from the stored (in, out) weight
        else:
            own[name] = 2.0 * (trained - b0 @ a0)
    return Built(directory, base_file, merged_deltas, own, peft_model)


def assert_sigma(record, reference: torch.Tensor, tol: float, rank_bound: int) -> None:
    expected = torch.linalg.svdvals(reference)
    got = torch.tensor(record.singular_values, dtype=torch.float64)
    assert record.valid, record.error
    assert record.rank_bound == rank_bound and got.shape == (rank_bound,)
    assert expected[rank_bound - 1] > 1e-3 * expected[0], "test setup: the reference must reach rank_bound"
    rel = ((got - expected[:rank_bound]).abs() / expected[:rank_bound]).max().item()
    assert rel <= tol, f"{record.name}: relative error {rel:.2e}\n got {got}\n ref {expected[:rank_bound]}"
    tail = expected[rank_bound:]
    assert tail.numel() == 0 or tail.max() <= 10 * tol * expected[0], f"{record.name}: reference rank > rank_bound"


def records(path, **options) -> dict:
    return {record.name: record for record in rankscope.analyze(rankscope.load(path, **options))}


def spectrum_cli(*args):
    return CliRunner().invoke(main, ["spectrum", *map(str, args)], catch_exceptions=False)


# -- PiSSA / OLoRA saved without conversion ----------------------------------------------------------------


@pytest.fixture(scope="module", params=["pissa", "olora"])
def net(request, tmp_path_factory) -> tuple[str, Built]:
    return request.param, build(
        tmp_path_factory.mktemp(request.param) / "adapter", Net, request.param, ["a", "b", "emb"]
    )


def test_pissa_olora_against_peft_reload(net):
    init, built = net
    checkpoint = rankscope.load(built.directory, base=built.base_file)
    (warning,) = [w for w in checkpoint.warnings if "init_lora_weights" in w]
    assert f"init_lora_weights={init!r}" in warning and "s·(B′A′ − B₀A₀)" in warning
    assert "recomputed from --base" in warning and "2 layer(s): a, b" in warning and "pass --base" not in warning
    found = {record.name: record for record in rankscope.analyze(checkpoint)}
    for name in ("a", "b"):
        record = found[name]
        assert record.exact is True and record.scale == 2.0
        assert record.matrix_shape == list(built.merged[name].shape)
        assert record.params == sum(p.numel() for p in _factors(built.model, name))  # B′, A′: 2r is not trained
        assert_sigma(record, built.merged[name], MERGE_TOL, 2 * R)
        assert_sigma(record, built.own[name], EXACT_TOL, 2 * R)
    # PEFT's Embedding ignores PiSSA/OLoRA: plain s·B·A, exact against the float64 merge
    assert found["emb"].exact is True and found["emb"].kind == "embedding"
    assert_sigma(found["emb"], built.merged["emb"], EXACT_TOL, R)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_olora_conv1d(tmp_path, init):
    targets = ["c_proj", "c_attn"] if init == "pissa" else ["c_proj"]  # OLoRA breaks on a non-square Conv1D
    built = build(tmp_path / "adapter", GPT2Like, init, targets, seed=1)
    found = records(built.directory, base=built.base_file)
    for name in targets:
        assert found[name].kind == "conv1d_gpt2" and found[name].exact is True
        assert_sigma(found[name], built.merged[name], MERGE_TOL, 2 * R)
        assert_sigma(found[name], built.own[name], EXACT_TOL, 2 * R)


def test_without_base_cli_says_pass_base_and_not_exact(net, tmp_path):
    _, built = net
    result = spectrum_cli(built.directory, "--json", "-", "--csv", tmp_path / "layers.csv")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    (warning,) = [w for w in doc["warnings"] if "init_lora_weights" in w]
    assert "pass --base BASE" in warning and "exact: false" in warning
    exact = {layer["name"]: layer["exact"] for layer in doc["layers"]}
    assert exact == {"a": False, "b": False, "emb": True}
    assert all(layer["rank_bound"] == R for layer in doc["layers"])  # s·B′A′ alone
    rows = {row["name"]: row for row in csv.DictReader(io.StringIO((tmp_path / "layers.csv").read_text()))}
    assert {name: rows[name]["exact"] for name in ("a", "b", "emb")} == {"a": "False", "b": "False", "emb": "True"}
    assert "2 layer(s) NOT exact" in result.stderr and "pass --base BASE" in result.stderr

    with_base = spectrum_cli(built.directory, "--base", built.base_file, "--json", "-", "-q")
    assert with_base.exit_code == 0, with_base.output
    layers = {layer["name"]: layer for layer in json.loads(with_base.stdout)["layers"]}
    for name in ("a", "b"):
        assert layers[name]["exact"] is True and layers[name]["rank_bound"] == 2 * R
        got = torch.tensor(layers[name]["singular_values"], dtype=torch.float64)
        expected = torch.linalg.svdvals(built.own[name])[: 2 * R]
        assert ((got - expected).abs() / expected).max() <= EXACT_TOL


def test_pissa_niter_is_randomised_and_not_exact(tmp_path):
    built = build(tmp_path / "adapter", Net, "pissa_niter_4", ["a", "b"], seed=2)
    for base, phrase in ((built.base_file, "randomised SVD"), (None, "pass --base BASE")):
        checkpoint = rankscope.load(built.directory, base=base)
        (warning,) = [w for w in checkpoint.warnings if "pissa_niter_4" in w]
        assert phrase in warning and "exact: false" in warning
        found = {record.name: record for record in rankscope.analyze(checkpoint)}
        assert all(record.valid and record.exact is False for record in found.values())
        assert {record.rank_bound for record in found.values()} == {2 * R if base else R}


class Tied(nn.Module):
    """A Linear whose weight has all singular values equal (σ_r = σ_{r+1}) beside an ordinary one."""

    def __init__(self) -> None:
        super().__init__()
        self.tied = nn.Linear(8, 8)
        self.plain = nn.Linear(8, 8)
        with torch.no_grad():
            self.tied.weight.copy_(torch.linalg.qr(torch.randn(8, 8))[0])


def test_pissa_tied_singular_values_warn(tmp_path):
    built = build(tmp_path / "adapter", Tied, "pissa", ["tied", "plain"], seed=3)
    checkpoint = rankscope.load(built.directory, base=built.base_file)
    (warning,) = [w for w in checkpoint.warnings if "init_lora_weights" in w]
    assert "nearly tie" in warning and "1 layer(s): tied" in warning
    found = {record.name: record for record in rankscope.analyze(checkpoint)}
    assert found["tied"].exact is False and found["plain"].exact is True
    assert_sigma(found["plain"], built.own["plain"], EXACT_TOL, 2 * R)


@pytest.mark.parametrize("init", ["lora_ga", "corda", "loftq"])
def test_unrecomputable_inits_are_not_exact(tmp_path, init):
    # LoRA-GA is written by PEFT as it is (no gradients attached: PEFT's own fallback init); CorDA and LoftQ
    # need preprocess_corda / bitsandbytes, so their config field is set on a LoRA-GA file written by PEFT
    built = build(tmp_path / "adapter", Net, "lora_ga", ["a", "b", "emb"], seed=4)
    if init != "lora_ga":
        config = json.loads((built.directory / "adapter_config.json").read_text())
        config["init_lora_weights"] = init
        (built.directory / "adapter_config.json").write_text(json.dumps(config))
    for base in (built.base_file, None):
        checkpoint = rankscope.load(built.directory, base=base)
        (warning,) = [w for w in checkpoint.warnings if "init_lora_weights" in w]
        assert "cannot be recomputed" in warning and "exact: false" in warning and "pass --base" not in warning
        found = {record.name: record for record in rankscope.analyze(checkpoint)}
        # CorDA rewrites Linear layers only; LoftQ and LoRA-GA Embeddings too
        assert found["emb"].exact is (init == "corda")
        assert found["a"].exact is False and found["b"].exact is False
        # s·B′A′ as stored: what PEFT's reload of a LoRA-GA file merges (its init falls back to a plain one)
        for name in ("a", "b", "emb"):
            assert_sigma(found[name], built.merged[name], EXACT_TOL, R)


def test_dora_with_pissa_against_peft_reload(tmp_path):
    """DoRA's ΔW = m·(W₀ + D)/‖W₀ + D‖_row − W₀ holds with D = s·(B′A′ − B₀A₀): W₀ + D is PEFT's W_res + s·B′A′."""
    built = build(tmp_path / "adapter", Net, "pissa", ["a", "b"], seed=7, use_dora=True)
    checkpoint = rankscope.load(built.directory, base=built.base_file)
    assert checkpoint.adapter_type == "DORA" and any("recomputed from --base" in w for w in checkpoint.warnings)
    for record in rankscope.analyze(checkpoint):
        expected = torch.linalg.svdvals(built.merged[record.name])
        got = torch.tensor(record.singular_values, dtype=torch.float64)
        assert record.valid and record.exact is True and got.shape == expected.shape  # dense: full rank
        assert (got - expected).abs().max() <= MERGE_TOL * expected[0]


def test_conversion_saved_pissa_is_a_plain_lora(tmp_path):
    torch.manual_seed(5)
    model = Net()
    state = copy.deepcopy(model.state_dict())
    peft_model = get_peft_model(
        model, LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["a", "b"], init_lora_weights="pissa")
    )
    peft_model.peft_config["default"].init_lora_weights = True  # PEFT's recipe for the initial adapter
    peft_model.save_pretrained(tmp_path / "initial")
    peft_model.peft_config["default"].init_lora_weights = "pissa"
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.add_(0.3 * torch.randn_like(param))
    peft_model.save_pretrained(
        tmp_path / "converted", path_initial_model_for_weight_conversion=str(tmp_path / "initial")
    )
    assert json.loads((tmp_path / "converted" / "adapter_config.json").read_text())["r"] == 2 * R

    original = Net()
    original.load_state_dict(state)
    merged = PeftModel.from_pretrained(original, tmp_path / "converted").double().merge_and_unload().state_dict()
    checkpoint = rankscope.load(tmp_path / "converted")
    assert not any("init_lora_weights" in w for w in checkpoint.warnings)
    found = {record.name: record for record in rankscope.analyze(checkpoint)}
    for name in ("a", "b"):
        assert found[name].exact is True
        assert_sigma(found[name], merged[f"{name}.weight"] - state[f"{name}.weight"].double(), EXACT_TOL, 2 * R)


def test_training_checkpoint_with_pissa(net, tmp_path):
    """A whole model's state dict holds the REWRITTEN base (W₀ − s·B₀A₀): --base gives the original."""
    _, built = net
    torch.save(built.model.state_dict(), tmp_path / "model.pt")
    built.model.peft_config["default"].save_pretrained(tmp_path)  # adapter_config.json beside it
    found = records(tmp_path / "model.pt", base=built.base_file)
    for name in ("a", "b"):
        assert found[name].exact is True
        assert_sigma(found[name], built.own[name], EXACT_TOL, 2 * R)
    checkpoint = rankscope.load(tmp_path / "model.pt")
    assert checkpoint.family == "lora" and any("pass --base BASE" in w for w in checkpoint.warnings)
    assert {layer.name: layer.exact for layer in checkpoint.layers} == {"a": False, "b": False, "emb": True}


# -- nn.MultiheadAttention ---------------------------------------------------------------------------------


def test_inner_base_layer_segments_are_dropped_from_names():
    assert layer_name("base_model.model.enc.attn.base_layer.out_proj") == "enc.attn.out_proj"
    assert layer_name("a.base_layer.base_layer.b") == "a.b"
    assert layer_name("q_proj.base_layer") == "q_proj.base_layer"  # a trailing wrapper is base.py's to drop


def test_multihead_attention_names_scale_and_double_out_proj(tmp_path):
    torch.manual_seed(6)
    model = Attention()
    base = {key: value.detach().double().clone() for key, value in model.state_dict().items()}
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["attn", "lin"], rank_pattern={"attn": 3})
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn_like(param))
    peft_model.save_pretrained(tmp_path / "adapter")
    stored = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert "base_model.model.attn.base_layer.out_proj.lora_A.weight" in stored  # PEFT's layout
    assert stored["base_model.model.attn.lora_B.weight"].shape == (24, 3)  # in_proj: q, k, v stacked
    merged = copy.deepcopy(peft_model).double().merge_and_unload().state_dict()
    save_file({k: v.float().contiguous() for k, v in base.items()}, str(tmp_path / "base.safetensors"))

    checkpoint = rankscope.load(tmp_path / "adapter", base=tmp_path / "base.safetensors")
    (warning,) = [w for w in checkpoint.warnings if "MultiheadAttention" in w]
    assert "2·s·B·A at 1 layer(s): attn.out_proj" in warning and "PEFT 0.21.2" in warning
    found = {record.name: record for record in rankscope.analyze(checkpoint)}
    assert set(found) == {"attn", "attn.out_proj", "lin"}
    # the names are the base model's: its weights are found under them
    base_weights = BaseWeights(tmp_path / "base.safetensors")
    assert base_weights.key_for("attn.out_proj") == "attn.out_proj.weight"
    assert base_weights.key_for("lin") == "lin.weight"

    # in_proj: s·B·A merged into in_proj_weight, r = 3 from the attention module's rank_pattern
    assert found["attn"].scale == pytest.approx(4 / 3) and found["attn"].matrix_shape == [24, 8]
    assert_sigma(found["attn"], merged["attn.in_proj_weight"] - base["attn.in_proj_weight"], EXACT_TOL, 3)
    # out_proj: PEFT 0.21 merges (and runs) 2·s·B·A; rankscope analyses s·B·A, and the warning is true
    out = found["attn.out_proj"]
    assert out.scale == pytest.approx(4 / 3) and out.matrix_shape == [8, 8]
    assert_sigma(out, (merged["attn.out_proj.weight"] - base["attn.out_proj.weight"]) / 2, EXACT_TOL, 3)
    a = stored["base_model.model.attn.base_layer.out_proj.lora_A.weight"].double()
    b = stored["base_model.model.attn.base_layer.out_proj.lora_B.weight"].double()
    assert torch.allclose(merged["attn.out_proj.weight"] - base["attn.out_proj.weight"], 2 * (4 / 3) * b @ a)
    assert found["lin"].scale == 2.0
    assert_sigma(found["lin"], merged["lin.weight"] - base["lin.weight"], EXACT_TOL, 2)


class GroupedConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.grouped = nn.Conv2d(4, 8, 3, padding=1, groups=2)
        self.plain = nn.Conv2d(8, 6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.plain(self.grouped(x))


def grouped_conv_adapter(directory: Path, seed: int):
    """PEFT's LoRA (r=4) on GroupedConv's grouped and plain convs, factors moved off their init, saved."""
    torch.manual_seed(seed)
    peft_model = get_peft_model(GroupedConv(), LoraConfig(r=4, lora_alpha=6, target_modules=["grouped", "plain"]))
    with torch.no_grad():
        for parameter in peft_model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.3 * torch.randn_like(parameter))
    peft_model.save_pretrained(directory)
    return peft_model


def test_lora_on_a_grouped_conv_is_the_update_peft_applies(tmp_path):
    """PEFT's LoRA on a Conv2d with groups=2: B is a grouped 1×1 conv (weight (out, r/g, 1, 1)), so ΔW is the
    kernel of x ↦ s·B(A(x)) over every input channel — found here by that composite conv on unit impulses — and
    PEFT's layer forward is the base plus exactly that; the layer beside it is a plain conv LoRA."""
    peft_model = grouped_conv_adapter(tmp_path / "adapter", seed=0)
    layer = peft_model.base_model.model.grouped
    a, b = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
    assert tuple(b.shape) == (8, 2, 1, 1)
    impulses = torch.eye(4 * 9, dtype=torch.float64).reshape(36, 4, 3, 3)
    responses = nn.functional.conv2d(nn.functional.conv2d(impulses, a), b, groups=2) * layer.scaling["default"]
    delta = responses.reshape(36, 8).T  # column (c, u, v) of the (out, in·k·k) kernel
    x = torch.randn(1, 4, 5, 5)
    with torch.no_grad():  # the reference is PEFT's own forward: base + the composite conv
        kernel = delta.reshape(8, 4, 3, 3).float()
        assert torch.allclose(
            layer(x), layer.get_base_layer()(x) + nn.functional.conv2d(x, kernel, padding=1), atol=1e-5
        )
    checkpoint = rankscope.load(tmp_path / "adapter")
    found = records(tmp_path / "adapter")
    record = found["grouped"]
    assert record.valid and record.matrix_shape == [8, 36] and record.shape == [8, 4, 3, 3]
    assert record.kind == "conv2d_grouped" and found["plain"].kind == "conv2d"
    assert_sigma(record, delta, EXACT_TOL, 4)
    assert found["plain"].valid and found["plain"].matrix_shape == [6, 72]
    assert any("grouped conv (groups 2) in 1 layer(s), e.g. grouped" in note for note in checkpoint.notes)


def test_convert_leaves_a_grouped_conv_lora_out_saying_so(tmp_path):
    """convert cannot write a grouped conv's LoRA (PEFT's B would have to stay grouped; a truncated SVD of ΔW is
    not): the layer is left out with a note, the plain conv beside it converted and loadable by PEFT."""
    grouped_conv_adapter(tmp_path / "adapter", seed=1)
    result = CliRunner().invoke(
        main, ["convert", str(tmp_path / "adapter"), "-o", str(tmp_path / "out"), "--rule", "fixed:2"]
    )
    assert result.exit_code == 0, result.output
    assert "grouped (conv2d_grouped)" in result.output
    written = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert sorted(written) == ["base_model.model.plain.lora_A.weight", "base_model.model.plain.lora_B.weight"]
    PeftModel.from_pretrained(GroupedConv(), tmp_path / "out")  # what was written fits PEFT's layers


class TwoLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 5)
        self.proj = nn.Linear(5, 7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.lin(x))


def test_overlapping_pattern_keys_warn_and_follow_peft_s_reload(tmp_path):
    """alpha_pattern keys that both match a layer, written out of sorted order: PEFT's save sorts them, its reload
    applies the first in the file — rankscope reads the layer as that reload does (σ of the reloaded model's merge)
    and warns, naming the layer and both keys; a layer only one key matches is not named."""
    torch.manual_seed(0)
    config = LoraConfig(r=3, lora_alpha=3, target_modules=["lin", "proj"], alpha_pattern={"proj": 9, "p.*j": 30})
    peft_model = get_peft_model(TwoLinear(), config)
    with torch.no_grad():
        for parameter in peft_model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.3 * torch.randn_like(parameter))
    peft_model.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["alpha_pattern"]
    assert list(saved) == ["p.*j", "proj"]  # sorted on save: the reload's first match is now "p.*j"
    reloaded = PeftModel.from_pretrained(TwoLinear(), tmp_path / "adapter").double()
    proj = reloaded.base_model.model.proj
    assert proj.scaling["default"] == 10.0  # 30 / 3: the file's first key
    w0 = proj.get_base_layer().weight.detach().clone()
    delta = reloaded.merge_and_unload().proj.weight.detach() - w0
    checkpoint = rankscope.load(tmp_path / "adapter")
    found = records(tmp_path / "adapter")
    assert_sigma(found["proj"], delta, EXACT_TOL, 3)
    (warning,) = [w for w in checkpoint.warnings if w.startswith("alpha_pattern:")]
    assert "1 layer(s)" in warning and "e.g. proj: 'p.*j' → 30, 'proj' → 9" in warning
