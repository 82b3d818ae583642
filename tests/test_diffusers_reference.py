"""rankscope against diffusers itself: LoRA files written by ``Pipeline.save_lora_weights`` (and diffusers' older
layouts, and musubi/ComfyUI-style ``.alpha`` files), compared with the singular values of ΔW = W_fused − W₀ after
diffusers' own ``load_lora_weights`` + ``fuse_lora`` in float64 (``torch.linalg.svdvals`` computed here).

Tiny SD-1.5/SDXL-shaped pipelines are built from configs (offline); LoRA adapters are added with PEFT's
``LoraConfig`` (different r/α per component, rank/alpha patterns, rsLoRA, DoRA).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import rankscope
from rankscope.cli import main

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from diffusers import (  # noqa: E402
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_wan_lora_to_diffusers  # noqa: E402
from diffusers.utils import convert_state_dict_to_diffusers  # noqa: E402
from peft import LoraConfig, get_peft_model_state_dict  # noqa: E402
from peft.tuners.tuners_utils import BaseTunerLayer  # noqa: E402
from transformers import CLIPTextModelWithProjection  # noqa: E402

from .factories import assert_matches, quiet_library_warnings, records, tiny_clip, tiny_unet  # noqa: E402, F401 (autouse)

REL_TOL = 1e-10  # float32 factors, float64 on both sides: only rounding of the float64 arithmetic differs
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


# -- tiny models -----------------------------------------------------------------------------------------------


def _unet() -> UNet2DConditionModel:
    return tiny_unet()


def _vae() -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=(4,),
        norm_num_groups=2,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
    )


class Models:
    """float32 base components (as saved) and the pipeline folder they were saved to."""

    def __init__(self, root):
        torch.manual_seed(0)
        self.unet, self.te = _unet(), tiny_clip(12)
        self.te2, self.vae = tiny_clip(16, CLIPTextModelWithProjection), _vae()
        self.pipeline_dir = root / "pipeline"
        self.pipe(self.unet, self.te, self.te2).save_pretrained(self.pipeline_dir)

    def pipe(self, unet, te, te2=None):
        common = dict(vae=self.vae, unet=unet, text_encoder=te, tokenizer=None, scheduler=DDIMScheduler())
        if te2 is None:
            return StableDiffusionPipeline(
                **common, safety_checker=None, feature_extractor=None, requires_safety_checker=False
            )
        return StableDiffusionXLPipeline(**common, text_encoder_2=te2, tokenizer_2=None)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return Models(tmp_path_factory.mktemp("diffusers"))


def with_lora(model, config: LoraConfig, seed: int):
    """A copy of ``model`` with a random (trained-looking) LoRA; its PEFT state dict and its config dict."""
    torch.manual_seed(seed)
    model = copy.deepcopy(model)
    model.add_adapter(config)
    return model, get_peft_model_state_dict(model), config.to_dict()


def unet_config(**overrides) -> LoraConfig:
    fields = dict(
        r=4,
        lora_alpha=8,
        target_modules=UNET_TARGETS,
        rank_pattern={"to_k": 2},
        alpha_pattern={"to_v": 6},
        init_lora_weights=False,
    )
    return LoraConfig(**{**fields, **overrides})


def te_config(**overrides) -> LoraConfig:
    fields = dict(r=3, lora_alpha=5, target_modules=TE_TARGETS, use_rslora=True, init_lora_weights=False)
    return LoraConfig(**{**fields, **overrides})


# -- the reference: diffusers' load_lora_weights + fuse_lora in float64 ---------------------------------------


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if k.endswith(".weight")}


def fused_deltas(models: Models, file, *, sdxl: bool = False) -> dict[str, torch.Tensor]:
    """ΔW (out, in·k…) per changed weight, named ``<component>.<module>``, from diffusers' own load and fuse."""
    parts = {
        "unet": copy.deepcopy(models.unet).double(),
        "text_encoder": copy.deepcopy(models.te).double(),
    }
    if sdxl:
        parts["text_encoder_2"] = copy.deepcopy(models.te2).double()
    pipe = models.pipe(parts["unet"], parts["text_encoder"], parts.get("text_encoder_2"))
    before = {name: _weights(model) for name, model in parts.items()}
    pipe.load_lora_weights(str(file))
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    deltas = {}
    for name, model in parts.items():
        for key, weight in _weights(model).items():
            if key in before[name] and not torch.equal(weight, before[name][key]):
                delta = weight - before[name][key]
                deltas[f"{name}.{key.removesuffix('.weight')}"] = delta.reshape(delta.shape[0], -1)
    return deltas


