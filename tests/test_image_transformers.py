"""The newer diffusers transformers' LoRA files, each written by diffusers itself, against diffusers' own load +
fuse in float64: ``save_lora_weights`` of HiDream (mixture-of-experts feed-forwards), Qwen-Image, Z-Image,
Chroma and Lumina2 with per-module rank and alpha patterns and DoRA; and the non-diffusers layouts that diffusers'
own converters read for Qwen-Image and Z-Image (ai-toolkit's ``diffusion_model.…lora_A``, ``lora_down``/``lora_up``
with ``.alpha`` under ``diffusion_model.``, kohya's flattened ``lora_unet_…``), converted by
``lora_state_dict`` and loaded by ``load_lora_into_transformer``.

Reference ΔW: the transformer's weights after diffusers' ``fuse_lora`` minus before, everything float64. For the
converted layouts diffusers bakes α/r into the float32 factors before loading them (``scale_down``/``scale_up``),
so its reference carries float32 rounding: 1e-7 relative there, 1e-10 elsewhere.
"""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from safetensors.torch import save_file

pytest.importorskip("diffusers")
pytest.importorskip("peft")

import diffusers
from diffusers.loaders import lora_pipeline
from peft import LoraConfig, get_peft_model_state_dict

from .factories import assert_matches, quiet_library_warnings, records  # noqa: F401 (autouse)

FILE = "pytorch_lora_weights.safetensors"


def _hidream():
    return diffusers.HiDreamImageTransformer2DModel(
        patch_size=2, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=4,
        caption_channels=[8, 4], text_emb_dim=8, num_routed_experts=2, num_activated_experts=2, axes_dims_rope=(4, 4),
        max_resolution=(32, 32), llama_layers=(0, 1),
    )  # fmt: skip


def _qwen():
    return diffusers.QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=3,
        joint_attention_dim=16, axes_dims_rope=(8, 4, 4),
    )  # fmt: skip


def _z_image():
    return diffusers.ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32, n_layers=2, n_refiner_layers=1, n_heads=2,
        n_kv_heads=2, cap_feat_dim=16, axes_dims=[8, 4, 4], axes_lens=[256, 32, 32],
    )  # fmt: skip


def _chroma():
    return diffusers.ChromaTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=4, num_attention_heads=2,
        joint_attention_dim=8, axes_dims_rope=(2, 2), approximator_num_channels=8, approximator_hidden_dim=16,
        approximator_layers=1,
    )  # fmt: skip


def _lumina2():
    return diffusers.Lumina2Transformer2DModel(
        sample_size=4, patch_size=2, in_channels=4, hidden_size=8, num_layers=2, num_refiner_layers=1,
        num_attention_heads=1, num_kv_heads=1, multiple_of=16, axes_dim_rope=(4, 2, 2), axes_lens=(128, 128, 128),
        cap_feat_dim=8,
    )  # fmt: skip


MODELS = {
    "hidream": (_hidream, lora_pipeline.HiDreamImageLoraLoaderMixin),
    "qwen-image": (_qwen, lora_pipeline.QwenImageLoraLoaderMixin),
    "z-image": (_z_image, lora_pipeline.ZImageLoraLoaderMixin),
    "chroma": (_chroma, lora_pipeline.FluxLoraLoaderMixin),
    "lumina2": (_lumina2, lora_pipeline.Lumina2LoraLoaderMixin),
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def transformer(request):
    make, mixin = MODELS[request.param]
    torch.manual_seed(0)
    return request.param, make(), mixin


def _linear_names(model) -> list[str]:
    return sorted(name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear))


def _adapted(model, use_dora: bool = False, **config):
    """The model with a random (non-zero) LoRA on every nn.Linear; its PEFT state dict and its config."""
    torch.manual_seed(1)
    model = copy.deepcopy(model)
    config = LoraConfig(target_modules=_linear_names(model), init_lora_weights=False, use_dora=use_dora, **config)
    model.add_adapter(config)
    return get_peft_model_state_dict(model), config


