"""A new user's image-generation files, each written by the library that writes it, against that library's own
reference in float64: transformer pipelines (Flux, SD3, Wan with a Conv3d patch embedding) through their
``save_lora_weights``, UNet conv LoRAs in bf16/fp16, ``convert_state_dict_to_kohya`` output, LyCORIS networks on a
diffusers UNet + CLIP through ``lycoris.kohya`` (``lora_unet_…``/``lora_te_…`` names, ``--base`` as a pipeline
folder), and the CLI's spectrum/compare/report on such files.

Reference ΔW: diffusers' ``load_lora_weights`` + ``fuse_lora`` on float64 copies of the models (W_fused − W₀); for
LyCORIS the adapted module's forward on the identity / unit impulses (convs with their own stride and padding);
for a text-encoder DoRA, PEFT's merge (diffusers 0.42 with transformers 5.23 drops the text encoder's
``lora_magnitude_vector`` on load, so its fuse is not a reference there). σ from rankscope against
``torch.linalg.svdvals`` of that ΔW, 1e-10 relative (everything float64; the files' float32/bf16 factors are exact
in float64).
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import rankscope
from rankscope.cli import main

pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("lycoris")

from diffusers import (
    DDIMScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    WanPipeline,
    WanTransformer3DModel,
)
from diffusers.utils import convert_all_state_dict_to_peft, convert_state_dict_to_kohya
from lycoris.kohya import LycorisNetworkKohya, create_network
from peft import LoraConfig, get_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from rankscope.figures._common import block_positions

from .factories import assert_matches, quiet_library_warnings, records, tiny_clip, tiny_unet  # noqa: F401 (autouse)

FILE = "pytorch_lora_weights.safetensors"
TE_ATTENTION = ["q_proj", "k_proj", "v_proj", "out_proj"]


# -- helpers ---------------------------------------------------------------------------------------------------


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if k.endswith(".weight")}


def _changed(before: dict, model, prefix: str) -> dict[str, torch.Tensor]:
    out = {}
    for key, weight in _weights(model).items():
        if key in before and not torch.equal(weight, before[key]):
            delta = weight - before[key]
            out[prefix + key.removesuffix(".weight")] = delta.reshape(delta.shape[0], -1)
    return out


def fused(pipeline_class, file, parts: dict, **extra) -> dict[str, torch.Tensor]:
    """ΔW per changed weight (``<component>.<module>``) from the pipeline's own load + fuse, in float64."""
    models = {name: copy.deepcopy(model).double() for name, model in parts.items()}
    before = {name: _weights(model) for name, model in models.items()}
    pipe = pipeline_class(**{**extra, **models})
    pipe.load_lora_weights(str(file))
    pipe.fuse_lora(components=list(models))
    pipe.unload_lora_weights()
    return {k: v for name, model in models.items() for k, v in _changed(before[name], model, f"{name}.").items()}


def peft_merged(model, prefix: str) -> dict[str, torch.Tensor]:
    """ΔW of every LoRA module of ``model`` from PEFT's own merge in float64."""
    model = copy.deepcopy(model).double()
    before = {k.replace(".base_layer", ""): v for k, v in _weights(model).items()}
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.merge()
    return _changed(before, _Renamed(model), prefix)


class _Renamed:
    """A merged PEFT model's state dict under the base model's names."""

    def __init__(self, model) -> None:
        self.model = model

    def state_dict(self):
        return {k.replace(".base_layer", ""): v for k, v in self.model.state_dict().items()}


def with_lora(model, config: LoraConfig, seed: int, magnitude: bool = False):
    torch.manual_seed(seed)
    model = copy.deepcopy(model)
    model.add_adapter(config)
    if magnitude:  # a trained magnitude differs from the base's row norms
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "lora_magnitude_vector" in name:
                    parameter.mul_(1 + 0.2 * torch.rand_like(parameter))
    return model, get_peft_model_state_dict(model), config.to_dict()


def assert_clean(checkpoint) -> None:
    """Nothing dropped, nothing warned as not analysed."""
    assert not checkpoint.skipped, checkpoint.skipped
    assert not checkpoint.not_analysed, checkpoint.not_analysed


def _clip(hidden: int, cls=CLIPTextModel):
    return tiny_clip(hidden, cls)


# -- Flux: save_lora_weights with per-module patterns; DoRA against --base ----------------------------------------

