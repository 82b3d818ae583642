"""kohya / LyCORIS files written by LyCORIS 4.1 itself, against LyCORIS's own forward in float64.

Each case builds a LyCORIS network on a tiny torch model (Linear with and without bias, a 3×3 and a 1×1 Conv2d),
sets every factor to random non-zero values (LyCORIS inits the up factor to zero), applies it and saves it with
``save_weights``. The reference ΔW of a layer is the layer's forward with the network minus the base layer's
forward, on the identity (Linear) or on unit impulses of one kernel's size (conv: the impulse at (c, i, j) gives
ΔW[:, c, i, j]), both taken at x and at 0 so a bias (and a bias update) cancels — in float64, everything float64.
Not ``get_diff_weight``/``merge_to``: for LoHa/LoKr they apply α/r twice in 4.1 (reference/real-files.md).
rankscope's σ are compared with ``torch.linalg.svdvals`` of that ΔW at 1e-10 relative.
"""

from __future__ import annotations

import copy
import json
import math
import shutil

import pytest
import torch
from click.testing import CliRunner
from lycoris import LycorisNetwork, create_lycoris, create_lycoris_from_weights
from safetensors.torch import save_file
from torch import nn

import rankscope
from rankscope.cli import main

TOL = 1e-10
DIM, ALPHA, CONV_ALPHA = 2, 3.0, 1.5
# under rs_lora LyCORIS stores α·√r in a float32 buffer: α = c·√2 keeps that exact (2c) at r = 2
RS_ALPHA, RS_CONV_ALPHA = 2 * math.sqrt(2), math.sqrt(2)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj_in = nn.Linear(12, 10)
        self.conv = nn.Conv2d(4, 8, 3)
        self.conv_shortcut = nn.Conv2d(8, 6, 1)
        self.proj_out = nn.Linear(10, 16, bias=False)


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block()])


# module path → (input channels, kernel)
LAYERS = {
    "blocks.0.proj_in": (12, ()),
    "blocks.0.conv": (4, (3, 3)),
    "blocks.0.conv_shortcut": (8, (1, 1)),
    "blocks.0.proj_out": (10, ()),
}


def lycoris_name(path: str) -> str:
    return "lycoris_" + path.replace(".", "_")


def submodule(model: nn.Module, path: str) -> nn.Module:
    return model.get_submodule(path)


def probe(layer: nn.Module, in_channels: int, kernel: tuple[int, ...]) -> torch.Tensor:
    """The (out, in·∏k) weight a layer applies, from its forward on the identity / unit impulses, minus f(0)."""
    n = in_channels * math.prod(kernel)
    inputs = torch.eye(n, dtype=torch.float64).reshape(n, in_channels, *kernel)
    with torch.no_grad():
        response = layer(inputs) - layer(torch.zeros_like(inputs[:1]))
    return response.reshape(n, -1).T


def deltas(model: nn.Module, base_model: nn.Module, probed=LAYERS) -> dict[str, torch.Tensor]:
    """ΔW per probed layer: the adapted model's applied weight minus the base model's, by LyCORIS name."""
    return {
        lycoris_name(path): probe(submodule(model, path), c, k) - probe(submodule(base_model, path), c, k)
        for path, (c, k) in LAYERS.items()
        if path in probed
    }


class Built:
    """A LyCORIS network on a fresh Tiny (float64), its file, the base file, and LyCORIS's ΔW per layer."""

    def __init__(self, tmp, name: str, make, *, metadata: dict | None = None, seed: int = 0, probed=LAYERS) -> None:
        torch.manual_seed(seed)
        self.base_model = Tiny().double()
        model = copy.deepcopy(self.base_model)
        network = make(model)
        for module in network.loras:  # the network registers its modules only in apply_to
            module.to(torch.float64)
        network.apply_to()
        with torch.no_grad():
            for key, parameter in network.named_parameters():
                if key.endswith("dora_scale"):  # a magnitude near the base norms, trained a little
                    parameter.mul_(1 + 0.3 * torch.rand_like(parameter))
                else:  # float32 values: LyCORIS's reload builds float32 modules and holds them exactly
                    parameter.copy_((torch.randn_like(parameter) * 0.5).float())
        self.path = tmp / f"{name}.safetensors"
        network.save_weights(str(self.path), torch.float64, metadata)
        self.model, self.network = model, network
        self.base = tmp / f"{name}-base.safetensors"
        save_file({k: v.contiguous() for k, v in self.base_model.state_dict().items()}, str(self.base))
        self.delta = deltas(model, self.base_model, probed)
        with torch.no_grad():
            self.bias_delta = {
                lycoris_name(path): submodule(model, path)(torch.zeros(1, c, *k, dtype=torch.float64)).flatten()
                - submodule(self.base_model, path)(torch.zeros(1, c, *k, dtype=torch.float64)).flatten()
                for path, (c, k) in LAYERS.items()
                if path in probed
            }


