"""``--base`` as a model folder that transformers ≥ 5 ``save_pretrained`` wrote in an older checkpoint layout than
the module names PEFT's adapter uses (LLaVA's ``language_model.model.…``, Qwen2-VL's ``model.…``/``visual.…``,
GraniteMoE's ``input_linear``, Mixtral's ``block_sparse_moe.gate``): DoRA's ΔW against PEFT's merge_and_unload in
float64, and every layer measured against its base weight."""

from __future__ import annotations

import os

import pytest
import torch

import rankscope

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from .factories import assert_matches, quiet_library_warnings  # noqa: E402, F401 (autouse)

_TEXT = dict(vocab_size=80, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip


def _llava():
    T = transformers
    vision = T.CLIPVisionConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                                image_size=16, patch_size=8, projection_dim=16)  # fmt: skip
    return T.LlavaForConditionalGeneration(
        T.LlavaConfig(vision_config=vision, text_config=T.LlamaConfig(**_TEXT), image_token_index=79)
    )


def _qwen2_vl():
    text = dict(_TEXT, rope_scaling={"type": "mrope", "mrope_section": [2, 1, 1]})
    vision = dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=2, spatial_merge_size=2,
                  in_channels=3, temporal_patch_size=2)  # fmt: skip
    return transformers.Qwen2VLForConditionalGeneration(
        transformers.Qwen2VLConfig(text_config=text, vision_config=vision)
    )


def _granite_moe():
    config = transformers.GraniteMoeConfig(**_TEXT, num_local_experts=3, num_experts_per_tok=1)
    return transformers.GraniteMoeForCausalLM(config)


def _adapted(build, config, tmp_path):
    """(base folder, adapter folder, ΔW by module name from PEFT's float64 merge)."""
    torch.manual_seed(0)
    model = build()
    model.save_pretrained(tmp_path / "base")
    wrapped = peft.get_peft_model(model, config)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in wrapped.named_parameters():
            if "lora_" in name:
                parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator) + ("magnitude" in name))
    wrapped.save_pretrained(tmp_path / "adapter")
    before = {k: v.double().clone() for k, v in wrapped.get_base_model().state_dict().items()}
    merged = wrapped.double().merge_and_unload().state_dict()
    deltas = {}
    for key, weight in merged.items():
        old = before.get(key.replace(".weight", ".base_layer.weight"), before.get(key))
        if key.endswith(".weight") and old is not None and not torch.equal(weight, old):
            deltas[key.removesuffix(".weight")] = weight - old
    return tmp_path / "base", tmp_path / "adapter", deltas


@pytest.mark.parametrize("build", [_llava, _qwen2_vl], ids=["llava", "qwen2_vl"])
def test_multimodal_dora_against_a_base_saved_by_transformers(build, tmp_path):
    pattern = r".*(vision_tower|visual|language_model).*\.(q_proj|v_proj|qkv|fc1|up_proj)$"
    base, adapter, deltas = _adapted(build, peft.LoraConfig(r=2, lora_alpha=4, use_dora=True, target_modules=pattern),
                                     tmp_path)  # fmt: skip
    assert any("vision" in name or "visual" in name for name in deltas)
    checkpoint = rankscope.load(adapter, base=base)
    records = {record.name: record for record in rankscope.analyze(checkpoint)}
    assert_matches(records, deltas, tol=1e-8)  # PEFT's DoRA norm is taken in float32 before the merge
    assert all(record.base is not None for record in records.values())


def _mixtral():
    config = transformers.MixtralConfig(**_TEXT, num_local_experts=3, num_experts_per_tok=1)
    return transformers.MixtralForCausalLM(config)


@pytest.mark.parametrize(
    ("build", "parameters"),
    [
        (_granite_moe, ["experts.gate_up_proj", "experts.down_proj", "router.weight"]),
        (_mixtral, ["mlp.gate.weight", "mlp.experts.down_proj"]),
    ],
    ids=["granitemoe", "mixtral"],
)
def test_moe_experts_and_router_find_their_saved_weights(build, parameters, tmp_path):
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], target_parameters=parameters)
    base, adapter, _ = _adapted(build, config, tmp_path)
    checkpoint = rankscope.load(adapter, base=base)
    assert not [w for w in checkpoint.warnings if "holds no weight" in w]
    records = rankscope.analyze(checkpoint)
    assert any(".experts." in r.name and r.name.endswith("]") for r in records)
    assert all(record.base is not None for record in records), [r.name for r in records if r.base is None]