def _fused(base, load) -> dict[str, torch.Tensor]:
    """ΔW per changed weight after ``load(model)`` and diffusers' ``fuse_lora``, on a float64 copy of ``base``."""
    model = copy.deepcopy(base).double()
    before = {k: v.clone() for k, v in model.state_dict().items() if k.endswith(".weight")}
    load(model)
    model.fuse_lora()
    model.unload_lora()
    deltas = {}
    for key, weight in model.state_dict().items():
        if key in before and not torch.equal(weight, before[key]):
            deltas[key.removesuffix(".weight")] = (weight - before[key]).reshape(weight.shape[0], -1)
    return deltas


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_save_lora_weights_against_fuse(transformer, tmp_path, use_dora):
    name, base, mixin = transformer
    targets = _linear_names(base)
    state, config = _adapted(
        base, use_dora, r=4, lora_alpha=8, rank_pattern={targets[0]: 2}, alpha_pattern={targets[-1]: 3}
    )
    mixin.save_lora_weights(tmp_path, transformer_lora_layers=state, transformer_lora_adapter_metadata=config.to_dict())
    deltas = _fused(base, lambda model: model.load_lora_adapter(str(tmp_path), weight_name=FILE, prefix="transformer"))
    assert len(deltas) == len(targets)
    kwargs = {}
    if use_dora:  # DoRA's ΔW needs W₀: the transformer's own saved folder
        base.save_pretrained(tmp_path / "base")
        kwargs["base"] = tmp_path / "base"
    checkpoint_records = records(tmp_path / FILE, **kwargs)
    assert_matches(checkpoint_records, {f"transformer.{k}": v for k, v in deltas.items()})
    if name == "hidream":  # each routed expert is its own layer, named by its index
        assert any(".experts.1." in layer for layer in checkpoint_records)


def _layouts(state: dict, alphas: dict[str, float]) -> dict[str, dict[str, torch.Tensor]]:
    """The same factors in the non-diffusers layouts diffusers' converters read."""
    modules = sorted({key.rsplit(".lora_", 1)[0] for key in state})
    ai_toolkit = {f"diffusion_model.{key}": value for key, value in state.items()}
    down_up, kohya = {}, {}
    for module in modules:
        down, up = state[f"{module}.lora_A.weight"], state[f"{module}.lora_B.weight"]
        alpha = torch.tensor(alphas[module])
        for prefix, out in ((f"diffusion_model.{module}", down_up), ("lora_unet_" + module.replace(".", "_"), kohya)):
            out.update({f"{prefix}.lora_down.weight": down, f"{prefix}.lora_up.weight": up, f"{prefix}.alpha": alpha})
    return {"ai-toolkit": ai_toolkit, "down-up-alpha": down_up, "kohya": kohya}


@pytest.mark.parametrize("model_name", ["qwen-image", "z-image"])
@pytest.mark.parametrize("layout", ["ai-toolkit", "down-up-alpha", "kohya"])
def test_non_diffusers_layouts_against_diffusers_converter(tmp_path, model_name, layout):
    make, mixin = MODELS[model_name]
    torch.manual_seed(0)
    base = make()
    state, _ = _adapted(base, r=4, lora_alpha=4)
    alphas = {module: float(2 + i % 5) for i, module in enumerate(sorted({k.rsplit(".lora_", 1)[0] for k in state}))}
    file = tmp_path / "lora.safetensors"
    save_file({k: v.contiguous() for k, v in _layouts(state, alphas)[layout].items()}, str(file))

    def load(model):
        converted, metadata = mixin.lora_state_dict(str(file), return_lora_metadata=True)
        kwargs = (
            {"metadata": metadata}
            if "metadata" in inspect.signature(mixin.load_lora_into_transformer).parameters
            else {}
        )
        mixin.load_lora_into_transformer(converted, transformer=model, **kwargs)

    deltas = _fused(base, load)
    assert len(deltas) == len(alphas)
    got = records(file)
    # rankscope keeps the file's own names; each is the diffusers module's, flattened or prefixed
    by_module = {}
    for module in deltas:
        matches = [n for n in got if n.replace("_", ".").endswith(module.replace("_", "."))]
        assert len(matches) == 1, (module, matches)
        by_module[module] = got[matches[0]]
    assert len(by_module) == len(got)
    assert_matches(by_module, deltas, tol=1e-10 if layout == "ai-toolkit" else 1e-7)