@pytest.fixture(autouse=True)
def _preset():
    """create_lycoris's preset lives in LycorisNetwork's class attributes: leave them as found."""
    saved = dict(LycorisNetwork.MODULE_ALGO_MAP), dict(LycorisNetwork.NAME_ALGO_MAP)
    yield
    LycorisNetwork.MODULE_ALGO_MAP, LycorisNetwork.NAME_ALGO_MAP = saved


def lycoris(algo: str, **kwargs):
    return lambda model: create_lycoris(
        model, 1.0, linear_dim=DIM, linear_alpha=ALPHA, conv_dim=DIM, conv_alpha=CONV_ALPHA, algo=algo, **kwargs
    )


def reloaded_delta(built: Built) -> dict[str, torch.Tensor]:
    """ΔW per layer as LyCORIS's own reload of the file applies it (``create_lycoris_from_weights``), in float64."""
    model = copy.deepcopy(built.base_model)
    network, _ = create_lycoris_from_weights(1.0, str(built.path), model)
    for module in network.loras:
        module.to(torch.float64)
    network.apply_to()
    return deltas(model, built.base_model)


def rs_lora(algo: str, conv_dim: int = DIM, conv_alpha: float = RS_CONV_ALPHA, alpha: float = RS_ALPHA, **kwargs):
    """create_lycoris does not pass rs_lora on; LycorisNetwork hands its keyword arguments to every module."""
    return lambda model: LycorisNetwork(
        model, 1.0, DIM, conv_dim, alpha, conv_alpha, network_module=algo, rs_lora=True, **kwargs
    )


def assert_matches(record, delta: torch.Tensor) -> None:
    """rankscope's σ against the float64 SVD of LyCORIS's ΔW: every σ within the bound at TOL relative, the rest 0."""
    assert record.valid, record.error
    assert record.exact is True
    assert record.matrix_shape == list(delta.shape)
    expected = torch.linalg.svdvals(delta)
    got = torch.tensor(record.singular_values, dtype=torch.float64)
    bound = record.rank_bound
    assert expected[bound - 1] > 1e-6 * expected[0], "test setup: random factors must reach the bound"
    rel = ((got[:bound] - expected[:bound]).abs() / expected[:bound]).max().item()
    assert rel <= TOL, f"{record.name}: relative error {rel:.2e}\n got {got}\n ref {expected}"
    assert expected[bound:].numel() == 0 or expected[bound:].max() <= TOL * expected[0]


def check_all(built: Built, checkpoint, families: dict[str, str] | str) -> dict:
    records = {record.name: record for record in rankscope.analyze(checkpoint)}
    assert set(records) == set(built.delta)
    for name, record in records.items():
        assert_matches(record, built.delta[name])
        family = families if isinstance(families, str) else families[name]
        assert record.family == family, name
    return records


PROJ_IN, CONV, SHORTCUT, PROJ_OUT = (lycoris_name(p) for p in LAYERS)


