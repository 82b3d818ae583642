"""Bases that transformers ≥ 5 saves under older names than the model's modules in memory (which PEFT's adapter
names follow): every parameter of each tiny model found by ``--base`` under the key transformers' own
``save_pretrained`` wrote (ViT, DeiT, BEiT, ViTMAE, Dinov2, Swin, GPT-NeoX's head, a bare LLaVA, PhiMoE's router,
Segformer, ESM's LayerNorms, VideoMAE's biases), and ViT adapters of the tuners
that need the base against PEFT's ``merge_and_unload()``."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import rankscope  # noqa: E402
from rankscope.core.base import BaseWeights  # noqa: E402

from .factories import assert_matches, quiet_library_warnings  # noqa: E402, F401 (autouse)
from .test_naming_models import tiny_model  # noqa: E402

ENCODER = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4)
VISION = dict(ENCODER, image_size=16, patch_size=4, num_labels=3)
SWIN = dict(image_size=16, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=2)

MODELS = {
    "vit": lambda: transformers.ViTForImageClassification(transformers.ViTConfig(**VISION)),
    "vit-bare": lambda: transformers.ViTModel(transformers.ViTConfig(**VISION)),
    "deit": lambda: transformers.DeiTForImageClassification(transformers.DeiTConfig(**VISION)),
    "beit": lambda: transformers.BeitModel(transformers.BeitConfig(**VISION)),
    "vit-mae": lambda: transformers.ViTMAEModel(transformers.ViTMAEConfig(**VISION)),
    "vit-mae-decoder": lambda: transformers.ViTMAEForPreTraining(
        transformers.ViTMAEConfig(
            **VISION,
            decoder_hidden_size=16,
            decoder_num_hidden_layers=1,
            decoder_num_attention_heads=2,
            decoder_intermediate_size=24,
        )
    ),
    "dinov2": lambda: transformers.Dinov2Model(transformers.Dinov2Config(**VISION)),
    "swin": lambda: transformers.SwinModel(transformers.SwinConfig(**SWIN)),
    "gpt-neox": lambda: transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**ENCODER, vocab_size=64)),
    "llava-bare": lambda: transformers.LlavaModel(
        transformers.LlavaConfig(
            vision_config=dict(model_type="clip_vision_model", **VISION),
            text_config=dict(model_type="llama", **ENCODER, vocab_size=300),
            image_token_index=255,
        )
    ),
    "llava-vit": lambda: transformers.LlavaForConditionalGeneration(  # two renamed families, one in the other
        transformers.LlavaConfig(
            vision_config=dict(model_type="vit", **VISION),
            text_config=dict(model_type="llama", **ENCODER, vocab_size=300),
            image_token_index=255,
        )
    ),
    "phimoe": lambda: transformers.PhimoeForCausalLM(
        transformers.PhimoeConfig(**ENCODER, vocab_size=64, num_local_experts=2, num_key_value_heads=2)
    ),
    "segformer": lambda: transformers.SegformerForSemanticSegmentation(
        transformers.SegformerConfig(
            hidden_sizes=[8, 16],
            depths=[1, 1],
            num_encoder_blocks=2,
            sr_ratios=[2, 1],
            num_attention_heads=[1, 2],
            patch_sizes=[7, 3],
            strides=[4, 2],
            decoder_hidden_size=16,
            num_labels=3,
        )
    ),
    "esm": lambda: transformers.EsmModel(transformers.EsmConfig(**ENCODER, vocab_size=33, pad_token_id=1)),
    "videomae": lambda: transformers.VideoMAEModel(transformers.VideoMAEConfig(**VISION, num_frames=2, tubelet_size=1)),
}


def _saved(model: torch.nn.Module, directory) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    model.save_pretrained(directory)
    return load_file(str(directory / "model.safetensors"))


@pytest.mark.parametrize("family", list(MODELS))
def test_every_parameter_is_found_under_its_saved_key(tmp_path, family):
    torch.manual_seed(0)
    model = MODELS[family]()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # distinct values: a LayerNorm of ones found under another's key must not pass
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
    saved = _saved(model, tmp_path)
    renamed = {n for n, _ in model.named_parameters()} - set(saved)
    assert renamed, "test setup: this family saves some parameters under other names than in memory"
    base = BaseWeights(tmp_path)
    for name, parameter in model.named_parameters():
        if ".experts." in name:  # fused in memory, saved one by one: against_base's own fallback (test_convert_moe)
            continue
        module, _, suffix = name.rpartition(".")
        key = base.key_for(module, suffix)
        assert key in saved and torch.equal(saved[key], parameter.detach()), f"{name} → {key}"


UNRENAMED = ("bert", "clip", "llama", "gpt2", "whisper", "t5", "bart", "mixtral")  # tests/test_naming_models.py's


@pytest.mark.parametrize("family", UNRENAMED)
def test_the_renamings_leave_other_families_alone(tmp_path, family):
    """Saved under their in-memory names: each found as itself, and a module without a bias gets none (the lookup
    trained biases make) — no renaming lands on another module's tensor."""
    torch.manual_seed(0)
    model = tiny_model(family)
    saved = _saved(model, tmp_path)
    base = BaseWeights(tmp_path)
    for name in (name for name, _ in model.named_parameters() if name in saved):
        module, _, suffix = name.rpartition(".")
        assert base.key_for(module, suffix) == name
    layers = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Embedding)
    for name, module in model.named_modules():
        if isinstance(module, layers) and getattr(module, "bias", None) is None:
            assert base.key_for(name, "bias") is None, name