FLUX_NONE = dict(scheduler=None, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None)


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    torch.manual_seed(0)
    model = FluxTransformer2DModel(
        patch_size=1,
        in_channels=8,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=4,
        num_attention_heads=2,
        joint_attention_dim=12,
        pooled_projection_dim=6,
        axes_dims_rope=(2, 2),
    )
    root = tmp_path_factory.mktemp("flux")
    model.save_pretrained(root / "pipeline" / "transformer")
    return model, root


def test_flux_pipeline_file_with_patterns(flux, tmp_path):
    model, _ = flux
    targets = ["to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "to_add_out", "proj_mlp", "proj_out", "ff.net.2"]
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=[*targets, "norm1.linear", "x_embedder"],
        rank_pattern={"to_k": 2, "single_transformer_blocks.0.proj_out": 3},
        alpha_pattern={"to_v": 6, "add_k_proj": 1.5},
        init_lora_weights=False,
    )
    _adapted, state, meta = with_lora(model, config, seed=1)
    FluxPipeline.save_lora_weights(tmp_path, transformer_lora_layers=state, transformer_lora_adapter_metadata=meta)
    checkpoint = rankscope.load(tmp_path / FILE)
    assert_clean(checkpoint)
    got = records(tmp_path / FILE)
    assert_matches(got, fused(FluxPipeline, tmp_path / FILE, {"transformer": model}, **FLUX_NONE))
    assert got["transformer.single_transformer_blocks.0.proj_out"].rank_bound == 3
    assert got["transformer.transformer_blocks.0.attn.add_k_proj"].scale == 1.5 / 4


def test_flux_dora_against_component_and_pipeline_folders(flux, tmp_path):
    model, root = flux
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "proj_out", "ff.net.2"], use_dora=True)
    config.init_lora_weights = False
    _, state, meta = with_lora(model, config, seed=2, magnitude=True)
    FluxPipeline.save_lora_weights(tmp_path, transformer_lora_layers=state, transformer_lora_adapter_metadata=meta)
    deltas = fused(FluxPipeline, tmp_path / FILE, {"transformer": model}, **FLUX_NONE)
    for base in (root / "pipeline" / "transformer", root / "pipeline"):
        assert_matches(records(tmp_path / FILE, base=base), deltas)


# -- SD3: transformer (conv pos_embed, rsLoRA, patterns) and both CLIP text encoders ------------------------------


