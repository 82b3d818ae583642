"""PEFT LoHa and LoKr against PEFT itself: checkpoints written by ``save_pretrained`` from tiny custom modules
(random factors: ``init_weights=False``), compared with the singular values of PEFT's own
``merge_and_unload()`` weight minus the base weight (merged in float64, ``torch.linalg.svdvals`` here), and
with PEFT's own per-layer r and scaling.
"""

from __future__ import annotations

import copy
import json
import math
import warnings

import pytest
import torch
from click.testing import CliRunner
from torch import nn

pytest.importorskip("peft")

from peft import LoHaConfig, LoKrConfig, get_peft_model
from peft.tuners.lycoris_utils import LycorisLayer
from safetensors.torch import load_file, save_file

import rankscope
from rankscope.cli import main

EXACT_TOL = 1e-6  # factored / Kronecker / float64 dense paths, float32 factors
TAIL_TOL = 1e-9  # the reference spectrum beyond rank_bound, relative to σ₁


@pytest.fixture(autouse=True)
def _quiet_peft():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


class Net(nn.Module):
    """Linear layers (one where r² ≥ min(m, n) for LoHa at r=4), 3×3 and 1×1 Conv2d, and a Conv1d."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 12)
        self.wide = nn.Linear(64, 48)
        self.c3 = nn.Conv2d(16, 12, 3, padding=1)
        self.c1x1 = nn.Conv2d(8, 6, 1)
        self.c1d = nn.Conv1d(4, 6, 3)


class Stack(nn.Module):
    """Twelve blocks of q/v, for rank and alpha patterns (``layers.1`` and ``layers.10`` both exist)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            [nn.ModuleDict({"q": nn.Linear(24, 24), "v": nn.Linear(24, 24)}) for _ in range(12)]
        )


RANK_PATTERN = {r"layers\.1\d*\.q": 2, "q": 3}
ALPHA_PATTERN = {"layers.0.v": 32, r"layers\.[0-3]\.v": 5}


def make(config, model_cls=Net, seed: int = 0, dtype: torch.dtype | None = None):
    """(peft model, float64 base weights) with random adapter factors."""
    torch.manual_seed(seed)
    model = model_cls()
    base = {k: v.detach().clone().double() for k, v in model.state_dict().items()}
    peft_model = get_peft_model(model, config)
    if dtype is not None:  # round the factors as a cast save would, keeping the model in float32
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "hada_" in name or "lokr_" in name:
                    param.copy_(param.to(dtype).float())
    return peft_model, base


def peft_layers(peft_model) -> dict[str, LycorisLayer]:
    return {
        name.removeprefix("base_model.model."): module
        for name, module in peft_model.named_modules()
        if isinstance(module, LycorisLayer)
    }


def reference(peft_model, base) -> dict[str, torch.Tensor]:
    """PEFT's merged − base weight of every adapted layer, float64, as the (out, in·∏k) matrix."""
    merged = copy.deepcopy(peft_model).double().merge_and_unload().state_dict()
    out = {}
    for name in peft_layers(peft_model):
        delta = merged[f"{name}.weight"] - base[f"{name}.weight"]
        out[name] = delta.reshape(delta.shape[0], -1)
    return out


def analyse(path, **kwargs) -> dict:
    return {record.name: record for record in rankscope.analyze(rankscope.load(path, **kwargs))}


def assert_exact(record, delta: torch.Tensor, rank_bound: int, *, full_rank: bool = True) -> None:
    """σ of the record against svdvals of PEFT's ΔW: the top rank_bound relative to σ_i, the rest ≈ 0."""
    assert record.valid, record.error
    expected = torch.linalg.svdvals(delta)
    got = torch.tensor(record.singular_values, dtype=torch.float64)
    assert record.rank_bound == rank_bound
    assert got.shape[0] >= rank_bound
    if full_rank:
        assert expected[rank_bound - 1] > 1e-3 * expected[0], "test setup: random factors must reach the bound"
    rel = ((got[:rank_bound] - expected[:rank_bound]).abs() / expected[:rank_bound]).max().item()
    assert rel <= EXACT_TOL, f"{record.name}: relative error {rel:.2e}\n got {got}\n ref {expected}"
    for tail in (expected[rank_bound:], got[rank_bound:]):
        assert tail.numel() == 0 or tail.max().item() <= TAIL_TOL * expected[0].item(), f"{record.name}: rank > bound"
    assert record.exact is True


