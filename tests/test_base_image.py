"""``--base`` for image-generation models: component folders, pipeline folders, one file; diffusers' prefixed names
and kohya/LyCORIS's flattened names resolved to the base's own tensors (saved here by diffusers/transformers)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from rankscope.core.base import BaseWeights
from rankscope.core.errors import CheckpointError

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from diffusers import UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from .factories import tiny_clip, tiny_clip_config


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """A pipeline folder without model_index.json (unet/ sharded, text_encoder/, text_encoder_2/) and its models."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=12,
        norm_num_groups=4,
        attention_head_dim=2,
    )
    te, te2 = tiny_clip(12, CLIPTextModel), tiny_clip(16, CLIPTextModelWithProjection)
    root = tmp_path_factory.mktemp("pipe")
    unet.save_pretrained(root / "unet", max_shard_size="20KB")
    te.save_pretrained(root / "text_encoder")
    te2.save_pretrained(root / "text_encoder_2")
    assert (root / "unet" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    return root, {"unet": unet.state_dict(), "text_encoder": te.state_dict(), "text_encoder_2": te2.state_dict()}


UNET_MODULE = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"


def test_pipeline_folder_by_component_prefix(pipeline):
    root, weights = pipeline
    base = BaseWeights(root)
    assert torch.equal(base.get(f"unet.{UNET_MODULE}"), weights["unet"][f"{UNET_MODULE}.weight"])
    te = "encoder.layers.1.self_attn.q_proj"
    assert torch.equal(base.get(f"text_encoder.{te}"), weights["text_encoder"][f"{te}.weight"])
    te2 = "text_model.encoder.layers.1.self_attn.q_proj"
    assert base.shape(f"text_encoder_2.{te2}") == (16, 16)
    assert base.key_for(f"text_encoder_2.{te2}") == f"text_encoder_2/{te2}.weight"
    assert torch.equal(base.get(f"unet.{UNET_MODULE}", "weight"), base.get(f"diffusion_model.{UNET_MODULE}"))
    # an unprefixed name is looked up in every component and found where it is unique
    assert torch.equal(base.get(UNET_MODULE), weights["unet"][f"{UNET_MODULE}.weight"])
    assert base.key_for("encoder.layers.1.self_attn.q_proj") is None  # in text_encoder and (text_model.) te2
    assert base.key_for("unet.no.such.module") is None


def test_kohya_names_select_the_component(pipeline):
    root, weights = pipeline
    base = BaseWeights(root)
    flat = "lora_unet_down_blocks_0_attentions_0_proj_in"
    assert torch.equal(base.get(flat), weights["unet"]["down_blocks.0.attentions.0.proj_in.weight"])
    assert torch.equal(base.get(flat, "bias"), weights["unet"]["down_blocks.0.attentions.0.proj_in.bias"])
    te1 = base.get("lora_te1_encoder_layers_0_self_attn_k_proj")
    assert torch.equal(te1, weights["text_encoder"]["encoder.layers.0.self_attn.k_proj.weight"])
    # kohya's SD 1.x files keep CLIP's text_model level that transformers 5 dropped: either form matches
    old = base.get("lora_te_text_model_encoder_layers_0_self_attn_k_proj")
    assert torch.equal(old, te1)
    te2 = base.get("lora_te2_text_model_encoder_layers_0_self_attn_k_proj")
    assert te2.shape == (16, 16)
    assert torch.equal(te2, weights["text_encoder_2"]["text_model.encoder.layers.0.self_attn.k_proj.weight"])
    assert torch.equal(base.get("lora_te2_encoder_layers_0_self_attn_k_proj"), te2)
    assert base.key_for("lora_te1_text_projection") is None  # te2 has it, te1 does not


def test_component_folder_serves_its_own_names(pipeline):
    root, weights = pipeline
    unet = BaseWeights(root / "unet")  # sharded: diffusion_pytorch_model.safetensors.index.json
    expected = weights["unet"][f"{UNET_MODULE}.weight"]
    for name in (
        UNET_MODULE,
        f"unet.{UNET_MODULE}",
        f"diffusion_model.{UNET_MODULE}",
        "lora_unet_" + UNET_MODULE.replace(".", "_"),
    ):
        assert torch.equal(unet.get(name), expected), name
    te2 = BaseWeights(root / "text_encoder_2")
    # a folder named after a component does not serve another component's layers, even with the same names
    assert te2.key_for("text_encoder.text_model.encoder.layers.0.self_attn.q_proj") is None
    assert te2.key_for("lora_te1_text_model_encoder_layers_0_self_attn_q_proj") is None
    assert te2.key_for("text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj") is not None


def test_a_component_folder_without_weights_is_passed_over(pipeline, tmp_path):
    """text_encoder/ with only its config.json (saved by transformers): names without a component prefix and
    LyCORIS names are looked up in every component and found in unet/ instead of failing on the empty one."""
    root, weights = pipeline
    partial = tmp_path / "partial"
    shutil.copytree(root / "unet", partial / "unet")
    tiny_clip_config(12).save_pretrained(partial / "text_encoder")
    (partial / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    base = BaseWeights(partial)
    expected = weights["unet"][f"{UNET_MODULE}.weight"]
    assert torch.equal(base.get(UNET_MODULE), expected)
    assert torch.equal(base.get("lycoris_" + UNET_MODULE.replace(".", "_")), expected)
    assert base.key_for("lora_te_text_model_encoder_layers_0_self_attn_q_proj") is None


def test_single_file_and_lycoris_names(tmp_path):
    weights = {
        "0.weight": torch.randn(3, 4),
        "blocks.1.proj.weight": torch.randn(2, 2),
        "blocks_1.proj.weight": torch.ones(2, 2),
    }
    save_file(weights, tmp_path / "base.safetensors")
    base = BaseWeights(tmp_path / "base.safetensors")
    assert torch.equal(base.get("lycoris_0"), weights["0.weight"])
    # two base modules flatten to the same kohya name: ambiguous, found nowhere rather than guessed
    assert base.key_for("lycoris_blocks_1_proj") is None
    assert torch.equal(base.get("unet.blocks.1.proj"), weights["blocks.1.proj.weight"])


def test_messages_name_base(pipeline, tmp_path):
    root, _ = pipeline
    # the library speaks of the argument (base), the CLI of its flag (RankscopeError.spelled)
    with pytest.raises(CheckpointError, match=r"no tensor for layer 'unet.no.such.module' in base \(is it") as caught:
        BaseWeights(root).get("unet.no.such.module")
    assert "in --base (is it" in caught.value.spelled(lambda name: f"--{name}")
    with pytest.raises(CheckpointError, match=r"missing: base \(the base model\): no such file") as caught:
        BaseWeights(tmp_path / "missing")
    assert caught.value.arguments == ("base",) and "--" not in str(caught.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"base \(the base model\): no ") as caught:
        BaseWeights(tmp_path / "empty")
    assert caught.value.spelled(lambda name: f"--{name}").startswith(f"{tmp_path / 'empty'}: --base (the base model)")


def test_an_original_single_file_checkpoint_serves_kohya_names_by_part(tmp_path):
    """An SDXL single-file checkpoint (LDM names): lora_unet_ names are found below model.diffusion_model., lora_te1_
    below conditioner.embedders.0.transformer. (and SD 1.x's lora_te_ below cond_stage_model.transformer.); the
    second text encoder (OpenCLIP, laid out otherwise) serves no lora_te2_ name — never the first encoder's."""
    g = torch.Generator().manual_seed(0)
    unet_key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    te1_key = "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
    weights = {
        unet_key: torch.randn(8, 8, generator=g),
        te1_key: torch.randn(6, 6, generator=g),
        "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight": torch.randn(18, 6, generator=g),
    }
    save_file(weights, str(tmp_path / "sdxl.safetensors"))
    base = BaseWeights(tmp_path / "sdxl.safetensors")
    assert base.key_for("lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q") == unet_key
    assert torch.equal(base.get("lora_te1_text_model_encoder_layers_0_self_attn_q_proj"), weights[te1_key])
    assert base.key_for("lora_te2_text_model_encoder_layers_0_self_attn_q_proj") is None
    sd1_key = "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
    save_file({sd1_key: weights[te1_key]}, str(tmp_path / "sd1.safetensors"))
    assert (
        BaseWeights(tmp_path / "sd1.safetensors").key_for("lora_te_text_model_encoder_layers_0_self_attn_q_proj")
        == sd1_key
    )


def test_a_component_folder_s_weights_file_serves_only_that_component(pipeline):
    """--base pipe/text_encoder_2/model.safetensors is text_encoder_2: its CLIP names do not serve lora_te1_ layers
    (the same structure, so they would have matched by name)."""
    root, weights = pipeline
    file = next((root / "text_encoder_2").glob("*.safetensors"))
    base = BaseWeights(file)
    te2 = base.get("lora_te2_text_model_encoder_layers_0_self_attn_k_proj")
    assert torch.equal(te2, weights["text_encoder_2"]["text_model.encoder.layers.0.self_attn.k_proj.weight"])
    assert base.key_for("lora_te1_text_model_encoder_layers_0_self_attn_k_proj") is None