# -- LoCon / LoHa / LoKr, plain and rs_lora -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("case", "make", "family", "bounds"),
    [
        ("locon", lycoris("locon"), "lora", {CONV: 2, SHORTCUT: 2, PROJ_IN: 2, PROJ_OUT: 2}),
        ("locon-tucker", lycoris("locon", use_tucker=True), "lora", {CONV: 2, PROJ_IN: 2}),
        ("loha", lycoris("loha"), "loha", {CONV: 4, SHORTCUT: 4, PROJ_IN: 4}),
        # default factor: the convs' W2 comes out full (lora_dim ≥ half its size), W1 always is
        ("lokr", lycoris("lokr"), "lokr", {CONV: 2 * 4, SHORTCUT: 2 * 3, PROJ_IN: 2 * 2, PROJ_OUT: 2 * 2}),
        ("lokr-both", lycoris("lokr", decompose_both=True, factor=8), "lokr", {PROJ_OUT: 2 * 2}),
        ("lokr-full", lycoris("lokr", full_matrix=True), "lokr", {PROJ_IN: 2 * 4, PROJ_OUT: 2 * 4}),
        ("locon-rs", rs_lora("locon"), "lora", {PROJ_IN: 2}),
        ("loha-rs", rs_lora("loha"), "loha", {PROJ_IN: 4}),
        # the 3×3 conv at r = 1 (√r = 1): at r = 2 its factors come out full, as the 1×1 conv's do (see below)
        ("lokr-rs", rs_lora("lokr", conv_dim=1, conv_alpha=1.0), "lokr", {PROJ_IN: 2 * 2, PROJ_OUT: 2 * 2}),
    ],
)
def test_factored_algorithms_match_the_lycoris_forward(tmp_path, case, make, family, bounds):
    metadata = {"ss_network_args": json.dumps({"algo": "x", "rs_lora": "True"})} if case.endswith("-rs") else None
    built = Built(tmp_path, case, make, metadata=metadata)
    if case == "lokr-rs":
        # both factors in full at r = 2: the in-memory module applies √r, the reload and ComfyUI 1 (next test)
        built.delta[SHORTCUT] /= math.sqrt(DIM)
    checkpoint = rankscope.load(built.path)
    assert (checkpoint.family, checkpoint.adapter_type) == ("kohya", "LYCORIS")
    assert checkpoint.skipped == [] and checkpoint.not_analysed == []
    families = {name: family for name in built.delta}
    if case == "locon-tucker":
        families[CONV] = "locon"  # the 3×3 conv gets a lora_mid core; a 1×1 cannot
    records = check_all(built, checkpoint, families)
    for name, bound in bounds.items():
        assert records[name].rank_bound == bound, name
    if case.endswith("-rs"):
        assert any("rs_lora" in note for note in checkpoint.notes)
        # LyCORIS's module applies α/√r and stores α·√r: rankscope's scale alpha/r is α/√r
        assert records[PROJ_IN].scale == pytest.approx(RS_ALPHA / math.sqrt(DIM), rel=1e-15)


def test_lokr_both_full_under_rs_lora_follows_the_reload(tmp_path):
    """LoKr with both factors in full: LyCORIS's in-memory module under rs_lora applies √r (α is set to r, over
    √r); its reload (``create_lycoris_from_weights``) and ComfyUI apply 1 — rankscope follows the reload, warns."""
    metadata = {"ss_network_args": json.dumps({"algo": "lokr", "rs_lora": "True"})}
    built = Built(tmp_path, "lokr-full-rs", rs_lora("lokr", full_matrix=True), metadata=metadata)
    reloaded = reloaded_delta(built)
    checkpoint = rankscope.load(built.path)
    records = {record.name: record for record in rankscope.analyze(checkpoint)}
    assert set(records) == set(reloaded)
    for name, record in records.items():
        assert record.scale == 1.0
        assert_matches(record, reloaded[name])
        assert (reloaded[name] * math.sqrt(DIM) - built.delta[name]).norm() <= 1e-12 * built.delta[name].norm()
    assert any("rs_lora" in w and "4 module(s)" in w for w in checkpoint.warnings)


# -- full, DoRA, GLoRA, mixed files ---------------------------------------------------------------------------


