"""kohya-ss / LyCORIS files against reference modules written here from the published forward passes.

Each reference module holds its own parameters, saves them in kohya's layout (``<name>.lora_down.weight`` …,
``<name>.alpha``) with ``safetensors.torch.save_file``, and gives ΔW by running its forward on the identity
(Linear) or on one-hot inputs (conv: an input of one kernel's size with a single 1 at (c, i, j) yields the
output W[:, c, i, j]) — nothing from rankscope. rankscope's singular values are compared with
``torch.linalg.svdvals`` of that ΔW in float64.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from safetensors.torch import save_file
from torch import nn

import rankscope
from rankscope.cli import main

EXACT_TOL = 1e-6
TAIL_TOL = 1e-9


# -- reference modules ---------------------------------------------------------------------------------------------


def delta_of(module: nn.Module, in_features: int, kernel: tuple[int, ...]) -> torch.Tensor:
    """ΔW (out, in·∏k) of a module whose forward adds ΔW·x: on the identity, or on one-hot conv inputs.

    Run in float64 on a copy: the float32 parameters (as saved) convert exactly."""
    module = copy.deepcopy(module).double()
    with torch.no_grad():
        if not kernel:
            return module(torch.eye(in_features, dtype=torch.float64)).T
        n = in_features * math.prod(kernel)
        inputs = torch.eye(n, dtype=torch.float64).reshape(n, in_features, *kernel)
        return module(inputs).reshape(n, -1).T


class KohyaLoRA(nn.Module):
    """kohya's LoRAModule: x ↦ up(down(x))·α/r; for a conv, down has the kernel and up is 1×1."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, kernel: tuple[int, ...] = ()):
        super().__init__()
        if kernel:
            self.lora_down = nn.Conv2d(in_features, rank, kernel, bias=False)
            self.lora_up = nn.Conv2d(rank, out_features, 1, bias=False)
        else:
            self.lora_down = nn.Linear(in_features, rank, bias=False)
            self.lora_up = nn.Linear(rank, out_features, bias=False)
        self.alpha, self.rank = alpha, rank

    def forward(self, x):
        return self.lora_up(self.lora_down(x)) * (self.alpha / self.rank)