def stored_params(directory, name: str) -> int:
    tensors = load_file(str(directory / "adapter_model.safetensors"))
    prefix = f"base_model.model.{name}."
    return sum(t.numel() for k, t in tensors.items() if k.startswith(prefix))


# -- LoHa --------------------------------------------------------------------------------------------------------


def test_loha_linear_and_flattened_convs(tmp_path):
    """r=3: r² = 9 < min(m, n) on the factored layers, reached by random factors; lin (12×16) has 9 < 12."""
    targets = ["lin", "wide", "c3", "c1x1", "c1d"]
    peft_model, base = make(LoHaConfig(r=3, alpha=5, target_modules=targets, init_weights=False))
    peft_model.save_pretrained(tmp_path)
    deltas = reference(peft_model, base)
    records = analyse(tmp_path)
    assert set(records) == set(targets)
    layers = peft_layers(peft_model)
    for name, delta in deltas.items():
        record = records[name]
        assert record.family == "loha"
        assert record.scale == pytest.approx(layers[name].scaling["default"], rel=1e-12) == 5 / 3
        assert record.params == stored_params(tmp_path, name)
        assert record.matrix_shape == list(delta.shape)
        bound = min(9, *delta.shape)
        assert_exact(record, delta, bound)
    # flattened forms show no kernel: the analysed matrix is reported as it is stored
    assert records["lin"].kind == "matrix" and records["lin"].shape == [12, 16]
    assert records["c3"].shape == [12, 144]


def test_loha_flattened_conv_shape_from_base(tmp_path):
    """The flattened form hides the kernel; --base gives the stored shape (and kind) back."""
    peft_model, base = make(LoHaConfig(r=3, alpha=5, target_modules=["lin", "c3"], init_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    save_file({k: v.float().contiguous() for k, v in base.items()}, str(tmp_path / "base.safetensors"))
    deltas = reference(peft_model, base)
    records = analyse(tmp_path / "adapter", base=tmp_path / "base.safetensors")
    assert (records["c3"].kind, records["c3"].shape) == ("conv2d", [12, 16, 3, 3])
    assert (records["lin"].kind, records["lin"].shape) == ("linear", [12, 16])
    assert_exact(records["c3"], deltas["c3"], 9)


def test_loha_rank_r_squared_beyond_min_dim_is_dense_and_exact(tmp_path):
    """r=4 on a 12×16 Linear: r² = 16 ≥ 12, so ΔW is materialised (float64) and has full rank 12."""
    peft_model, base = make(LoHaConfig(r=4, alpha=8, target_modules=["lin", "wide"], init_weights=False))
    peft_model.save_pretrained(tmp_path)
    deltas = reference(peft_model, base)
    checkpoint = rankscope.load(tmp_path)
    updates = {layer.name: layer.update for layer in checkpoint.layers}
    assert isinstance(updates["lin"], rankscope.DenseUpdate)
    assert isinstance(updates["wide"], rankscope.FactoredUpdate) and updates["wide"].inner_dim == 16
    records = {record.name: record for record in rankscope.analyze(checkpoint)}
    assert_exact(records["lin"], deltas["lin"], 12)
    assert_exact(records["wide"], deltas["wide"], 16)  # 48×64 stays factored at r² = 16
    assert records["lin"].scale == 2.0


def test_loha_effective_conv2d(tmp_path):
    """use_effective_conv2d: hada_t1/t2 (r, r, 3, 3), w_a (r, out), w_b (r, in); 1×1 and Linear stay flat."""
    targets = ["lin", "c3", "c1x1"]
    config = LoHaConfig(r=3, alpha=6, target_modules=targets, init_weights=False, use_effective_conv2d=True)
    peft_model, base = make(config)
    peft_model.save_pretrained(tmp_path)
    keys = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert keys["base_model.model.c3.hada_t1"].shape == (3, 3, 3, 3)
    assert keys["base_model.model.c3.hada_w1_a"].shape == (3, 12)
    deltas = reference(peft_model, base)
    records = analyse(tmp_path)
    for name in targets:
        assert_exact(records[name], deltas[name], min(9, *deltas[name].shape))
        assert records[name].params == stored_params(tmp_path, name)
    assert records["c3"].kind == "conv2d" and records["c3"].shape == [12, 16, 3, 3]
    assert records["c3"].matrix_shape == [12, 144]


def test_loha_rank_and_alpha_patterns(tmp_path):
    config = LoHaConfig(
        r=4,
        alpha=8,
        target_modules=["q", "v"],
        rank_pattern=RANK_PATTERN,
        alpha_pattern=ALPHA_PATTERN,
        init_weights=False,
    )
    peft_model, base = make(config, Stack)
    peft_model.save_pretrained(tmp_path)
    deltas = reference(peft_model, base)
    records = analyse(tmp_path)
    for name, layer in peft_layers(peft_model).items():
        r, scaling = layer.r["default"], layer.scaling["default"]
        # the patterns, worked out by hand: q → 2 in layers 1, 10, 11, else 3; v → 4; α of v: 32, 5, 5, 5, 8…
        index, kind = int(name.split(".")[1]), name.rsplit(".", 1)[1]
        assert r == ((2 if index in (1, 10, 11) else 3) if kind == "q" else 4)
        alpha = 8 if kind == "q" or index > 3 else (32 if index == 0 else 5)
        assert scaling == pytest.approx(alpha / r)
        assert records[name].scale == pytest.approx(scaling, rel=1e-12)
        assert_exact(records[name], deltas[name], min(r * r, 24))


def test_loha_bf16_factors(tmp_path):
    """bf16 factors: the Khatri–Rao products are exact in float32, the spectrum exact in float64."""
    peft_model, base = make(
        LoHaConfig(r=3, alpha=4, target_modules=["wide", "c3"], init_weights=False), dtype=torch.bfloat16
    )
    peft_model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(str(path)).items()}, str(path))
    deltas = reference(peft_model, base)
    records = analyse(tmp_path)
    for name in ("wide", "c3"):
        assert_exact(records[name], deltas[name], 9)


