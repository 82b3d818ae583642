"""LyCORIS (IA)³, Diag-OFT, BOFT and ``train_norm`` files written by LyCORIS 4.1 itself, against its own forward.

As in test_lycoris_reference.py: a LyCORIS network on a tiny torch model, every parameter set to random values
(LyCORIS inits them to the identity update), saved with ``save_weights``; the reference ΔW of a layer is its
forward with the network minus the base layer's, on the identity (Linear) or unit impulses (conv), at x and at 0.
(IA)³ and norm run in float64 (tolerance 1e-10). LyCORIS's Cayley transform calls ``.float().inverse()`` and cannot
run in float64, so Diag-OFT and BOFT are built and probed in float32 and compared at 2e-5 of σ₁ (rankscope computes
in float64 from the same float32 values).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from lycoris import LycorisNetwork, create_lycoris
from safetensors.torch import load_file, save_file
from torch import nn

import rankscope
from rankscope.cli import main

DIM = 4


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj_in = nn.Linear(12, 16)
        self.conv = nn.Conv2d(4, 8, 3)
        self.norm = nn.LayerNorm(16)
        self.gn = nn.GroupNorm(2, 8)
        self.proj_out = nn.Linear(16, 8, bias=False)


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block()])


MATRICES = {"blocks.0.proj_in": (12, ()), "blocks.0.conv": (4, (3, 3)), "blocks.0.proj_out": (16, ())}
NORMS = {"blocks.0.norm": 16, "blocks.0.gn": 8}


def lycoris_name(path: str) -> str:
    return "lycoris_" + path.replace(".", "_")


def probe(layer: nn.Module, channels: int, kernel: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """The (out, in·∏k) weight a layer applies: its forward on the identity / unit impulses, minus f(0)."""
    n = channels * math.prod(kernel)
    inputs = torch.eye(n, dtype=dtype).reshape(n, channels, *kernel)
    with torch.no_grad():
        response = layer(inputs) - layer(torch.zeros_like(inputs[:1]))
    return response.reshape(n, -1).T.double()


class Built:
    """A LyCORIS network on a fresh Tiny in ``dtype``, its file, the base file, LyCORIS's ΔW per matrix layer."""

    def __init__(self, tmp, name: str, make, dtype=torch.float64, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.base_model = Tiny().to(dtype)
        self.model = copy.deepcopy(self.base_model)
        network = make(self.model)
        for module in network.loras:
            module.to(dtype)
        network.apply_to()
        with torch.no_grad():
            for key, parameter in network.named_parameters():
                if key.endswith("rescale"):  # a row scale near 1, trained a little
                    parameter.copy_(1 + 0.3 * torch.rand_like(parameter))
                else:
                    parameter.copy_((torch.randn_like(parameter) * 0.5).float())
        self.path = tmp / f"{name}.safetensors"
        network.save_weights(str(self.path), dtype, None)
        self.base = tmp / f"{name}-base.safetensors"
        save_file({k: v.contiguous() for k, v in self.base_model.state_dict().items()}, str(self.base))
        self.delta = {
            lycoris_name(path): probe(self.model.get_submodule(path), c, k, dtype)
            - probe(self.base_model.get_submodule(path), c, k, dtype)
            for path, (c, k) in MATRICES.items()
        }


# the class attributes LycorisNetwork.apply_preset sets (its presets are class state)
PRESET_ATTRIBUTES = ("ENABLE_CONV", "TARGET_REPLACE_MODULE", "TARGET_REPLACE_NAME", "MODULE_ALGO_MAP", "NAME_ALGO_MAP",
                     "LORA_PREFIX", "USE_FNMATCH", "TARGET_EXCLUDE_NAME")  # fmt: skip


@pytest.fixture(autouse=True)
def _preset():
    """Leave LyCORIS's preset as found, for the other test files."""
    saved = {name: copy.copy(getattr(LycorisNetwork, name)) for name in PRESET_ATTRIBUTES}
    yield
    for name, value in saved.items():
        setattr(LycorisNetwork, name, value)


def network(algo: str, **kwargs):
    """LycorisNetwork passes its keyword arguments to every module (create_lycoris drops constraint, rescaled …)."""
    return lambda model: LycorisNetwork(model, 1.0, DIM, DIM, 1.0, 1.0, network_module=algo, **kwargs)


def check(built: Built, checkpoint, family: str, rtol: float) -> dict:
    records = {record.name: record for record in rankscope.analyze(checkpoint)}
    assert set(records) == set(built.delta)
    for name, record in records.items():
        assert record.valid, record.error
        assert record.family == family and record.exact is True
        delta = built.delta[name]
        assert record.matrix_shape == list(delta.shape)
        expected = torch.linalg.svdvals(delta)
        got = torch.tensor(record.singular_values, dtype=torch.float64)
        assert got.numel() == expected.numel() == min(delta.shape)  # dense: every σ
        error = (got - expected).abs().max().item()
        assert error <= rtol * expected[0], f"{name}: error {error:.2e} of σ₁ {expected[0]:.3g}"
    return records


# -- (IA)³ -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("on_input", [False, True])
def test_ia3_matches_the_lycoris_forward(tmp_path, on_input):
    built = Built(tmp_path, f"ia3-{on_input}", network("ia3", train_on_input=on_input))
    checkpoint = rankscope.load(built.path, base=built.base)
    assert checkpoint.skipped == [] and checkpoint.not_analysed == []
    records = check(built, checkpoint, "ia3", 1e-10)
    assert records[lycoris_name("blocks.0.conv")].kind == "conv2d"
    assert all(record.bias_update is None for record in records.values())  # LyCORIS leaves the bias

    result = CliRunner().invoke(main, ["spectrum", str(built.path), "-q"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "(IA)³ modules" in result.output and "pass --base BASE" in result.output


# -- Diag-OFT and BOFT -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("algo", "kwargs"),
    [
        ("diag-oft", {}),
        ("diag-oft", {"rescaled": True, "constraint": 0.05}),  # the constraint binds: ‖Q‖ > 0.05·out
        ("boft", {}),
        ("boft", {"rescaled": True, "constraint": 0.05}),
    ],
)
def test_oft_matches_the_lycoris_forward(tmp_path, algo, kwargs):
    built = Built(tmp_path, f"{algo}-{len(kwargs)}", network(algo, **kwargs), dtype=torch.float32)
    checkpoint = rankscope.load(built.path, base=built.base)
    assert checkpoint.skipped == [] and checkpoint.not_analysed == []
    check(built, checkpoint, algo, 2e-5)
    if kwargs:  # the constraint binds on every layer (one norm over all blocks): ignoring it would fail above
        stored = load_file(built.path)
        for path in MATRICES:
            blocks = stored[f"{lycoris_name(path)}.oft_blocks"].double()
            out = built.delta[lycoris_name(path)].shape[0]
            assert (blocks - blocks.transpose(-1, -2)).norm() > 2 * kwargs["constraint"] * out


def test_oft_without_base_is_skipped_saying_why(tmp_path):
    def make(model):
        LycorisNetwork.apply_preset({"name_algo_map": {"blocks.0.proj_out": {"algo": "boft"}}})
        return create_lycoris(model, 1.0, linear_dim=DIM, linear_alpha=1.0, conv_dim=DIM, conv_alpha=1.0, algo="lora")

    built = Built(tmp_path, "boft-beside-lora", make, dtype=torch.float32)
    checkpoint = rankscope.load(built.path)
    assert {layer.name for layer in checkpoint.layers} == {
        lycoris_name("blocks.0.proj_in"),
        lycoris_name("blocks.0.conv"),
    }
    reasons = {item.key: item.reason for item in checkpoint.skipped}
    name = lycoris_name("blocks.0.proj_out")
    assert set(reasons) == {f"{name}.oft_blocks", f"{name}.alpha"}
    assert (
        reasons[f"{name}.oft_blocks"].startswith("a LyCORIS BOFT module")
        and "pass --base BASE" in reasons[f"{name}.oft_blocks"]
    )
    assert [item.module for item in checkpoint.not_analysed] == [name]
    with_base = {r.name: r for r in rankscope.analyze(rankscope.load(built.path, base=built.base))}
    assert with_base[name].family == "boft" and with_base[name].valid


# -- train_norm ------------------------------------------------------------------------------------------------


def test_train_norm_is_a_vector_layer_with_its_bias(tmp_path):
    """LyCORIS's norm module adds w_norm·norm(x) + b_norm: Δγ = w_norm, Δβ = b_norm, read off its forward."""
    built = Built(tmp_path, "norm", lambda model: create_lycoris(model, 1.0, DIM, 1.0, algo="lokr", train_norm=True))
    checkpoint = rankscope.load(built.path)  # no --base needed
    records = {record.name: record for record in rankscope.analyze(checkpoint)}
    torch.manual_seed(5)
    for path, width in NORMS.items():
        record = records[lycoris_name(path)]
        assert record.valid and record.kind == "vector" and record.family == "norm"
        x = torch.randn(3, width, 2, 2, dtype=torch.float64) if path.endswith("gn") else torch.randn(3, width).double()
        adapted, base = built.model.get_submodule(path), built.base_model.get_submodule(path)
        with torch.no_grad():
            bias = (adapted(torch.zeros_like(x)) - base(torch.zeros_like(x)))[0].reshape(width, -1)[:, 0]
            change = adapted(x) - base(x) - (bias.reshape(1, width, 1, 1) if x.ndim == 4 else bias)
            normed = F.group_norm(x, 2) if x.ndim == 4 else F.layer_norm(x, (width,))
        gamma = (change / normed).reshape(3, width, -1)[0, :, 0]
        expected = gamma.abs().sort(descending=True).values
        got = torch.tensor(record.singular_values, dtype=torch.float64)
        assert ((got - expected).abs() / expected).max() <= 1e-9, path
        assert record.bias_update["norm"] == pytest.approx(float(bias.norm()), rel=1e-12)
    assert records[lycoris_name("blocks.0.proj_in")].family == "lokr"


# -- DyLoRA ----------------------------------------------------------------------------------------------------


def test_dylora_is_read_as_every_loader_reloads_it(tmp_path):
    """LyCORIS's DyLoRA trains with a random block b per step (ΔW = α/(b+1)·Σ_{i≤b} up_i·down_i); its file holds
    all blocks as lora_up/lora_down with alpha, which LyCORIS's own reload (``create_lycoris_from_weights``) and
    kohya/ComfyUI apply as a LoCon at alpha/r: rankscope reads that, the file's convention."""
    from lycoris import create_lycoris_from_weights

    def make(model):  # on a conv LyCORIS 4.1 saves a 2-D lora_up that its own reload cannot load: Linear only
        LycorisNetwork.apply_preset({"target_module": ["Linear"]})
        return create_lycoris(model, 1.0, DIM, 2.0, algo="dylora", block_size=2)

    built = Built(tmp_path, "dylora", make)
    model = copy.deepcopy(built.base_model)
    network_, _ = create_lycoris_from_weights(1.0, str(built.path), model)
    assert {type(module).__name__ for module in network_.loras} == {"LoConModule"}
    for module in network_.loras:
        module.to(torch.float64)
    network_.apply_to()
    reloaded = {
        lycoris_name(path): probe(model.get_submodule(path), c, k, torch.float64)
        - probe(built.base_model.get_submodule(path), c, k, torch.float64)
        for path, (c, k) in MATRICES.items()
        if not k
    }
    records = {record.name: record for record in rankscope.analyze(rankscope.load(built.path))}
    assert set(records) == set(reloaded) == {lycoris_name("blocks.0.proj_in"), lycoris_name("blocks.0.proj_out")}
    for name, record in records.items():
        assert record.family == "lora" and record.scale == 2.0 / DIM and record.rank_bound == DIM
        expected = torch.linalg.svdvals(reloaded[name])[:DIM]
        got = torch.tensor(record.singular_values, dtype=torch.float64)
        assert ((got - expected).abs() / expected).max() <= 1e-10, name
