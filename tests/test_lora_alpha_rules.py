"""Where a LoRA-style file's α comes from, as the loaders read it: a config (adapter_config.json, diffusers'
``lora_adapter_metadata``) wins over per-module ``.alpha`` tensors; without one, ``.alpha`` gives alpha/r and a
module without it gets α = r, never kohya's ``ss_network_alpha``; diffusers' old text-encoder processor keys.

References: PEFT's ``merge_and_unload`` / ``get_delta_weight``, diffusers' ``load_lora_into_text_encoder`` then
PEFT's merge, and diffusers' Wan converter — each ΔW's σ from a float64 ``torch.linalg.svdvals`` here.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import rankscope
from rankscope.core.errors import CheckpointError

pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("transformers")

from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_wan_lora_to_diffusers
from diffusers.utils import convert_state_dict_to_peft
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers import CLIPTextModelWithProjection

from .factories import assert_matches, quiet_library_warnings, records, tiny_clip  # noqa: F401 (autouse)

TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def peft_deltas(model, prefix: str) -> dict[str, torch.Tensor]:
    """PEFT's own ΔW (``get_delta_weight`` in float64) of every LoRA module of ``model``."""
    model = copy.deepcopy(model).double()
    return {
        f"{prefix}{name}": module.get_delta_weight(module.active_adapters[0])
        for name, module in model.named_modules()
        if isinstance(module, BaseTunerLayer)
    }


# -- 1. a config gives α: a stray .alpha is ignored, as PEFT and diffusers do ----------------------------------


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(16, 12), nn.Linear(12, 10)