TUNERS = {
    "dora": lambda t: peft.LoraConfig(r=4, lora_alpha=8, target_modules=t, use_dora=True, init_lora_weights=False),
    "ia3": lambda t: peft.IA3Config(target_modules=t, feedforward_modules=["fc2"], init_ia3_weights=False),
    "hra": lambda t: peft.HRAConfig(r=4, target_modules=t, init_weights=False),
}


@pytest.mark.parametrize("tuner", list(TUNERS))
def test_vit_adapters_that_need_the_base(tmp_path, tuner):
    """PEFT names ViT's modules vit.layers.N.attention.q_proj / mlp.fc1; the saved base has
    vit.encoder.layer.N.attention.attention.query / intermediate.dense: every layer was invalid before."""
    torch.manual_seed(0)
    model = MODELS["vit"]().double()
    model.save_pretrained(tmp_path / "base")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    wrapped = peft.get_peft_model(model, TUNERS[tuner](["q_proj", "v_proj", "fc1", "fc2"]))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in wrapped.named_parameters():
            if parameter.requires_grad:
                noise = torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype)
                parameter.copy_(parameter * (1 + 0.1 * noise) if "magnitude" in name or "ia3" in name else 0.3 * noise)
    wrapped.save_pretrained(tmp_path / "adapter")
    merged = wrapped.merge_and_unload().state_dict()
    deltas = {k.removesuffix(".weight"): merged[k] - w for k, w in before.items()
              if k.endswith(".weight") and not torch.equal(merged[k], w)}  # fmt: skip
    assert len(deltas) == 8
    checkpoint = rankscope.load(str(tmp_path / "adapter"), base=str(tmp_path / "base"))
    records = {record.name: record for record in rankscope.analyze(checkpoint)}
    assert_matches(records, deltas, tol=1e-9)
    assert all(record.base is not None for record in records.values())


def test_dora_on_a_llava_with_a_vit_tower_needs_both_renamings(tmp_path):
    """LLaVA saves its ViT tower's model.vision_tower.layers.N.attention.q_proj as
    vision_tower.encoder.layer.N.attention.attention.query: both families' renamings in order. DoRA on the
    language model's and the tower's q/v projections against PEFT's merge; every layer has its base."""
    torch.manual_seed(0)
    model = MODELS["llava-vit"]().double()
    model.save_pretrained(tmp_path / "base")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    wrapped = peft.get_peft_model(model, TUNERS["dora"](["q_proj", "v_proj"]))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in wrapped.named_parameters():
            if parameter.requires_grad:
                noise = torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype)
                parameter.copy_(parameter * (1 + 0.1 * noise) if "magnitude" in name else 0.3 * noise)
    wrapped.save_pretrained(tmp_path / "adapter")
    merged = wrapped.merge_and_unload().state_dict()
    deltas = {k.removesuffix(".weight"): merged[k] - w for k, w in before.items()
              if k.endswith(".weight") and not torch.equal(merged[k], w)}  # fmt: skip
    assert len(deltas) == 8 and sum("vision_tower" in k for k in deltas) == 4
    checkpoint = rankscope.load(str(tmp_path / "adapter"), base=str(tmp_path / "base"))
    records = {record.name: record for record in rankscope.analyze(checkpoint)}
    assert_matches(records, deltas, tol=1e-9)
    assert all(record.valid and record.base is not None for record in records.values())