def test_loha_without_config_assumes_scale_one_unless_alpha(tmp_path):
    peft_model, base = make(LoHaConfig(r=3, alpha=6, target_modules=["wide"], init_weights=False))
    peft_model.save_pretrained(tmp_path)
    (tmp_path / "adapter_config.json").unlink()
    delta = reference(peft_model, base)["wide"]
    checkpoint = rankscope.load(tmp_path)
    assert checkpoint.family == "loha"
    assert any("α is unknown" in w for w in checkpoint.warnings)
    record = {r.name: r for r in rankscope.analyze(checkpoint)}["wide"]
    assert record.scale == 1.0
    assert_exact(record, delta / 2.0, 9)
    record = analyse(tmp_path, alpha=6.0)["wide"]
    assert record.scale == 2.0
    assert_exact(record, delta, 9)


def test_loha_bad_input_is_an_invalid_layer(tmp_path):
    peft_model, _ = make(LoHaConfig(r=3, alpha=6, target_modules=["lin", "wide", "c3"], init_weights=False))
    peft_model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(str(path))
    del tensors["base_model.model.lin.hada_w2_b"]
    tensors["base_model.model.wide.hada_w1_a"][0, 0] = float("nan")
    tensors["base_model.model.c3.hada_w2_a"] = torch.randn(12, 2)  # r=2 against hada_w2_b's 3 rows
    save_file(tensors, str(path))
    records = analyse(tmp_path)
    assert records["lin"].error == "base_model.model.lin.hada_w1_a: has no matching base_model.model.lin.hada_w2_b"
    assert records["wide"].error == "base_model.model.wide.hada_w1_a: 1 NaN and 0 Inf values"
    assert records["c3"].error.startswith("base_model.model.c3.hada_w2_b: rank mismatch")
    assert not any(r.valid for r in records.values())


def test_loha_config_rank_mismatch(tmp_path):
    peft_model, _ = make(LoHaConfig(r=3, alpha=6, target_modules=["wide"], init_weights=False))
    peft_model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["r"] = 5
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    record = analyse(tmp_path)["wide"]
    assert record.error == (
        "base_model.model.wide.hada_w1_b: the config gives r=5 for this layer but the factors have r=3"
    )


# -- LoKr --------------------------------------------------------------------------------------------------------


def lokr_rank_bound(layer, shape: tuple[int, ...]) -> int:
    """rank(W1)·rank(W2) bound from PEFT's own module: a full factor's min dimension, a decomposed one's r."""

    def bound(full) -> int:
        if "default" in full:
            w = full["default"]
            return min(w.shape[0], w[0].numel())
        return layer.r["default"]

    return min(bound(layer.lokr_w1) * bound(layer.lokr_w2), *shape)