def test_sd3_pipeline_file_three_components(tmp_path):
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=4,
        num_attention_heads=2,
        joint_attention_dim=12,
        caption_projection_dim=8,
        pooled_projection_dim=6,
        out_channels=4,
        pos_embed_max_size=8,
        dual_attention_layers=(0,),
    )
    te, te2 = _clip(6, CLIPTextModelWithProjection), _clip(8, CLIPTextModelWithProjection)
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["to_q", "to_k", "to_v", "add_k_proj", "ff.net.0.proj", "pos_embed.proj", "proj_out"],
        rank_pattern={"attn2.to_k": 2, "transformer_blocks.1.ff.net.0.proj": 3},
        alpha_pattern={r"transformer_blocks\.0\.attn\.add_k_proj": 1.5},
        use_rslora=True,
        init_lora_weights=False,
    )
    te_targets = ["q_proj", "k_proj", "out_proj"]
    te_config = LoraConfig(r=3, lora_alpha=5, target_modules=te_targets, rank_pattern={"k_proj": 1})
    te_config.init_lora_weights = False
    te2_config = LoraConfig(r=2, lora_alpha=7, target_modules=["q_proj", "fc1"], init_lora_weights=False)
    _, state, meta = with_lora(transformer, config, seed=1)
    _, te_state, te_meta = with_lora(te, te_config, seed=2)
    _, te2_state, te2_meta = with_lora(te2, te2_config, seed=3)
    StableDiffusion3Pipeline.save_lora_weights(
        tmp_path,
        transformer_lora_layers=state,
        text_encoder_lora_layers=te_state,
        text_encoder_2_lora_layers=te2_state,
        transformer_lora_adapter_metadata=meta,
        text_encoder_lora_adapter_metadata=te_meta,
        text_encoder_2_lora_adapter_metadata=te2_meta,
    )
    none = dict(scheduler=None, vae=None, tokenizer=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
    parts = {"transformer": transformer, "text_encoder": te, "text_encoder_2": te2}
    checkpoint = rankscope.load(tmp_path / FILE)
    assert_clean(checkpoint)
    assert checkpoint.adapter_type == "RSLORA"
    got = records(tmp_path / FILE)
    assert_matches(got, fused(StableDiffusion3Pipeline, tmp_path / FILE, parts, **none))
    conv = got["transformer.pos_embed.proj"]
    assert conv.kind == "conv2d" and conv.matrix_shape == [8, 16]
    assert got["transformer.transformer_blocks.0.attn2.to_k"].scale == pytest.approx(8 / math.sqrt(2), rel=1e-15)


# -- Wan: a Conv3d patch embedding; layer index and module type of diffusers' numbered parts ----------------------


def test_wan_conv3d_and_numbered_module_parts(tmp_path):
    torch.manual_seed(0)
    wan = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=4,
        in_channels=4,
        out_channels=4,
        text_dim=12,
        freq_dim=8,
        ffn_dim=16,
        num_layers=2,
        rope_max_seq_len=32,
    )
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["to_q", "to_out.0", "ffn.net.0.proj", "ffn.net.2", "patch_embedding"],
        rank_pattern={"patch_embedding": 2},
        init_lora_weights=False,
    )
    _, state, meta = with_lora(wan, config, seed=1)
    WanPipeline.save_lora_weights(tmp_path, transformer_lora_layers=state, transformer_lora_adapter_metadata=meta)
    none = dict(tokenizer=None, text_encoder=None, vae=None, scheduler=None)
    analysis = rankscope.analyze(rankscope.load(tmp_path / FILE))
    got = {record.name: record for record in analysis}
    assert_matches(got, fused(WanPipeline, tmp_path / FILE, {"transformer": wan}, **none))
    patch = got["transformer.patch_embedding"]
    assert patch.kind == "conv3d" and patch.matrix_shape == [8, 16] and patch.rank_bound == 2
    # to_out.0 and ffn.net.2 are numbered inside their block: block 1's layers are in block 1 (was: index 2,
    # module type "2" for ffn.net.2, and "0" for every to_out.0), one heatmap column per block
    for module in ("attn1.to_out.0", "ffn.net.2", "ffn.net.0.proj"):
        record = got[f"transformer.blocks.1.{module}"]
        assert record.layer_index == 1, module
    # the block repeats to_out.0 (self- and cross-attention): the type says which (issue 12; was "to_out.0")
    assert got["transformer.blocks.1.attn1.to_out.0"].module_type == "attn1.to_out.0"
    assert got["transformer.blocks.1.attn2.to_out.0"].module_type == "attn2.to_out.0"
    assert got["transformer.blocks.0.ffn.net.2"].module_type == "net.2"
    assert got["transformer.blocks.0.ffn.net.0.proj"].module_type == "net.0.proj"
    positions, label = block_positions(analysis.layers)
    assert set(positions) == {"transformer.patch_embedding", "transformer.blocks.0", "transformer.blocks.1"}
    assert label == "block (model order)"


# -- UNet: conv LoRA in bf16 / fp16 files, conv DoRA against --base; convert_state_dict_to_kohya -----------------


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    """A float32 UNet and CLIP text encoder, and a pipeline folder (model_index.json, unet/, text_encoder/)."""
    torch.manual_seed(0)
    unet = tiny_unet()
    te = _clip(12)
    root = tmp_path_factory.mktemp("sd") / "pipeline"
    unet.save_pretrained(root / "unet")
    te.save_pretrained(root / "text_encoder")
    (root / "model_index.json").write_text("{}")
    return unet, te, root


def sd_fused(file, unet, te=None):
    extra = dict(vae=None, tokenizer=None, scheduler=DDIMScheduler(), safety_checker=None, feature_extractor=None)
    parts = {"unet": unet} if te is None else {"unet": unet, "text_encoder": te}
    extra |= {"text_encoder": None} if te is None else {}
    return fused(StableDiffusionPipeline, file, parts, requires_safety_checker=False, **extra)