def test_full_is_a_dense_update_with_its_bias(tmp_path):
    built = Built(tmp_path, "full", lycoris("full"))
    checkpoint = rankscope.load(built.path)
    assert checkpoint.skipped == []
    records = check_all(built, checkpoint, "full")
    assert records[CONV].kind == "conv2d" and records[CONV].shape == [8, 4, 3, 3]
    assert records[PROJ_IN].kind == "linear" and records[PROJ_IN].rank_bound == 10
    for name, record in records.items():
        bias = built.bias_delta[name]
        if name == PROJ_OUT:
            assert record.bias_update is None
        else:
            assert record.bias_update["norm"] == pytest.approx(float(bias.norm()), rel=1e-12)


@pytest.mark.parametrize("on_output", [True, False])
@pytest.mark.parametrize("algo", ["locon", "loha", "lokr"])
def test_dora_with_base(tmp_path, algo, on_output):
    built = Built(tmp_path, f"dora-{algo}-{on_output}", lycoris(algo, dora_wd=True, wd_on_output=on_output))
    checkpoint = rankscope.load(built.path, base=built.base)
    records = check_all(built, checkpoint, "lora" if algo == "locon" else algo)
    assert records[CONV].shape == [8, 4, 3, 3] and records[CONV].kind == "conv2d"
    assert any("4 DoRA (weight_decompose) module(s)" in note for note in checkpoint.notes)

    without = {record.name: record for record in rankscope.analyze(rankscope.load(built.path))}
    assert all(not record.valid and "pass --base BASE" in record.error for record in without.values())