def peft_deltas(model, prefix: str) -> dict[str, torch.Tensor]:
    """PEFT's own ΔW (``get_delta_weight`` in float64) of every LoRA module of ``model``."""
    model = copy.deepcopy(model).double()
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer) and hasattr(module, "get_delta_weight"):
            delta = module.get_delta_weight(module.active_adapters[0])
            out[f"{prefix}{name}"] = delta.reshape(delta.shape[0], -1)
    return out


# -- item 1: save_lora_weights with per-component lora_adapter_metadata -------------------------------------------


def test_sd_pipeline_file_reads_each_components_config(models, tmp_path):
    unet, unet_sd, unet_meta = with_lora(models.unet, unet_config(), seed=1)
    te, te_sd, te_meta = with_lora(models.te, te_config(), seed=2)
    StableDiffusionPipeline.save_lora_weights(
        tmp_path,
        unet_lora_layers=unet_sd,
        text_encoder_lora_layers=te_sd,
        unet_lora_adapter_metadata=unet_meta,
        text_encoder_lora_adapter_metadata=te_meta,
    )
    file = tmp_path / "pytorch_lora_weights.safetensors"
    metadata = json.loads(__import__("safetensors").safe_open(str(file), "pt").metadata()["lora_adapter_metadata"])
    assert metadata["unet.lora_alpha"] == 8 and "lora_alpha" not in metadata  # the prefixed form

    checkpoint = rankscope.load(file)
    assert not any("α is unknown" in w for w in checkpoint.warnings), checkpoint.warnings
    assert checkpoint.adapter_type == "RSLORA"  # the text encoder's
    got = records(file)
    assert_matches(got, fused_deltas(models, file))
    # the scales as diffusers/PEFT apply them: the pattern keys are relative to the component
    attn = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    assert got[f"{attn}.to_q"].scale == 2.0
    assert got[f"{attn}.to_k"].scale == 4.0 and got[f"{attn}.to_k"].rank_bound == 2  # α 8 over rank_pattern's 2
    assert got[f"{attn}.to_v"].scale == 1.5  # alpha_pattern's 6 over 4
    assert got["text_encoder.encoder.layers.0.self_attn.q_proj"].scale == pytest.approx(5 / 3**0.5, rel=1e-15)
    # and against PEFT's own delta on the adapted models
    assert_matches(got, {**peft_deltas(unet, "unet."), **peft_deltas(te, "text_encoder.")})


def test_sdxl_pipeline_file_with_text_encoder_2(models, tmp_path):
    _, unet_sd, unet_meta = with_lora(models.unet, unet_config(rank_pattern={}, alpha_pattern={}), seed=3)
    _, te_sd, te_meta = with_lora(models.te, te_config(use_rslora=False), seed=4)
    te2_config = te_config(r=2, lora_alpha=3, use_rslora=False, alpha_pattern={"layers.1.self_attn.q_proj": 7})
    _, te2_sd, te2_meta = with_lora(models.te2, te2_config, seed=5)
    StableDiffusionXLPipeline.save_lora_weights(
        tmp_path,
        unet_lora_layers=unet_sd,
        text_encoder_lora_layers=te_sd,
        text_encoder_2_lora_layers=te2_sd,
        unet_lora_adapter_metadata=unet_meta,
        text_encoder_lora_adapter_metadata=te_meta,
        text_encoder_2_lora_adapter_metadata=te2_meta,
    )
    file = tmp_path / "pytorch_lora_weights.safetensors"
    got = records(file)
    assert_matches(got, fused_deltas(models, file, sdxl=True))
    # CLIPTextModelWithProjection keeps its text_model. level in transformers 5
    assert got["text_encoder_2.text_model.encoder.layers.1.self_attn.q_proj"].scale == 3.5
    assert got["text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj"].scale == 1.5
    assert got["text_encoder.encoder.layers.1.self_attn.q_proj"].scale == 5 / 3  # te's own config, not te2's