CONV_TARGETS = ["conv_in", "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "to_k"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_unet_conv_lora_in_half_precision(sd, tmp_path, dtype):
    unet = copy.deepcopy(sd[0]).to(dtype)  # diffusers saves the factors in the model's dtype
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=CONV_TARGETS,
        rank_pattern={"conv_in": 2, "conv_shortcut": 3},
        alpha_pattern={"conv2": 5},
        init_lora_weights=False,
    )
    _, state, meta = with_lora(unet, config, seed=1)
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=state, unet_lora_adapter_metadata=meta)
    assert {t.dtype for t in load_file(tmp_path / FILE).values()} == {dtype}
    assert_clean(rankscope.load(tmp_path / FILE))
    got = records(tmp_path / FILE)
    assert_matches(got, sd_fused(tmp_path / FILE, unet))
    assert got["unet.conv_in"].rank_bound == 2 and got["unet.conv_in"].matrix_shape == [8, 36]


def test_unet_conv_dora_against_each_base_form(sd, tmp_path):
    unet, _, root = sd
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["conv_in", "conv1", "conv_shortcut", "to_q"], use_dora=True)
    config.init_lora_weights = False
    _, state, meta = with_lora(unet, config, seed=2, magnitude=True)
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=state, unet_lora_adapter_metadata=meta)
    deltas = sd_fused(tmp_path / FILE, unet)
    for base in (root, root / "unet", root / "unet" / "diffusion_pytorch_model.safetensors"):
        assert_matches(records(tmp_path / FILE, base=base), deltas)


def test_text_encoder_dora_against_peft_merge(sd, tmp_path):
    unet, te, root = sd
    te_config = LoraConfig(r=3, lora_alpha=5, target_modules=["q_proj", "fc1"], use_dora=True, rank_pattern={"fc1": 2})
    te_config.init_lora_weights = False
    unet_config = LoraConfig(r=4, lora_alpha=8, target_modules=["to_v", "conv2"], init_lora_weights=False)
    te_model, te_state, te_meta = with_lora(te, te_config, seed=3, magnitude=True)
    unet_model, unet_state, unet_meta = with_lora(unet, unet_config, seed=4)
    StableDiffusionPipeline.save_lora_weights(
        tmp_path,
        unet_lora_layers=unet_state,
        text_encoder_lora_layers=te_state,
        unet_lora_adapter_metadata=unet_meta,
        text_encoder_lora_adapter_metadata=te_meta,
    )
    reference = peft_merged(te_model, "text_encoder.") | peft_merged(unet_model, "unet.")
    for base in (root, root / "text_encoder"):  # the unet's plain LoRA needs no base
        assert_matches(records(tmp_path / FILE, base=base), reference)


def test_convert_state_dict_to_kohya(sd, tmp_path):
    unet, te, _ = sd
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["conv1", "conv_shortcut", "to_q", "to_k", "proj_in", "ff.net.2", "time_emb_proj"],
        rank_pattern={"conv1": 3},
        init_lora_weights=False,
    )
    # all four projections: diffusers 0.42 drops a kohya text encoder's q_proj when k_proj/v_proj are absent
    te_config = LoraConfig(r=3, lora_alpha=5, target_modules=[*TE_ATTENTION, "fc2"], init_lora_weights=False)
    _, state, meta = with_lora(unet, config, seed=5)
    _, te_state, _te_meta = with_lora(te, te_config, seed=6)
    StableDiffusionPipeline.save_lora_weights(
        tmp_path, unet_lora_layers=state, text_encoder_lora_layers=te_state, unet_lora_adapter_metadata=meta
    )
    kohya = convert_state_dict_to_kohya(convert_all_state_dict_to_peft(load_file(tmp_path / FILE)))
    path = tmp_path / "kohya.safetensors"
    save_file(kohya, path)
    checkpoint = rankscope.load(path)
    assert_clean(checkpoint)
    assert not checkpoint.warnings, checkpoint.warnings  # every module has its .alpha (= r: lora_alpha is dropped)
    got = records(path)
    # diffusers' own load of the kohya file (it names layers by the base model: flatten them back)
    deltas = sd_fused(path, unet, te)
    prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te1_"}
    flat = {prefixes[n.partition(".")[0]] + n.partition(".")[2].replace(".", "_"): d for n, d in deltas.items()}
    assert_matches(got, flat)
    assert got["lora_unet_mid_block_resnets_0_conv1"].scale == 1.0  # .alpha = r


# -- LyCORIS through lycoris.kohya on a diffusers UNet + CLIP, --base as the pipeline folder ----------------------