def test_dora_against_a_pipeline_whose_text_encoder_has_no_weights(tmp_path):
    """A pipeline folder (model_index.json, unet/) whose text_encoder/ holds only its config.json, as a download
    that left the encoder's weights out: LyCORIS names are looked up in every component, and a component folder
    without weights is passed over instead of failing the lookup."""
    pytest.importorskip("transformers")
    from .factories import tiny_clip_config

    built = Built(tmp_path, "dora-pipeline", lycoris("locon", dora_wd=True))
    pipeline = tmp_path / "pipeline"
    (pipeline / "unet").mkdir(parents=True)
    shutil.copy(built.base, pipeline / "unet" / "diffusion_pytorch_model.safetensors")
    tiny_clip_config(8).save_pretrained(pipeline / "text_encoder")
    assert sorted(p.name for p in (pipeline / "text_encoder").iterdir()) == ["config.json"]
    (pipeline / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    records = check_all(built, rankscope.load(built.path, base=pipeline), "lora")
    assert records[CONV].shape == [8, 4, 3, 3] and records[CONV].kind == "conv2d"


def test_dora_directional_only_and_a_wrong_base(tmp_path):
    built = Built(tmp_path, "dora-locon", lycoris("locon", dora_wd=True))
    checkpoint = rankscope.load(built.path, directional_only=True)
    assert any(w.startswith("--directional-only") for w in checkpoint.warnings)
    assert {item.key for item in checkpoint.skipped if item.expected} == {f"{n}.dora_scale" for n in built.delta}
    for module in built.network.loras:  # LyCORIS's own forward without its weight_decompose epilogue
        module.wd = False
    built.delta = deltas(built.model, built.base_model)
    check_all(built, checkpoint, "lora")

    wrong = tmp_path / "wrong-base.safetensors"
    save_file({"blocks.0.proj_in.weight": torch.zeros(10, 13, dtype=torch.float64)}, str(wrong))
    records = {record.name: record for record in rankscope.analyze(rankscope.load(built.path, base=wrong))}
    assert records[PROJ_IN].error == (
        f"{PROJ_IN}.dora_scale: the base weight has shape [10, 13], which does not fit ΔW of shape [10, 12]"
    )
    assert records[CONV].error.startswith(f"{CONV}.dora_scale: DoRA (weight_decompose) rescales W0 + ΔW by the base")
    assert "has none for 'lycoris_blocks_0_conv'" in records[CONV].error


def test_mixed_full_and_locon(tmp_path):
    """Conv2d modules ``full``, Linear modules LoCon, in one file: every layer read."""

    def make(model):
        LycorisNetwork.apply_preset({"module_algo_map": {"Conv2d": {"algo": "full"}}})
        return lycoris("locon")(model)

    built = Built(tmp_path, "mixed", make)
    checkpoint = rankscope.load(built.path)
    assert checkpoint.skipped == [] and checkpoint.not_analysed == []
    check_all(built, checkpoint, {CONV: "full", SHORTCUT: "full", PROJ_IN: "lora", PROJ_OUT: "lora"})


def test_glora_beside_lokr(tmp_path):
    """Linear modules GLoRA (ΔW = s·(W0·a1·a2 + b1·b2): needs --base), Conv2d modules LoKr."""

    def make(model):
        LycorisNetwork.apply_preset({"module_algo_map": {"Linear": {"algo": "glora"}}})
        return lycoris("lokr")(model)

    built = Built(tmp_path, "glora", make)
    checkpoint = rankscope.load(built.path, base=built.base)
    assert checkpoint.skipped == []
    records = check_all(built, checkpoint, {CONV: "lokr", SHORTCUT: "lokr", PROJ_IN: "glora", PROJ_OUT: "glora"})
    assert records[PROJ_IN].rank_bound == 2 * DIM and records[PROJ_IN].scale == ALPHA / DIM

    without = rankscope.load(built.path)
    assert {layer.name for layer in without.layers} == {CONV, SHORTCUT}
    assert [item.module for item in without.not_analysed] == [PROJ_IN, PROJ_OUT]
    reasons = {item.reason for item in without.skipped}
    assert reasons == {"a GLoRA module: ΔW = s·(W0·a1·a2 + b1·b2) involves the base weight W0; pass --base BASE "
                       "(the base model the adapter was trained on)"}  # fmt: skip


def test_glora_alone_without_base_is_refused(tmp_path):
    built = Built(tmp_path, "glora-only", lycoris("glora"), probed=())
    result = CliRunner().invoke(main, ["spectrum", str(built.path), "-q"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "GLoRA modules" in result.output and "pass --base BASE" in result.output


def test_glora_conv_and_rs_lora_follow_the_reload(tmp_path):
    """GLoRA on every layer (convs too) with rs_lora: the module trained at α/√r; LyCORIS's reload
    (``create_lycoris_from_weights``: no rs_lora) applies alpha/r — rankscope follows the reload and warns."""
    metadata = {"ss_network_args": json.dumps({"algo": "glora", "rs_lora": "True"})}
    trained = Built(tmp_path, "glora-rs", rs_lora("glora", alpha=ALPHA, conv_alpha=CONV_ALPHA), metadata=metadata)
    trained.delta = reloaded_delta(trained)
    checkpoint = rankscope.load(trained.path, base=trained.base)
    records = check_all(trained, checkpoint, "glora")
    assert records[CONV].rank_bound == 8 and records[CONV].scale == CONV_ALPHA / DIM  # r + r·9 > 8 rows: dense
    assert records[SHORTCUT].rank_bound == 2 * DIM and records[SHORTCUT].scale == ALPHA / DIM
    assert any("rs_lora: GLoRA" in w for w in checkpoint.warnings)


def test_other_algorithms_are_skipped_by_name(tmp_path):
    """(IA)³ and diag-OFT modules beside a LoCon module: skipped with a reason naming the algorithm."""

    def make(model):
        LycorisNetwork.apply_preset(
            {
                "module_algo_map": {"Conv2d": {"algo": "ia3"}},
                "name_algo_map": {"blocks.0.proj_out": {"algo": "diag-oft"}},
            }
        )
        return lycoris("locon")(model)

    built = Built(tmp_path, "others", make, probed=["blocks.0.proj_in"])  # diag-OFT runs in float32 only
    checkpoint = rankscope.load(built.path)
    (record,) = rankscope.analyze(checkpoint)
    assert_matches(record, built.delta[PROJ_IN])
    reasons = {item.key: item.reason for item in checkpoint.skipped}
    assert set(reasons) == {f"{CONV}.weight", f"{CONV}.on_input", f"{SHORTCUT}.weight", f"{SHORTCUT}.on_input",
                            f"{PROJ_OUT}.oft_blocks", f"{PROJ_OUT}.alpha"}  # fmt: skip
    assert reasons[f"{CONV}.on_input"].startswith("a LyCORIS (IA)³ module")
    assert reasons[f"{PROJ_OUT}.oft_blocks"].startswith("a LyCORIS diag-OFT module")
    assert [item.module for item in checkpoint.not_analysed] == [CONV, SHORTCUT, PROJ_OUT]


def test_tlora_beside_locon_is_listed_and_alone_is_refused_by_name(tmp_path):
    """T-LoRA's update follows the diffusion timestep (a rank mask per step): beside LoCon modules its modules are
    listed as not analysed, saying why, and the LoCon ones match LyCORIS's forward; a file of T-LoRA alone is
    refused in one line naming T-LoRA (it used to be detected as no adapter at all)."""

    def make(model):
        LycorisNetwork.apply_preset({"name_algo_map": {"blocks.0.proj_out": {"algo": "tlora"},
                                                       "blocks.0.conv": {"algo": "tlora"}}})  # fmt: skip
        return lycoris("locon")(model)

    built = Built(tmp_path, "tlora-mixed", make, probed=["blocks.0.proj_in"])  # the name map takes conv_shortcut too
    checkpoint = rankscope.load(built.path)
    check_all(built, checkpoint, "lora")
    assert [item.module for item in checkpoint.not_analysed] == [CONV, SHORTCUT, PROJ_OUT]
    assert all("T-LoRA" in item.reason and "timestep" in item.reason for item in checkpoint.not_analysed)
    alone = Built(tmp_path, "tlora-alone", lycoris("tlora"), probed=())
    result = CliRunner().invoke(main, ["spectrum", str(alone.path), "-q"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    (line,) = result.output.strip().splitlines()
    assert str(alone.path) in line and "T-LoRA modules" in line and "no static ΔW" in line


# -- kohya files without alpha tensors; the CLI ---------------------------------------------------------------


def test_no_alpha_tensor_follows_the_loaders_not_the_metadata(tmp_path):
    """A kohya LoRA without ``.alpha`` tensors but with ``ss_network_alpha`` in its metadata.

    reference/real-files.md: "no `.alpha` → α = r (scale 1) in kohya's, diffusers' and ComfyUI's loaders, even if
    `ss_network_alpha` is in the metadata" (kohya's ``create_network_from_weights`` sets a missing alpha to the
    module's dim). So ΔW = up·down, and a warning names the metadata's value.
    """
    torch.manual_seed(1)
    down, up = torch.randn(4, 20), torch.randn(16, 4)
    name = "lora_unet_down_blocks_0_attentions_0_proj_in"
    path = tmp_path / "kohya.safetensors"
    metadata = {"ss_network_module": "networks.lora", "ss_network_dim": "4", "ss_network_alpha": "1.0"}
    save_file({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up}, str(path), metadata=metadata)
    checkpoint = rankscope.load(path)
    (record,) = rankscope.analyze(checkpoint)
    assert record.scale == 1.0
    assert_matches(record, up.double() @ down.double())
    (warning,) = [w for w in checkpoint.warnings if "metadata disagrees" in w]
    assert "ss_network_alpha = 1" in warning and name in warning


def test_cli_json(tmp_path):
    built = Built(tmp_path, "loha-cli", rs_lora("loha"))
    result = CliRunner().invoke(main, ["spectrum", str(built.path), "--json", "-", "-q"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["checkpoint"]["adapter_type"] == "LYCORIS" and document["skipped"] == []
    for layer in document["layers"]:
        expected = torch.linalg.svdvals(built.delta[layer["name"]])[: layer["rank_bound"]]
        got = torch.tensor(layer["singular_values"], dtype=torch.float64)
        assert ((got - expected).abs() / expected).max() <= TOL, layer["name"]

    built = Built(tmp_path, "dora-cli", lycoris("loha", dora_wd=True))
    result = CliRunner().invoke(main, ["spectrum", str(built.path), "--base", str(built.base), "--json", "-", "-q"])
    assert result.exit_code == 0, result.output
    for layer in json.loads(result.stdout)["layers"]:
        expected = torch.linalg.svdvals(built.delta[layer["name"]])
        got = torch.tensor(layer["singular_values"], dtype=torch.float64)
        assert ((got - expected).abs() / expected).max() <= TOL, layer["name"]