def test_alpha_tensor_beside_adapter_config_is_ignored(tmp_path):
    torch.manual_seed(0)
    net = _Net().double()
    config = LoraConfig(r=4, lora_alpha=16, target_modules=["a", "b"], init_lora_weights=False)
    get_peft_model(copy.deepcopy(net), config).save_pretrained(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    tensors = load_file(weights)
    tensors["base_model.model.a.alpha"] = torch.tensor(4.0)  # a ComfyUI-converted file's per-module α
    save_file(tensors, weights)
    merged = PeftModel.from_pretrained(copy.deepcopy(net), tmp_path).merge_and_unload()  # PEFT reads the config
    reference = {name: getattr(merged, name).weight - getattr(net, name).weight for name in ("a", "b")}

    checkpoint = rankscope.load(tmp_path)
    assert [(s.key, s.expected) for s in checkpoint.skipped] == [("base_model.model.a.alpha", True)]
    assert "adapter_config.json gives α" in checkpoint.skipped[0].reason
    said = [w for w in checkpoint.warnings if ".alpha tensor(s) ignored" in w]
    assert len(said) == 1 and "adapter_config.json" in said[0] and "base_model.model.a.alpha" in said[0]
    got = records(tmp_path)
    assert got["a"].scale == 4.0  # 16/4, not the .alpha's 4/4
    assert_matches(got, reference)


@pytest.fixture(scope="module")
def encoders():
    """Two tiny CLIP text encoders (SDXL's pair) with LoRA of different r/α, their PEFT state dicts and configs."""
    torch.manual_seed(0)
    bases = tiny_clip(12), tiny_clip(16, CLIPTextModelWithProjection)
    out = []
    for seed, (base, (r, alpha)) in enumerate(zip(bases, ((3, 5), (2, 3)), strict=True)):
        torch.manual_seed(seed + 1)
        model = copy.deepcopy(base)
        config = LoraConfig(r=r, lora_alpha=alpha, target_modules=TE_TARGETS, init_lora_weights=False)
        model.add_adapter(config)
        out.append((base, model, get_peft_model_state_dict(model), config.to_dict()))
    return out


def _alphas(tensors: dict, prefix: str, value: float) -> dict[str, torch.Tensor]:
    """A ``<module>.alpha`` scalar beside every ``lora_A`` of ``prefix`` (as ComfyUI's converters add them)."""
    suffix = ".lora_A.weight"
    return {
        k.removesuffix(suffix) + ".alpha": torch.tensor(value)
        for k in tensors
        if k.startswith(prefix) and k.endswith(suffix)
    }


def test_lora_adapter_metadata_wins_and_alpha_serves_a_component_without_it(encoders, tmp_path):
    (_, te, te_sd, te_meta), (_, te2, te2_sd, _) = encoders
    StableDiffusionXLPipeline.save_lora_weights(
        tmp_path,
        text_encoder_lora_layers=te_sd,
        text_encoder_2_lora_layers=te2_sd,
        text_encoder_lora_adapter_metadata=te_meta,
    )
    file = tmp_path / "pytorch_lora_weights.safetensors"
    metadata = safe_open(str(file), "pt").metadata()
    tensors = load_file(file)
    stray = _alphas(tensors, "text_encoder.", 1.0)  # the text encoder's config says α = 5
    own = _alphas(tensors, "text_encoder_2.", 3.0)  # text_encoder_2 has no config: its .alpha gives α
    save_file({**tensors, **stray, **own}, file, metadata=metadata)

    checkpoint = rankscope.load(file)
    assert {s.key for s in checkpoint.skipped} == set(stray) and all(s.expected for s in checkpoint.skipped)
    assert sum("ignored: the file's lora_adapter_metadata gives α" in w for w in checkpoint.warnings) == 1
    assert not any("no config for" in w for w in checkpoint.warnings)  # text_encoder_2's α is its .alpha
    got = records(file)
    assert got["text_encoder.encoder.layers.0.self_attn.q_proj"].scale == 5 / 3
    assert got["text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj"].scale == 3 / 2
    assert_matches(got, {**peft_deltas(te, "text_encoder."), **peft_deltas(te2, "text_encoder_2.")})


# -- 5. what the messages about diffusers' metadata say ----------------------------------------------------------


def test_component_without_metadata_warning_is_true(encoders, tmp_path):
    (_, _, te_sd, te_meta), (base2, _, te2_sd, _) = encoders
    StableDiffusionXLPipeline.save_lora_weights(
        tmp_path,
        text_encoder_lora_layers=te_sd,
        text_encoder_2_lora_layers=te2_sd,
        text_encoder_lora_adapter_metadata=te_meta,
    )
    file = tmp_path / "pytorch_lora_weights.safetensors"
    said = [w for w in rankscope.load(file).warnings if "no config for text_encoder_2" in w]
    assert len(said) == 1 and "scale 1" in said[0] and "fails to load" in said[0]
    # the claim: diffusers refuses text_encoder_2 of this file
    state_dict, alphas, metadata = StableDiffusionXLPipeline.lora_state_dict(str(file), return_lora_metadata=True)
    with pytest.raises(ValueError, match="target_modules"):
        StableDiffusionXLPipeline.load_lora_into_text_encoder(
            state_dict, alphas, copy.deepcopy(base2), prefix="text_encoder_2", metadata=metadata
        )


def test_bad_alpha_pattern_value_in_lora_adapter_metadata_is_named(encoders, tmp_path):
    (_, _, te_sd, te_meta), _ = encoders
    StableDiffusionPipeline.save_lora_weights(
        tmp_path, text_encoder_lora_layers=te_sd, text_encoder_lora_adapter_metadata=te_meta
    )
    file = tmp_path / "pytorch_lora_weights.safetensors"
    metadata = json.loads(safe_open(str(file), "pt").metadata()["lora_adapter_metadata"])
    metadata["text_encoder.alpha_pattern"] = {"q_proj": "x"}
    save_file(load_file(file), file, metadata={"lora_adapter_metadata": json.dumps(metadata)})
    with pytest.raises(CheckpointError) as error:
        rankscope.load(file)
    message = str(error.value)
    assert str(file) in message and "alpha_pattern value for" in message and "q_proj" in message
    assert "lora_adapter_metadata" in message and "'x'" in message and "lora_alpha" not in message
    assert "\n" not in message


# -- 4. diffusers ≤ 0.20's text-encoder attention-processor keys -------------------------------------------------


def test_old_text_encoder_processor_keys(encoders, tmp_path):
    (base, _, te_sd, _), _ = encoders
    renames = {"q_proj": "to_q_lora", "k_proj": "to_k_lora", "v_proj": "to_v_lora", "out_proj": "to_out_lora"}
    old = {}
    for key, value in te_sd.items():  # encoder.layers.0.self_attn.q_proj.lora_A.weight → ….self_attn.to_q_lora.down…
        module, _, factor = key.rpartition(".lora_")
        block, _, target = module.rpartition(".")
        old[f"text_encoder.{block}.{renames[target]}.{'down' if factor.startswith('A') else 'up'}.weight"] = value
    file = tmp_path / "pytorch_lora_weights.safetensors"
    save_file(old, file)
    # diffusers' own names for these modules
    converted = convert_state_dict_to_peft({k.removeprefix("text_encoder."): v for k, v in old.items()})
    names = {"text_encoder." + k.removesuffix(".lora_A.weight") for k in converted if k.endswith(".lora_A.weight")}
    assert any(name.endswith("self_attn.out_proj") for name in names)
    # diffusers' load (α = r: no α in the file), then PEFT's merge in float64
    state_dict, alphas, metadata = StableDiffusionPipeline.lora_state_dict(str(file), return_lora_metadata=True)
    loaded = copy.deepcopy(base).double()
    before = {k: v.clone() for k, v in loaded.state_dict().items()}
    StableDiffusionPipeline.load_lora_into_text_encoder(
        state_dict, alphas, loaded, prefix="text_encoder", metadata=metadata
    )
    reference = {}
    for name, module in loaded.named_modules():
        if isinstance(module, BaseTunerLayer):
            module.merge()
            reference[f"text_encoder.{name}"] = module.get_base_layer().weight - before[f"{name}.weight"]
    assert set(reference) == names

    checkpoint = rankscope.load(file)
    assert not checkpoint.skipped
    got = records(file)
    assert set(got) == names
    assert_matches(got, reference)


# -- 2. no config: .alpha where a module has one, else α = r, whatever ss_network_alpha says -------------------


def _wan_tensors(alphas: dict[str, float | None]) -> dict[str, torch.Tensor]:
    """A Wan LoRA in the musubi/ComfyUI layout; ``alphas`` None: that module has no ``.alpha``."""
    generator = torch.Generator().manual_seed(3)
    tensors = {}
    dim, ffn, rank = 8, 12, 4
    modules = {f"blocks.0.{attn}.{o}": (dim, dim) for attn in ("self_attn", "cross_attn") for o in "qkvo"}
    modules |= {"blocks.0.ffn.0": (ffn, dim), "blocks.0.ffn.2": (dim, ffn)}
    for module, (out, width) in modules.items():
        tensors[f"diffusion_model.{module}.lora_A.weight"] = torch.randn(rank, width, generator=generator)
        tensors[f"diffusion_model.{module}.lora_B.weight"] = torch.randn(out, rank, generator=generator)
        alpha = alphas.get(module, 2.0)
        if alpha is not None:
            tensors[f"diffusion_model.{module}.alpha"] = torch.tensor(alpha)
    return tensors


_WAN_NAMES = {
    **{f"attn1.{t}": f"self_attn.{o}" for t, o in zip(("to_q", "to_k", "to_v", "to_out.0"), "qkvo", strict=True)},
    **{f"attn2.{t}": f"cross_attn.{o}" for t, o in zip(("to_q", "to_k", "to_v", "to_out.0"), "qkvo", strict=True)},
    "ffn.net.0.proj": "ffn.0",
    "ffn.net.2": "ffn.2",
}


def _wan_converted(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ΔW per module from diffusers' Wan converter, which folds alpha/r into the factors (α = r without .alpha)."""
    converted = _convert_non_diffusers_wan_lora_to_diffusers({k: v.clone() for k, v in tensors.items()})  # in place
    deltas = {}
    for key in converted:
        if key.endswith(".lora_A.weight"):
            module = key.removeprefix("transformer.blocks.0.").removesuffix(".lora_A.weight")
            a, b = converted[key].double(), converted[key.replace("lora_A", "lora_B")].double()
            deltas[f"diffusion_model.blocks.0.{_WAN_NAMES[module]}"] = b @ a
    return deltas


@pytest.mark.parametrize("some_alpha", [True, False], ids=["alpha_on_some_modules", "no_alpha"])
def test_peft_layout_without_config_ignores_ss_network_alpha(tmp_path, some_alpha):
    without = {"blocks.0.self_attn.k": None, "blocks.0.ffn.2": None}
    tensors = _wan_tensors(without if some_alpha else dict.fromkeys(f"blocks.0.{n}" for n in _WAN_NAMES.values()))
    file = tmp_path / "wan.safetensors"
    save_file(tensors, file, metadata={"ss_network_alpha": "1", "ss_network_dim": "4"})
    checkpoint = rankscope.load(file)
    assert not checkpoint.skipped
    assert not any("taken from" in w for w in checkpoint.warnings)  # α does not come from the metadata
    said = [w for w in checkpoint.warnings if "disagrees: ss_network_alpha = 1" in w]
    missing = 2 if some_alpha else 10
    assert len(said) == 1 and said[0].startswith(f"{missing} module(s) with no alpha tensor, read with α = r")
    got = records(file)
    assert got["diffusion_model.blocks.0.self_attn.k"].scale == 1.0  # α = r, not ss_network_alpha's 1/4
    assert got["diffusion_model.blocks.0.self_attn.q"].scale == (0.5 if some_alpha else 1.0)  # its .alpha: 2/4
    converted = _wan_converted(tensors)
    assert_matches(got, converted, tol=1e-6)  # the converter scales the float32 factors
    formula = {}  # and tightly: (alpha/r)·B·A, alpha = r where the module has none
    for name in got:
        a, b = tensors[f"{name}.lora_A.weight"].double(), tensors[f"{name}.lora_B.weight"].double()
        alpha = float(tensors.get(f"{name}.alpha", torch.tensor(4.0)))
        formula[name] = alpha / a.shape[0] * (b @ a)
    assert_matches(got, formula)


# -- 3. rank-0 factors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_alpha", [True, False])
def test_rank_zero_factors_are_an_invalid_layer(tmp_path, with_alpha):
    tensors = {
        "diffusion_model.blocks.0.q.lora_A.weight": torch.zeros(0, 8),
        "diffusion_model.blocks.0.q.lora_B.weight": torch.zeros(8, 0),
    }
    if with_alpha:
        tensors["diffusion_model.blocks.0.q.alpha"] = torch.tensor(4.0)
    file = tmp_path / "r0.safetensors"
    save_file(tensors, file)
    (record,) = rankscope.analyze(rankscope.load(file))
    assert not record.valid
    assert record.error == "diffusion_model.blocks.0.q.lora_A.weight: rank 0 (an empty factor)"