_PRESET = """enable_conv = true
unet_target_module = ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"]
unet_target_name = ["conv_in", "conv_out", "time_embedding.linear_1"]
text_encoder_target_module = ["CLIPAttention", "CLIPMLP"]
text_encoder_target_name = []
"""
_KOHYA_PRESET_FIELDS = (
    "ENABLE_CONV",
    "UNET_TARGET_REPLACE_MODULE",
    "UNET_TARGET_REPLACE_NAME",
    "TEXT_ENCODER_TARGET_REPLACE_MODULE",
    "TEXT_ENCODER_TARGET_REPLACE_NAME",
    "MODULE_ALGO_MAP",
    "NAME_ALGO_MAP",
)


def probe(module) -> torch.Tensor:
    """The (out, in·∏k) weight a module applies, from its forward minus f(0): the identity for a Linear, unit
    impulses under one output pixel for a Conv2d (its own stride and padding)."""
    if not hasattr(module, "kernel_size"):
        inputs = torch.eye(module.in_features, dtype=torch.float64)
        with torch.no_grad():
            return (module(inputs) - module(torch.zeros_like(inputs[:1]))).T
    (kh, kw), (sh, sw), (ph, pw) = module.kernel_size, module.stride, module.padding
    channels = module.in_channels
    n = channels * kh * kw
    inputs = torch.zeros(n, channels, sh + kh + ph, sw + kw + pw, dtype=torch.float64)
    for index, (c, i, j) in enumerate((c, i, j) for c in range(channels) for i in range(kh) for j in range(kw)):
        inputs[index, c, sh - ph + i, sw - pw + j] = 1.0  # the window of output pixel (1, 1)
    with torch.no_grad():
        return (module(inputs)[:, :, 1, 1] - module(torch.zeros_like(inputs[:1]))[:, :, 1, 1]).T


def network_module(network, name: str):
    """The network's module of that name where its forward can be probed in float64 (LyCORIS 4.1's diag-OFT
    inverts in float32 and cannot)."""
    module = next(m for m in network.loras if m.lora_name == name)
    return None if type(module).__name__ == "DiagOFTModule" else module


@pytest.fixture(scope="module")
def kohya_lycoris(sd, tmp_path_factory):
    """Build a LyCORIS network with ``lycoris.kohya.create_network``; returns (file, ΔW per kohya name)."""
    unet, te, _ = sd
    root = tmp_path_factory.mktemp("lycoris")
    (root / "preset.toml").write_text(_PRESET)
    saved = {field: copy.copy(getattr(LycorisNetworkKohya, field)) for field in _KOHYA_PRESET_FIELDS}

    def build(name: str, algo: str, **kwargs):
        torch.manual_seed(0)
        u, t = copy.deepcopy(unet).double(), copy.deepcopy(te).double()
        base = {"lora_unet_": copy.deepcopy(u), "lora_te_": copy.deepcopy(t)}
        try:
            network = create_network(1.0, 2, 3.0, None, t, u, algo=algo, preset=str(root / "preset.toml"), **kwargs)
        finally:
            for field, value in saved.items():
                setattr(LycorisNetworkKohya, field, value)
        network.apply_to(t, u, True, True)
        for module in network.loras:
            module.to(torch.float64)
        with torch.no_grad():
            for key, parameter in network.named_parameters():
                if key.endswith("dora_scale"):
                    parameter.mul_(1 + 0.3 * torch.rand_like(parameter))
                else:  # LyCORIS inits an up factor to zero
                    parameter.copy_((torch.randn_like(parameter) * 0.5).float())
        path = root / f"{name}.safetensors"
        network.save_weights(str(path), torch.float64, None)
        names = {module.lora_name for module in network.loras}
        deltas = {}
        for prefix, model in (("lora_unet_", u), ("lora_te_", t)):
            for module_name, module in model.named_modules():
                flat = prefix + module_name.replace(".", "_")
                if flat in names and network_module(network, flat) is not None:
                    deltas[flat] = probe(module) - probe(base[prefix].get_submodule(module_name))
        return path, deltas

    return build