def test_component_without_metadata_is_scale_one_and_said(models, tmp_path):
    unet, unet_sd, unet_meta = with_lora(models.unet, unet_config(), seed=6)
    _, te_sd, _ = with_lora(models.te, te_config(use_rslora=False), seed=7)
    StableDiffusionPipeline.save_lora_weights(
        tmp_path, unet_lora_layers=unet_sd, text_encoder_lora_layers=te_sd, unet_lora_adapter_metadata=unet_meta
    )
    file = tmp_path / "pytorch_lora_weights.safetensors"
    checkpoint = rankscope.load(file)
    assert any("no config for text_encoder" in w and "scale 1" in w for w in checkpoint.warnings), checkpoint.warnings
    got = records(file)
    assert got["text_encoder.encoder.layers.0.self_attn.k_proj"].scale == 1.0
    unet_part = {name: record for name, record in got.items() if name.startswith("unet.")}
    assert_matches(unet_part, peft_deltas(unet, "unet."))
    # diffusers 0.42 cannot load this file (the text encoder's empty metadata makes a LoraConfig without
    # target_modules); without metadata it loads a text encoder with α = r: the reference for those layers
    bare = tmp_path / "bare" / "pytorch_lora_weights.safetensors"
    bare.parent.mkdir()
    save_file(load_file(file), bare)
    te_deltas = {name: d for name, d in fused_deltas(models, bare).items() if name.startswith("text_encoder.")}
    assert_matches({name: r for name, r in got.items() if name.startswith("text_encoder.")}, te_deltas)


def test_model_level_save_lora_adapter_unprefixed(models, tmp_path):
    unet, _, _ = with_lora(models.unet, unet_config(), seed=8)
    unet.save_lora_adapter(tmp_path)
    file = tmp_path / "pytorch_lora_weights.safetensors"
    metadata = json.loads(__import__("safetensors").safe_open(str(file), "pt").metadata()["lora_adapter_metadata"])
    assert metadata["lora_alpha"] == 8  # unprefixed
    got = records(file)
    assert got["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"].scale == 4.0
    # PEFT's own ΔW of the model that wrote the file (diffusers 0.42's load_lora_adapter(prefix=None) rebuilds
    # this config from the tensors with α = r instead of reading the metadata)
    assert_matches(got, peft_deltas(unet, ""))


# -- DoRA in a diffusers file, against --base as a component folder and as the pipeline folder ----------------


@pytest.fixture(scope="module")
def dora_file(models, tmp_path_factory):
    _, unet_sd, unet_meta = with_lora(models.unet, unet_config(use_dora=True), seed=9)
    generator = torch.Generator().manual_seed(10)
    for key, value in unet_sd.items():  # a trained magnitude differs from the base's row norms
        if "lora_magnitude_vector" in key:
            unet_sd[key] = value * (1 + 0.2 * torch.rand(value.shape, generator=generator))
    _, te_sd, te_meta = with_lora(models.te, te_config(), seed=11)
    directory = tmp_path_factory.mktemp("dora")
    StableDiffusionPipeline.save_lora_weights(
        directory,
        unet_lora_layers=unet_sd,
        text_encoder_lora_layers=te_sd,
        unet_lora_adapter_metadata=unet_meta,
        text_encoder_lora_adapter_metadata=te_meta,
    )
    file = directory / "pytorch_lora_weights.safetensors"
    return file, fused_deltas(models, file)


def test_dora_against_pipeline_folder(models, dora_file):
    file, deltas = dora_file
    got = records(file, base=models.pipeline_dir)
    assert_matches(got, deltas)
    checkpoint = rankscope.load(file, base=models.pipeline_dir)
    assert checkpoint.adapter_type == "DORA"


def test_dora_against_component_folder(models, dora_file):
    file, deltas = dora_file
    got = records(file, base=models.pipeline_dir / "unet")
    unet_deltas = {name: delta for name, delta in deltas.items() if name.startswith("unet.")}
    assert_matches({name: got[name] for name in unet_deltas}, unet_deltas)
    # the text encoder's plain LoRA needs no base; the unet folder does not serve it and is not asked to
    te_deltas = {name: delta for name, delta in deltas.items() if name.startswith("text_encoder.")}
    assert_matches({name: got[name] for name in te_deltas}, te_deltas)


def test_dora_without_base_asks_for_it(dora_file):
    file, _ = dora_file
    with pytest.raises(rankscope.CheckpointError, match="pass base=PATH"):
        rankscope.load(file)