def test_lokr_full_factors_scale_alpha_over_config_r(tmp_path):
    """Small dims: PEFT stores both factors in full, and still scales by α/r with r from the config."""
    targets = ["lin", "c3", "c1x1", "c1d"]
    peft_model, base = make(LoKrConfig(r=8, alpha=2, target_modules=targets, init_weights=False))
    peft_model.save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert not any(k.endswith(("_a", "_b")) for k in tensors)
    deltas = reference(peft_model, base)
    records = analyse(tmp_path)
    for name, layer in peft_layers(peft_model).items():
        record = records[name]
        assert record.family == "lokr"
        assert record.scale == pytest.approx(layer.scaling["default"], rel=1e-12) == 0.25
        assert record.params == stored_params(tmp_path, name)
        assert_exact(record, deltas[name], lokr_rank_bound(layer, tuple(deltas[name].shape)))
    # lin: W1 (3, 4) ⊗ W2 (4, 4) → rank 3·4 = 12
    assert records["lin"].rank_bound == 12
    assert records["c3"].kind == "conv2d" and records["c3"].shape == [12, 16, 3, 3]
    assert records["c1d"].kind == "conv1d" and records["c1d"].shape == [6, 4, 3]


def test_lokr_decompose_both(tmp_path):
    """wide (48×64): W1 = w1_a·w1_b (6×8 at r=1) and W2 = w2_a·w2_b (8×8 at r=1): rank 1."""
    targets = ["wide", "c3"]
    config = LoKrConfig(r=1, alpha=3, target_modules=targets, init_weights=False, decompose_both=True)
    peft_model, base = make(config)
    peft_model.save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.wide.lokr_w1_a" in tensors and "base_model.model.wide.lokr_w2_a" in tensors
    deltas = reference(peft_model, base)
    records = analyse(tmp_path)
    assert_exact(records["wide"], deltas["wide"], 1)
    assert records["wide"].scale == 3.0
    # c3: W1 = w1_a (3, 1)·w1_b (1, 4), W2 = w2_a (4, 1)·w2_b (1, 36): rank 1
    assert "base_model.model.c3.lokr_w1_a" in tensors and "base_model.model.c3.lokr_w2_a" in tensors
    layer = peft_layers(peft_model)["c3"]
    assert_exact(records["c3"], deltas["c3"], lokr_rank_bound(layer, tuple(deltas["c3"].shape)))


def test_lokr_factored_second_and_rank_pattern(tmp_path):
    """wide at r=2: W1 (6, 8) full, W2 = w2_a (8, 2)·w2_b (2, 8) → rank 6·2 = 12; rank/alpha patterns."""
    config = LoKrConfig(
        r=2,
        alpha=4,
        target_modules=["wide", "lin"],
        rank_pattern={"lin": 1},
        alpha_pattern={"wide": 10},
        init_weights=False,
    )
    peft_model, base = make(config)
    peft_model.save_pretrained(tmp_path)
    deltas = reference(peft_model, base)
    records = analyse(tmp_path)
    assert_exact(records["wide"], deltas["wide"], 12)
    assert records["wide"].scale == 5.0
    layer = peft_layers(peft_model)["lin"]
    assert records["lin"].scale == pytest.approx(layer.scaling["default"]) == 4.0
    assert_exact(records["lin"], deltas["lin"], lokr_rank_bound(layer, (12, 16)))


def test_lokr_effective_conv2d_tucker(tmp_path):
    """c3 (12, 16, 3, 3) at r=1: W1 (3, 4) full, W2 from lokr_t2 (1, 1, 3, 3), w2_a (1, 4), w2_b (1, 4)."""
    config = LoKrConfig(r=1, alpha=2, target_modules=["c3"], init_weights=False, use_effective_conv2d=True)
    peft_model, base = make(config)
    peft_model.save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert tensors["base_model.model.c3.lokr_t2"].shape == (1, 1, 3, 3)
    deltas = reference(peft_model, base)
    record = analyse(tmp_path)["c3"]
    assert_exact(record, deltas["c3"], 3)
    assert record.kind == "conv2d" and record.shape == [12, 16, 3, 3] and record.scale == 2.0