class LoConTucker(nn.Module):
    """LyCORIS LoCon with a Tucker core: 1×1 down, k×k mid, 1×1 up, x ↦ up(mid(down(x)))·α/r."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, kernel: tuple[int, int]):
        super().__init__()
        self.lora_down = nn.Conv2d(in_features, rank, 1, bias=False)
        self.lora_mid = nn.Conv2d(rank, rank, kernel, bias=False)
        self.lora_up = nn.Conv2d(rank, out_features, 1, bias=False)
        self.alpha, self.rank = alpha, rank

    def forward(self, x):
        return self.lora_up(self.lora_mid(self.lora_down(x))) * (self.alpha / self.rank)


def apply_weight(weight: torch.Tensor, x: torch.Tensor, kernel: tuple[int, ...]) -> torch.Tensor:
    return F.conv2d(x, weight) if kernel else F.linear(x, weight)


class LyCorisLoHa(nn.Module):
    """LyCORIS LoHa: W = (w1a·w1b) ⊙ (w2a·w2b)·α/r, or with Tucker cores
    W_i = einsum("i j k l, j r, i p -> p r k l", t_i, w_ib, w_ia); then conv/linear with W."""

    def __init__(self, in_features, out_features, rank, alpha, kernel=(), tucker=False):
        super().__init__()
        self.kernel, self.tucker, self.scale = kernel, tucker, alpha / rank
        self.shape = (out_features, in_features, *kernel)
        if tucker:
            for i in (1, 2):
                self.register_parameter(f"hada_t{i}", nn.Parameter(torch.randn(rank, rank, *kernel) * 0.5))
                self.register_parameter(f"hada_w{i}_a", nn.Parameter(torch.randn(rank, out_features)))
                self.register_parameter(f"hada_w{i}_b", nn.Parameter(torch.randn(rank, in_features)))
        else:
            width = in_features * math.prod(kernel)
            for i in (1, 2):
                self.register_parameter(f"hada_w{i}_a", nn.Parameter(torch.randn(out_features, rank)))
                self.register_parameter(f"hada_w{i}_b", nn.Parameter(torch.randn(rank, width)))

    def weight(self):
        if self.tucker:
            w1 = torch.einsum("i j k l, j r, i p -> p r k l", self.hada_t1, self.hada_w1_b, self.hada_w1_a)
            w2 = torch.einsum("i j k l, j r, i p -> p r k l", self.hada_t2, self.hada_w2_b, self.hada_w2_a)
        else:
            w1, w2 = self.hada_w1_a @ self.hada_w1_b, self.hada_w2_a @ self.hada_w2_b
        return (w1 * w2 * self.scale).reshape(self.shape)

    def forward(self, x):
        return apply_weight(self.weight(), x, self.kernel)


class LyCorisLoKr(nn.Module):
    """LyCORIS LoKr: W = kron(w1, w2)·s, w1 = lokr_w1 or w1_a·w1_b, w2 = lokr_w2, w2_a·w2_b or
    einsum("i j k l, i p, j r -> p r k l", t2, w2_a, w2_b); s = α/r, but 1 when both factors are full."""

    def __init__(self, a, b, c, d, rank, alpha, kernel=(), w1="full", w2="full"):
        super().__init__()
        self.kernel, self.shape = kernel, (a * b, c * d, *kernel)
        self.parts = (w1, w2)
        randn = lambda *shape: nn.Parameter(torch.randn(*shape))  # noqa: E731
        if w1 == "full":
            self.lokr_w1 = randn(a, c)
        else:
            self.lokr_w1_a, self.lokr_w1_b = randn(a, rank), randn(rank, c)
        if w2 == "full":
            self.lokr_w2 = randn(b, d, *kernel)
        elif w2 == "tucker":
            self.lokr_t2, self.lokr_w2_a, self.lokr_w2_b = randn(rank, rank, *kernel), randn(rank, b), randn(rank, d)
        else:
            self.lokr_w2_a, self.lokr_w2_b = randn(b, rank), randn(rank, d * math.prod(kernel))
        self.scale = 1.0 if (w1, w2) == ("full", "full") else alpha / rank

    def weight(self):
        w1 = self.lokr_w1 if self.parts[0] == "full" else self.lokr_w1_a @ self.lokr_w1_b
        if self.parts[1] == "full":
            w2 = self.lokr_w2
        elif self.parts[1] == "tucker":
            w2 = torch.einsum("i j k l, i p, j r -> p r k l", self.lokr_t2, self.lokr_w2_a, self.lokr_w2_b)
        else:
            w2 = (self.lokr_w2_a @ self.lokr_w2_b).reshape(self.shape[0] // w1.shape[0], -1, *self.kernel)
        for _ in range(w2.dim() - w1.dim()):
            w1 = w1.unsqueeze(-1)
        return (torch.kron(w1, w2.contiguous()) * self.scale).reshape(self.shape)

    def forward(self, x):
        return apply_weight(self.weight(), x, self.kernel)


def kohya_tensors(name: str, module: nn.Module, alpha: float | None) -> dict[str, torch.Tensor]:
    """The module's parameters under kohya's keys (``<name>.lora_down.weight``, ``<name>.hada_w1_a`` …)."""
    tensors = {f"{name}.{key}": value.detach().clone() for key, value in module.state_dict().items()}
    if alpha is not None:
        tensors[f"{name}.alpha"] = torch.tensor(float(alpha))
    return tensors


def params_of(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def write(path, modules: dict[str, tuple[nn.Module, float | None]], metadata: dict | None = None, extra=None):
    tensors = {}
    for name, (module, alpha) in modules.items():
        tensors.update(kohya_tensors(name, module, alpha))
    tensors.update(extra or {})
    save_file(tensors, str(path), metadata=metadata)
    return path


def records_of(path, **kwargs) -> dict:
    return {record.name: record for record in rankscope.analyze(rankscope.load(path, **kwargs))}


def assert_exact(record, delta: torch.Tensor, rank_bound: int) -> None:
    assert record.valid, record.error
    expected = torch.linalg.svdvals(delta)
    got = torch.tensor(record.singular_values, dtype=torch.float64)
    assert record.rank_bound == rank_bound
    assert record.matrix_shape == list(delta.shape)
    assert expected[rank_bound - 1] > 1e-3 * expected[0], "test setup: random factors must reach the bound"
    rel = ((got[:rank_bound] - expected[:rank_bound]).abs() / expected[:rank_bound]).max().item()
    assert rel <= EXACT_TOL, f"{record.name}: relative error {rel:.2e}\n got {got}\n ref {expected}"
    for tail in (expected[rank_bound:], got[rank_bound:]):
        assert tail.numel() == 0 or tail.max().item() <= TAIL_TOL * expected[0].item()
    assert record.exact is True


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


UNET_LINEAR = "lora_unet_down_blocks_0_attentions_0_proj_in"
UNET_CONV = "lora_unet_down_blocks_0_resnets_0_conv1"
TE_Q = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"


# -- LoRA / LoCon ------------------------------------------------------------------------------------------------


def test_kohya_lora_linear_and_conv(tmp_path):
    modules = {
        UNET_LINEAR: (KohyaLoRA(20, 16, 4, alpha=2.0), 2.0),
        UNET_CONV: (KohyaLoRA(6, 8, 3, alpha=1.0, kernel=(3, 3)), 1.0),
        TE_Q: (KohyaLoRA(12, 12, 5, alpha=10.0), 10.0),
    }
    path = write(tmp_path / "lora.safetensors", modules)
    checkpoint = rankscope.load(path)
    assert (checkpoint.family, checkpoint.adapter_type) == ("kohya", "KOHYA_LORA")
    assert checkpoint.skipped == [] and checkpoint.warnings == []
    records = {record.name: record for record in rankscope.analyze(checkpoint)}
    assert set(records) == set(modules)  # names stay as stored
    for name, (module, alpha) in modules.items():
        kernel = (3, 3) if name == UNET_CONV else ()
        in_features = 6 if kernel else module.lora_down.in_features
        assert_exact(records[name], delta_of(module, in_features, kernel), module.rank)
        assert records[name].scale == alpha / module.rank
        assert records[name].params == params_of(module)
        assert records[name].family == "lora"
    assert records[UNET_CONV].kind == "conv2d" and records[UNET_CONV].shape == [8, 6, 3, 3]
    assert records[UNET_LINEAR].kind == "linear" and records[UNET_LINEAR].shape == [16, 20]


def test_locon_tucker_mid(tmp_path):
    module = LoConTucker(6, 10, 3, alpha=6.0, kernel=(3, 3))
    path = write(tmp_path / "locon.safetensors", {UNET_CONV: (module, 6.0)})
    checkpoint = rankscope.load(path)
    assert checkpoint.adapter_type == "LYCORIS"
    (record,) = rankscope.analyze(checkpoint)
    assert_exact(record, delta_of(module, 6, (3, 3)), 3)
    assert (record.family, record.kind, record.shape, record.scale) == ("locon", "conv2d", [10, 6, 3, 3], 2.0)
    assert record.params == params_of(module)


def test_alpha_missing_from_metadata_or_scale_one(tmp_path):
    linear, conv = KohyaLoRA(20, 16, 4, alpha=1.0), KohyaLoRA(6, 8, 4, alpha=1.0, kernel=(3, 3))
    delta_linear, delta_conv = delta_of(linear, 20, ()), delta_of(conv, 6, (3, 3))  # both at α/r = 1/4
    modules = {UNET_LINEAR: (linear, None), UNET_CONV: (conv, None)}

    bare = rankscope.load(write(tmp_path / "bare.safetensors", modules))
    records = {record.name: record for record in rankscope.analyze(bare)}
    assert records[UNET_LINEAR].scale == 1.0 and records[UNET_CONV].scale == 1.0
    assert_exact(records[UNET_LINEAR], delta_linear * 4, 4)
    assert any("no alpha tensor and no ss_network_alpha" in w for w in bare.warnings)

    # kohya's, diffusers' and ComfyUI's loaders use α = r where a module has no alpha tensor, whatever the
    # metadata says (reference/real-files.md): scale 1, and a warning naming the metadata's value
    metadata = {"ss_network_alpha": "2.0", "ss_network_dim": "4", "ss_network_args": json.dumps({"conv_alpha": "1"})}
    checkpoint = rankscope.load(write(tmp_path / "meta.safetensors", modules, metadata))
    records = {record.name: record for record in rankscope.analyze(checkpoint)}
    assert records[UNET_LINEAR].scale == 1.0 and records[UNET_CONV].scale == 1.0
    assert_exact(records[UNET_LINEAR], delta_linear * 4, 4)
    assert_exact(records[UNET_CONV], delta_conv * 4, 4)
    (warning,) = [w for w in checkpoint.warnings if "metadata disagrees" in w]
    assert "2 module(s)" in warning and "= 1, 2" in warning

    records = records_of(tmp_path / "bare.safetensors", alpha=1.0)
    assert records[UNET_LINEAR].scale == 0.25


def test_alpha_zero_means_rank_and_rs_lora(tmp_path):
    module = KohyaLoRA(20, 16, 4, alpha=4.0)  # kohya builds α = 0 as α = r
    checkpoint = rankscope.load(write(tmp_path / "zero.safetensors", {UNET_LINEAR: (module, 0.0)}))
    (record,) = rankscope.analyze(checkpoint)
    assert record.scale == 1.0
    assert_exact(record, delta_of(module, 20, ()), 4)
    assert any("alpha = 0" in w for w in checkpoint.warnings)

    metadata = {"ss_network_args": json.dumps({"rs_lora": "True"})}
    # LyCORIS stores α·√r in alpha under rs_lora: the scale is alpha/r either way
    (record,) = records_of(write(tmp_path / "rs.safetensors", {UNET_LINEAR: (module, 8.0)}, metadata)).values()
    assert record.scale == 8.0 / 4


# -- LyCORIS LoHa / LoKr ---------------------------------------------------------------------------------------------


def test_lycoris_loha(tmp_path):
    modules = {
        UNET_LINEAR: (LyCorisLoHa(20, 16, 3, alpha=6.0), 6.0),
        UNET_CONV: (LyCorisLoHa(6, 12, 3, alpha=1.5, kernel=(3, 3)), 1.5),
        "lora_unet_mid_block_resnets_0_conv2": (LyCorisLoHa(6, 12, 2, alpha=4.0, kernel=(3, 3), tucker=True), 4.0),
    }
    path = write(tmp_path / "loha.safetensors", modules)
    checkpoint = rankscope.load(path)
    assert (checkpoint.family, checkpoint.adapter_type) == ("kohya", "LYCORIS")
    records = {record.name: record for record in rankscope.analyze(checkpoint)}
    for name, (module, alpha) in modules.items():
        rank = module.hada_w1_b.shape[0]
        in_features = module.shape[1]
        assert_exact(records[name], delta_of(module, in_features, module.kernel), rank * rank)
        assert records[name].scale == alpha / rank
        assert records[name].params == params_of(module)
        assert records[name].family == "loha"
    assert records["lora_unet_mid_block_resnets_0_conv2"].shape == [12, 6, 3, 3]


@pytest.mark.parametrize(
    ("w1", "w2", "kernel", "rank_bound"),
    [
        ("full", "full", (), 3 * 4),  # W1 (3, 5), W2 (4, 4)
        ("full", "lowrank", (), 3 * 2),
        ("lowrank", "lowrank", (), 2 * 2),
        ("full", "full", (3, 3), 3 * 4),
        ("full", "lowrank", (3, 3), 3 * 2),
        ("full", "tucker", (3, 3), 3 * 2),
    ],
)
def test_lycoris_lokr(tmp_path, w1, w2, kernel, rank_bound):
    """LyCORIS scale: 1 with both factors in full (whatever alpha says), else α/r."""
    module = LyCorisLoKr(3, 4, 5, 4, rank=2, alpha=3.0, kernel=kernel, w1=w1, w2=w2)
    path = write(tmp_path / "lokr.safetensors", {UNET_CONV: (module, 3.0)})
    (record,) = records_of(path).values()
    assert_exact(record, delta_of(module, 20, kernel), rank_bound)
    assert record.scale == (1.0 if (w1, w2) == ("full", "full") else 1.5)
    assert record.params == params_of(module)
    assert record.family == "lokr"
    if kernel and w2 == "lowrank":  # w2_b (r, d·k·k): the stored form does not show the kernel
        assert (record.kind, record.shape) == ("matrix", [12, 180])
    elif kernel:
        assert (record.kind, record.shape) == ("conv2d", [12, 20, 3, 3])


# -- detection and bad input -------------------------------------------------------------------------------------------


def test_detection_tells_peft_loha_from_lycoris(tmp_path):
    """PEFT saves no ``alpha`` tensor and uses dotted module paths; LyCORIS saves ``alpha`` beside kohya names."""
    state = {k: v.detach() for k, v in LyCorisLoHa(8, 8, 2, alpha=2.0).state_dict().items()}
    cases = [
        ({f"base_model.model.lin.{k}": v for k, v in state.items()}, "loha"),
        ({f"lin.{k}": v for k, v in state.items()}, "loha"),
        ({f"lin.{k}": v for k, v in state.items()} | {"lin.alpha": torch.tensor(2.0)}, "kohya"),
        ({f"lora_unet_x.{k}": v for k, v in state.items()}, "kohya"),
    ]
    for i, (tensors, family) in enumerate(cases):
        directory = tmp_path / str(i)
        directory.mkdir()
        save_file(tensors, str(directory / "adapter_model.safetensors"))
        assert rankscope.load(directory).family == family, tensors.keys()


def test_bad_modules_are_invalid_layers(tmp_path):
    good = KohyaLoRA(8, 8, 2, alpha=2.0)
    tensors = kohya_tensors("lora_unet_good", good, 2.0)
    tensors["lora_unet_lonely.lora_up.weight"] = torch.randn(8, 2)
    tensors |= kohya_tensors("lora_unet_mismatch", good, 2.0)
    tensors["lora_unet_mismatch.lora_up.weight"] = torch.randn(8, 3)
    tensors |= kohya_tensors("lora_unet_vector_alpha", good, None)
    tensors["lora_unet_vector_alpha.alpha"] = torch.tensor([2.0, 2.0])
    tensors |= kohya_tensors("lora_unet_nan", good, 2.0)
    tensors["lora_unet_nan.lora_down.weight"] = torch.full((2, 8), float("nan"))
    tensors |= kohya_tensors("lora_unet_nan_alpha", good, float("nan"))
    tensors |= kohya_tensors("lora_unet_dora", good, 2.0)
    tensors["lora_unet_dora.dora_scale"] = torch.ones(8, 1)
    tensors |= kohya_tensors("lora_unet_mixed", good, 2.0)
    tensors["lora_unet_mixed.hada_w1_a"] = torch.randn(8, 2)
    tensors["lora_unet_empty.lora_down.weight"] = torch.zeros(0, 8)
    tensors["lora_unet_empty.lora_up.weight"] = torch.zeros(8, 0)
    tensors["lora_unet_oft.oft_blocks"] = torch.randn(2, 4, 4)
    tensors["lora_unet_oft.alpha"] = torch.tensor(1.0)
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path))
    checkpoint = rankscope.load(path)
    records = {record.name: record for record in rankscope.analyze(checkpoint)}
    assert records["lora_unet_good"].valid
    errors = {name: record.error for name, record in records.items() if not record.valid}
    assert errors == {
        "lora_unet_lonely": "lora_unet_lonely.lora_up.weight: has no matching lora_unet_lonely.lora_down.weight",
        "lora_unet_mismatch": "lora_unet_mismatch.lora_up.weight: rank mismatch: lora_unet_mismatch.lora_down.weight "
        "has r=2 rows but lora_unet_mismatch.lora_up.weight has 3 columns",
        "lora_unet_vector_alpha": "lora_unet_vector_alpha.alpha: alpha must be a scalar, found shape [2]",
        "lora_unet_nan": "lora_unet_nan.lora_down.weight: 16 NaN and 0 Inf values",
        "lora_unet_nan_alpha": "lora_unet_nan_alpha.alpha: alpha is nan",
        "lora_unet_dora": "lora_unet_dora.dora_scale: DoRA (weight_decompose) rescales W0 + ΔW by the base weight's "
        "norms, so it needs the base weight: pass --base BASE (the base model the adapter was trained on), or "
        "--directional-only for ΔW alone",
        "lora_unet_empty": "lora_unet_empty.lora_down.weight: rank 0 (an empty factor)",
        "lora_unet_mixed": "lora_unet_mixed.hada_w1_a: its module mixes lora and loha tensors",
    }
    skipped = {item.key: item.reason for item in checkpoint.skipped}
    assert set(skipped) == {"lora_unet_oft.oft_blocks", "lora_unet_oft.alpha"}
    assert set(skipped.values()) == {
        "a LyCORIS diag-OFT module (oft_blocks): ΔW = (Rᵀ − I)·W0 rotates the base weight; pass --base BASE "
        "(the base model the adapter was trained on)"
    }


def test_cli(tmp_path):
    module = KohyaLoRA(20, 16, 4, alpha=2.0)
    path = write(tmp_path / "lora.safetensors", {UNET_LINEAR: (module, 2.0)})
    result = CliRunner().invoke(main, ["spectrum", str(path), "--json", "-", "-q"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["checkpoint"]["family"] == "kohya"
    (layer,) = document["layers"]
    assert layer["name"] == UNET_LINEAR and layer["scale"] == 0.5 and layer["rank_bound"] == 4
    expected = torch.linalg.svdvals(delta_of(module, 20, ()))
    assert torch.allclose(torch.tensor(layer["singular_values"], dtype=torch.float64), expected[:4], rtol=1e-9)

    only_alpha = tmp_path / "alpha.safetensors"
    save_file({"lora_unet_x.alpha": torch.tensor(1.0)}, str(only_alpha))
    result = CliRunner().invoke(main, ["spectrum", str(only_alpha), "--format", "kohya", "-q"])
    assert result.exit_code == 1
    assert "no adapted layers found" in result.output and "Traceback" not in result.output