@pytest.mark.parametrize(
    ("algo", "kwargs", "family"),
    [
        ("loha", {"conv_dim": 2, "conv_alpha": 1.5}, "loha"),
        ("lokr", {"dora_wd": True}, "lokr"),
        ("locon", {"dora_wd": True, "wd_on_output": False, "use_tucker": True}, "locon"),
        ("full", {}, "full"),
    ],
)
def test_lycoris_kohya_network_on_unet_and_clip(sd, kohya_lycoris, algo, kwargs, family):
    path, deltas = kohya_lycoris(f"{algo}-{'-'.join(kwargs)}", algo, **kwargs)
    base = sd[2] if kwargs.get("dora_wd") else None
    checkpoint = rankscope.load(path, base=base)
    assert_clean(checkpoint)
    assert not checkpoint.warnings, checkpoint.warnings
    got = {record.name: record for record in rankscope.analyze(checkpoint)}
    assert_matches(got, deltas)
    assert family in {record.family for record in got.values()}
    assert any(name.startswith("lora_te_") for name in got) and "lora_unet_conv_in" in got


# -- the CLI on such files ------------------------------------------------------------------------------------


def test_cli_spectrum_compare_report(sd, kohya_lycoris, tmp_path):
    unet, _te, root = sd
    files = []
    for seed, dora in ((7, True), (8, False)):
        config = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "conv1"], use_dora=dora, init_lora_weights=False)
        _, state, meta = with_lora(unet, config, seed=seed, magnitude=dora)
        folder = tmp_path / f"run{seed}"
        StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=state, unet_lora_adapter_metadata=meta)
        files.append(folder / FILE)
    deltas = sd_fused(files[0], unet)
    runner = CliRunner()
    result = runner.invoke(main, ["spectrum", str(files[0]), "--base", str(root), "--json", "-"])
    assert result.exit_code == 0, result.output
    layers = {layer["name"]: layer for layer in json.loads(result.stdout)["layers"]}
    got = {name: _Record(layer) for name, layer in layers.items()}
    assert_matches(got, deltas)
    result = runner.invoke(main, ["compare", *map(str, files), "--base", str(root), "--json", "-"])
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)["layers"]) == len(deltas)
    # a LyCORIS file with an algorithm rankscope does not read: its warning reaches compare and report
    LycorisNetworkKohya.MODULE_ALGO_MAP = {"Conv2d": {"algo": "diag-oft"}}
    try:
        mixed, _ = kohya_lycoris("mixed", "locon")
    finally:
        LycorisNetworkKohya.MODULE_ALGO_MAP = {}
    plain, _ = kohya_lycoris("plain", "locon")
    result = runner.invoke(main, ["compare", str(mixed), str(plain), "--json", "-"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    first = document["checkpoints"][0]
    assert first["not_analysed"] and any("NOT analysed" in w for w in first["warnings"])
    assert not document["checkpoints"][1]["not_analysed"]
    out = tmp_path / "report"
    result = runner.invoke(main, ["report", str(mixed), str(plain), "-o", str(out), "--figures", "none"])
    assert result.exit_code == 0, result.output
    assert "NOT analysed" in (out / "index.html").read_text()
    assert "not analysed" in (out / "summary.md").read_text()


class _Record:
    """A JSON layer record with the attributes assert_matches reads."""

    def __init__(self, layer: dict) -> None:
        self.valid, self.error, self.exact = layer["valid"], layer.get("error"), layer["exact"]
        self.singular_values = layer["singular_values"]


@pytest.mark.parametrize(
    ("name", "index", "module"),
    [
        ("unet.down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_out.0", 1, "to_out.0"),
        ("transformer.transformer_blocks.5.ff_context.net.2", 5, "net.2"),
        ("transformer.transformer_blocks.5.ff.net.0.proj", 5, "net.0.proj"),
        ("diffusion_model.double_blocks.4.img_mlp.2", 4, "img_mlp.2"),  # BFL / ComfyUI Flux
        ("diffusion_model.blocks.7.ffn.0", 7, "ffn.0"),  # Wan (musubi-tuner)
        ("lora_unet_down_blocks_1_attentions_0_transformer_blocks_1_ff_net_2", 1, "ff_net_2"),
        ("lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_out_0", 0, "attn1_to_out_0"),
        ("lora_te1_text_model_encoder_layers_3_self_attn_q_proj", 3, "self_attn_q_proj"),
        ("model.layers.7.self_attn.q_proj", 7, "q_proj"),
    ],
)
def test_numbered_module_parts_are_not_layer_indices(name, index, module):
    from rankscope.core.naming import block_of, layer_index, module_type

    assert (layer_index(name), module_type(name)) == (index, module)
    assert block_of(name).endswith(f"{index}") and module.replace("_", ".") not in block_of(name).replace("_", ".")