def test_lokr_conv1d_full_factor_follows_peft_layout(tmp_path):
    """PEFT's Conv1d LoKr with W2 (b, d, k) in full pairs indices its own way: the materialised ΔW is PEFT's."""
    peft_model, base = make(LoKrConfig(r=8, alpha=8, target_modules=["c1d"], init_weights=False))
    peft_model.save_pretrained(tmp_path)
    delta = reference(peft_model, base)["c1d"]
    update = rankscope.load(tmp_path).layers[0].update
    assert torch.allclose(update.materialize(), delta, rtol=0, atol=1e-12)


def test_lokr_without_config_and_bad_input(tmp_path):
    peft_model, _ = make(LoKrConfig(r=8, alpha=2, target_modules=["lin", "c3"], init_weights=False))
    peft_model.save_pretrained(tmp_path)
    (tmp_path / "adapter_config.json").unlink()
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(str(path))
    tensors["base_model.model.c3.lokr_w1_a"] = torch.randn(3, 1)  # w1 both in full and decomposed
    save_file(tensors, str(path))
    checkpoint = rankscope.load(tmp_path, alpha=4.0)
    layers = {layer.name: layer for layer in checkpoint.layers}
    assert layers["lin"].scale == 1.0  # r is not stored for full factors
    assert any("scale 1 is assumed" in w for w in checkpoint.warnings)
    assert layers["c3"].error == ("base_model.model.c3.lokr_w1: stored both in full and as lokr_w1_a·lokr_w1_b")


def test_cli_json(tmp_path):
    peft_model, base = make(LoKrConfig(r=1, alpha=3, target_modules=["wide"], init_weights=False, decompose_both=True))
    peft_model.save_pretrained(tmp_path)
    result = CliRunner().invoke(main, ["spectrum", str(tmp_path), "--json", "-", "-q"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["checkpoint"]["family"] == "lokr"
    assert document["checkpoint"]["adapter_type"] == "LOKR"
    (layer,) = document["layers"]
    assert layer["name"] == "wide" and layer["rank_bound"] == 1 and layer["exact"] is True
    expected = torch.linalg.svdvals(reference(peft_model, base)["wide"])[0].item()
    assert math.isclose(layer["singular_values"][0], expected, rel_tol=1e-9)


class Stem(nn.Module):
    """An RGB stem: 3 input channels factor as 3 × 1, so PEFT's LoKr W1 has a single column."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 7, padding=3)


def test_lokr_single_column_factor_with_base_measures(tmp_path):
    """W1 (2, 1): its singular-vector basis is one column, whose stride .contiguous() keeps; the base measures
    (U ⊗ U of the Kronecker factors) once crashed the whole analysis on it (internal error, exit 1)."""
    peft_model, base = make(LoKrConfig(r=2, target_modules=["stem"], init_weights=False), model_cls=Stem)
    peft_model.save_pretrained(tmp_path / "adapter")
    tensors = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert tensors["base_model.model.stem.lokr_w1"].shape == (2, 1)
    save_file({k: v.float().contiguous() for k, v in base.items()}, str(tmp_path / "base.safetensors"))
    delta = reference(peft_model, base)["stem"]
    record = analyse(tmp_path / "adapter", base=tmp_path / "base.safetensors")["stem"]
    assert_exact(record, delta, lokr_rank_bound(peft_layers(peft_model)["stem"], tuple(delta.shape)))
    assert record.base is not None and record.base["relative_update"] == pytest.approx(
        float(delta.norm() / base["stem.weight"].reshape(8, -1).norm()), rel=1e-9
    )
    # the amplification from the Kronecker bases, against a dense SVD of PEFT's ΔW (k = its rank: one subspace)
    k = record.base["amplification_k"]
    assert k == torch.linalg.matrix_rank(delta)
    u, _, vh = torch.linalg.svd(delta)
    w0 = base["stem.weight"].reshape(8, -1)
    expected = float(delta.norm() / torch.linalg.matrix_norm(u[:, :k].mT @ w0 @ vh[:k].mT))
    assert record.base["amplification"] == pytest.approx(expected, rel=1e-9)
    out = tmp_path / "compare.json"
    result = CliRunner().invoke(main, ["compare", str(tmp_path / "adapter"), str(tmp_path / "adapter"),
                                       "--base", str(tmp_path / "base.safetensors"), "--json", str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