def test_cli_dora_with_pipeline_base(models, dora_file):
    file, deltas = dora_file
    result = CliRunner().invoke(main, ["spectrum", str(file), "--base", str(models.pipeline_dir), "--json", "-"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    layers = {layer["name"]: layer for layer in document["layers"]}
    assert set(layers) == set(deltas)
    name = "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_v"
    expected = torch.linalg.svdvals(deltas[name])
    got = torch.tensor(layers[name]["singular_values"], dtype=torch.float64)
    assert ((got[: expected.numel()] - expected[: got.numel()]).abs().max() / expected[0]).item() <= REL_TOL


def test_cli_pipeline_file_json(models, tmp_path):
    _, unet_sd, unet_meta = with_lora(models.unet, unet_config(), seed=12)
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=unet_sd, unet_lora_adapter_metadata=unet_meta)
    file = tmp_path / "pytorch_lora_weights.safetensors"
    result = CliRunner().invoke(main, ["spectrum", str(file), "--json", "-"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    deltas = fused_deltas(models, file)
    layers = {layer["name"]: layer for layer in document["layers"]}
    assert set(layers) == set(deltas)
    assert not document["skipped"]
    for name, delta in deltas.items():
        expected = torch.linalg.svdvals(delta)
        got = torch.tensor(layers[name]["singular_values"], dtype=torch.float64)
        assert ((got - expected[: got.numel()]).abs().max() / expected[0]).item() <= REL_TOL, name


# -- item 3: diffusers' older key layouts ------------------------------------------------------------------------


def test_convert_state_dict_to_diffusers_layout_whole_file(models, tmp_path):
    """Attention-only targets: every unet key becomes ``.lora.down``/``.lora.up`` and diffusers loads them all."""
    _, unet_sd, _ = with_lora(models.unet, unet_config(target_modules=["to_q", "to_k", "to_v", "to_out.0"]), seed=13)
    _, te_sd, _ = with_lora(models.te, te_config(use_rslora=False), seed=14)
    unet_old, te_old = convert_state_dict_to_diffusers(unet_sd), convert_state_dict_to_diffusers(te_sd)
    assert all(".lora.down." in k or ".lora.up." in k for k in unet_old)
    assert all(".lora_linear_layer." in k for k in te_old)
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=unet_old, text_encoder_lora_layers=te_old)
    file = tmp_path / "pytorch_lora_weights.safetensors"
    checkpoint = rankscope.load(file)
    assert not checkpoint.skipped
    assert any("scale 1" in w for w in checkpoint.warnings)  # no metadata: α unknown, as diffusers loads it (α = r)
    assert_matches(records(file), fused_deltas(models, file))


def test_mixed_peft_and_diffusers_keys_with_metadata(models, tmp_path):
    """``convert_state_dict_to_diffusers`` renames only to_q/k/v/out.0: proj_in keeps PEFT's names in one file."""
    unet, unet_sd, unet_meta = with_lora(models.unet, unet_config(), seed=15)
    mixed = convert_state_dict_to_diffusers(unet_sd)
    assert any(".lora.down." in k for k in mixed) and any(".lora_A." in k for k in mixed)
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=mixed, unet_lora_adapter_metadata=unet_meta)
    file = tmp_path / "pytorch_lora_weights.safetensors"
    checkpoint = rankscope.load(file)
    assert not checkpoint.skipped, checkpoint.skipped
    got = records(file)
    reference = peft_deltas(unet, "unet.")  # the formula with α honoured: PEFT's own delta of the trained model
    assert_matches(got, reference)
    # diffusers' own reload keeps only some of these layers; where it does, it agrees
    loaded = fused_deltas(models, file)
    assert loaded and set(loaded) <= set(reference)
    assert_matches({name: got[name] for name in loaded}, loaded)


def test_old_attention_processor_keys(models, tmp_path):
    """diffusers ≤ 0.20's ``…attn1.processor.to_q_lora.down.weight`` (``to_out_lora`` → ``to_out.0``)."""
    unet, unet_sd, _ = with_lora(
        models.unet,
        unet_config(target_modules=["to_q", "to_k", "to_v", "to_out.0"], rank_pattern={}, alpha_pattern={}),
        seed=16,
    )
    old = {}
    for key, value in unet_sd.items():
        module, _, factor = key.rpartition(".lora_")
        block, _, target = module.removesuffix(".0").rpartition(".")
        side = "down" if factor.startswith("A") else "up"
        old[f"unet.{block}.processor.{target}_lora.{side}.weight"] = value  # diffusers 0.17–0.20's save_lora_weights
    save_file(old, tmp_path / "pytorch_lora_weights.safetensors")
    file = tmp_path / "pytorch_lora_weights.safetensors"
    checkpoint = rankscope.load(file)
    assert not checkpoint.skipped
    got = records(file)
    assert "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0" in got
    # no α in the file: scale 1, which is how diffusers loads it; PEFT's delta carries α/r = 2, divided out here
    reference = {name: delta / 2.0 for name, delta in peft_deltas(unet, "unet.").items()}
    assert_matches(got, reference)
    assert_matches(got, fused_deltas(models, file))


# -- item 2: musubi-tuner / ComfyUI files: lora_A/lora_B with a .alpha scalar, diffusion_model. prefix ------------


def _wan_file(tmp_path, alphas: dict[str, float]):
    """A Wan LoRA in the musubi/ComfyUI layout: ``diffusion_model.blocks.N.<module>.lora_A/B.weight`` + ``.alpha``."""
    generator = torch.Generator().manual_seed(17)
    tensors = {}
    dim, ffn, rank = 16, 24, 4
    for i in range(2):
        modules = {f"blocks.{i}.self_attn.{o}": (dim, dim) for o in "qkvo"}
        modules |= {f"blocks.{i}.cross_attn.{o}": (dim, dim) for o in "qkvo"}
        modules |= {f"blocks.{i}.ffn.0": (ffn, dim), f"blocks.{i}.ffn.2": (dim, ffn)}
        for module, (out, width) in modules.items():
            r = rank - (i + len(module)) % 2  # ranks 3 and 4
            tensors[f"diffusion_model.{module}.lora_A.weight"] = torch.randn(r, width, generator=generator)
            tensors[f"diffusion_model.{module}.lora_B.weight"] = torch.randn(out, r, generator=generator)
            alpha = alphas.get(module, float(r) * 2)
            tensors[f"diffusion_model.{module}.alpha"] = torch.tensor(alpha, dtype=torch.bfloat16)
    path = tmp_path / "wan_lora.safetensors"
    save_file(tensors, path)
    return path


def test_wan_alpha_scalars_against_diffusers_converter(tmp_path):
    path = _wan_file(tmp_path, {"blocks.0.self_attn.q": 3.0, "blocks.1.ffn.2": 0.5})
    checkpoint = rankscope.load(path)
    assert not checkpoint.skipped, checkpoint.skipped  # the .alpha tensors are used
    assert not any("α is unknown" in w for w in checkpoint.warnings)
    got = records(path)
    # diffusers' converter folds alpha/r into the factors (its loader then applies scale 1)
    converted = _convert_non_diffusers_wan_lora_to_diffusers(load_file(path))
    assert not any(k.endswith(".alpha") for k in converted)
    names = {
        "attn1.to_q": "self_attn.q",
        "attn1.to_k": "self_attn.k",
        "attn1.to_v": "self_attn.v",
        "attn1.to_out.0": "self_attn.o",
        "attn2.to_q": "cross_attn.q",
        "attn2.to_k": "cross_attn.k",
        "attn2.to_v": "cross_attn.v",
        "attn2.to_out.0": "cross_attn.o",
        "ffn.net.0.proj": "ffn.0",
        "ffn.net.2": "ffn.2",
    }
    converted_deltas = {}
    for key in converted:
        if key.endswith(".lora_A.weight"):
            module = key.removeprefix("transformer.").removesuffix(".lora_A.weight")
            block, _, rest = module.partition(".")[2].partition(".")
            a = converted[key].double()
            b = converted[key.replace("lora_A", "lora_B")].double()
            converted_deltas[f"diffusion_model.blocks.{block}.{names[rest]}"] = b @ a
    assert set(got) == set(converted_deltas)
    for name, delta in converted_deltas.items():  # the converter multiplies the float32 factors by alpha/r
        expected = torch.linalg.svdvals(delta)
        sigma = torch.tensor(got[name].singular_values, dtype=torch.float64)
        assert ((sigma - expected[: sigma.numel()]).abs().max() / expected[0]).item() <= 1e-6, name
    # and tightly against the formula in float64: (alpha / r)·B·A, r = lora_A's rows
    tensors = load_file(path)
    formula = {}
    for name in got:
        a, b = tensors[f"{name}.lora_A.weight"].double(), tensors[f"{name}.lora_B.weight"].double()
        formula[name] = float(tensors[f"{name}.alpha"]) / a.shape[0] * (b @ a)
    assert_matches(got, formula)
    r = got["diffusion_model.blocks.0.self_attn.q"].rank_bound
    assert got["diffusion_model.blocks.0.self_attn.q"].scale == 3.0 / r


def test_wan_alpha_zero_reads_as_rank_and_alpha_override(tmp_path):
    path = _wan_file(tmp_path, {"blocks.0.ffn.0": 0.0})
    checkpoint = rankscope.load(path)
    assert any("alpha = 0" in w for w in checkpoint.warnings)
    got = records(path)
    assert got["diffusion_model.blocks.0.ffn.0"].scale == 1.0  # kohya's and musubi-tuner's rule: α = r
    tensors = load_file(path)
    module = "diffusion_model.blocks.0.ffn.0"
    delta = tensors[f"{module}.lora_B.weight"].double() @ tensors[f"{module}.lora_A.weight"].double()
    assert_matches({module: got[module]}, {module: delta})
    # --alpha replaces every module's α, its .alpha scalar too (an expected, not-warned skip)
    overridden = rankscope.load(path, alpha=8.0)
    assert {s.key for s in overridden.skipped} == {k for k in tensors if k.endswith(".alpha")}
    assert all(s.expected for s in overridden.skipped)
    layer = next(layer for layer in overridden.layers if layer.name == module)
    assert layer.scale == 8.0 / tensors[f"{module}.lora_A.weight"].shape[0]


def _tiny_flux():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=2, num_single_layers=1, attention_head_dim=4,
                                  num_attention_heads=2, joint_attention_dim=12, pooled_projection_dim=6,
                                  axes_dims_rope=(2, 2), guidance_embeds=True)  # fmt: skip


@pytest.mark.parametrize("prefix", ["", "diffusion_model."], ids=["bare", "diffusion_model"])
def test_xlabs_flux_lora_against_diffusers_fuse(tmp_path, prefix):
    """XLabs' Flux LoRA (``double_blocks.N.processor.qkv_lora1.down.weight`` …: lora1 the image stream, lora2 the
    text stream, scale 1): each module named as the original Flux model's (``double_blocks.N.img_attn.qkv``), one
    fused qkv LoRA; σ against diffusers' own load_lora_weights + fuse_lora (which splits qkv into to_q/to_k/to_v:
    their ΔW stacked back by rows). It used to be taken for a full model."""
    from diffusers import FluxPipeline

    flux = _tiny_flux().double()
    modules = dict(flux.named_modules())
    parts = {}
    for i in range(2):
        attn, original, xlabs = f"transformer_blocks.{i}.attn", f"double_blocks.{i}", f"double_blocks.{i}.processor"
        image, text = [f"{attn}.to_{p}" for p in "qkv"], [f"{attn}.add_{p}_proj" for p in "qkv"]
        parts[f"{xlabs}.qkv_lora1"] = (f"{original}.img_attn.qkv", image)
        parts[f"{xlabs}.qkv_lora2"] = (f"{original}.txt_attn.qkv", text)
        parts[f"{xlabs}.proj_lora1"] = (f"{original}.img_attn.proj", [f"{attn}.to_out.0"])
        parts[f"{xlabs}.proj_lora2"] = (f"{original}.txt_attn.proj", [f"{attn}.to_add_out"])
    generator = torch.Generator().manual_seed(3)
    stored = {}
    for key, (_, targets) in parts.items():
        rows, columns = sum(modules[t].out_features for t in targets), modules[targets[0]].in_features
        stored[f"{prefix}{key}.down.weight"] = 0.3 * torch.randn(4, columns, generator=generator)
        stored[f"{prefix}{key}.up.weight"] = 0.3 * torch.randn(rows, 4, generator=generator)
    file = tmp_path / "xlabs.safetensors"
    save_file(stored, str(file))
    before = {
        name: module.weight.detach().clone() for name, module in modules.items() if isinstance(module, torch.nn.Linear)
    }
    pipe = FluxPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=flux)  # fmt: skip
    pipe.load_lora_weights(str(file))
    pipe.fuse_lora(components=["transformer"])
    pipe.unload_lora_weights()
    fused = dict(flux.named_modules())
    checkpoint = rankscope.load(file)
    found = {record.name: record for record in rankscope.analyze(checkpoint)}
    deltas = {prefix + name: torch.cat([fused[t].weight.detach() - before[t] for t in targets])
              for name, targets in parts.values()}  # fmt: skip
    assert_matches(found, deltas)
    assert {record.scale for record in found.values()} == {1.0}
