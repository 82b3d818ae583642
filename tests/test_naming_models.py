"""Layer index, module type, expert and order on the real module names of tiny models built from the libraries'
own configs (transformers, diffusers; offline): the names are the models' ``named_modules()``, and their order
there is the ground truth for the order within a block."""

from __future__ import annotations

import os
from functools import cache

import pytest
import torch

from rankscope.core.naming import (
    block_of,
    expert_index,
    layer_index,
    model_order_key,
    module_type,
    module_type_order,
    module_types,
)

from .factories import tiny_clip, tiny_unet

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")

_ADAPTABLE = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d)
_LM = dict(num_hidden_layers=2, hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=2)


def module_names(model: torch.nn.Module) -> list[str]:
    """What an adapter can name, in the model's order: its linear and conv modules, and each expert of a fused
    3-D expert parameter as ``<parameter path>[<expert>]`` (the formats' name for an expert slice)."""
    names = []
    for name, module in model.named_modules():
        if isinstance(module, _ADAPTABLE) or type(module).__name__ == "Conv1D":  # GPT-2's
            names.append(name)
        for parameter, value in module.named_parameters(prefix=name, recurse=False):
            if value.dim() == 3 and ".experts." in parameter:
                names.extend(f"{parameter}[{e}]" for e in range(value.shape[0]))
    return names


def tiny_model(model: str) -> torch.nn.Module:
    """A freshly initialised tiny model of the family named ``model`` (one of :data:`MODELS`)."""
    T, D = transformers, diffusers
    seq2seq = dict(
        d_model=8,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=16,
        decoder_ffn_dim=16,
        pad_token_id=0,
        bos_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    t5 = dict(vocab_size=32, d_model=8, d_kv=4, d_ff=16, num_layers=2, num_decoder_layers=2, num_heads=2)
    encoder = dict(hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=16)
    builders = {
        "llama": lambda: T.LlamaForCausalLM(T.LlamaConfig(vocab_size=32, **_LM)),
        "gpt2": lambda: T.GPT2LMHeadModel(T.GPT2Config(n_embd=8, n_layer=2, n_head=2, vocab_size=32, n_positions=8)),
        "mixtral": lambda: T.MixtralForCausalLM(
            T.MixtralConfig(vocab_size=32, num_local_experts=3, num_experts_per_tok=1, **_LM)
        ),
        "qwen2_moe": lambda: T.Qwen2MoeForCausalLM(
            T.Qwen2MoeConfig(
                vocab_size=32,
                num_experts=3,
                num_experts_per_tok=1,
                moe_intermediate_size=8,
                shared_expert_intermediate_size=8,
                **_LM,
            )
        ),
        "t5": lambda: T.T5ForConditionalGeneration(T.T5Config(**t5)),
        "switch": lambda: T.SwitchTransformersForConditionalGeneration(
            T.SwitchTransformersConfig(**t5, num_experts=2, encoder_sparse_step=1, decoder_sparse_step=1)
        ),
        "bart": lambda: T.BartForConditionalGeneration(
            T.BartConfig(vocab_size=32, max_position_embeddings=16, **seq2seq)
        ),
        "whisper": lambda: T.WhisperForConditionalGeneration(
            T.WhisperConfig(vocab_size=32, num_mel_bins=4, max_source_positions=8, max_target_positions=8, **seq2seq)
        ),
        "bert": lambda: T.BertModel(T.BertConfig(vocab_size=32, **encoder)),
        "vit": lambda: T.ViTForImageClassification(T.ViTConfig(image_size=8, patch_size=4, num_labels=2, **encoder)),
        "clip": lambda: tiny_clip(8),
        "unet": tiny_unet,
        "sd3": lambda: D.SD3Transformer2DModel(
            sample_size=8,
            patch_size=2,
            in_channels=4,
            num_layers=2,
            attention_head_dim=4,
            num_attention_heads=2,
            joint_attention_dim=8,
            caption_projection_dim=8,
            pooled_projection_dim=8,
            out_channels=4,
            pos_embed_max_size=8,
        ),
        "flux": lambda: D.FluxTransformer2DModel(
            patch_size=1,
            in_channels=4,
            num_layers=2,
            num_single_layers=2,
            attention_head_dim=4,
            num_attention_heads=2,
            joint_attention_dim=8,
            pooled_projection_dim=8,
            axes_dims_rope=(2, 2),
        ),
        "qwen_image": lambda: D.QwenImageTransformer2DModel(
            patch_size=2,
            in_channels=8,
            out_channels=2,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=12,
            axes_dims_rope=(2, 2, 4),
        ),
    }
    return builders[model]()


@cache
def names_of(model: str) -> tuple[str, ...]:
    return tuple(module_names(tiny_model(model)))


MODELS = ("llama", "gpt2", "mixtral", "qwen2_moe", "t5", "switch", "bart", "whisper", "bert", "vit", "clip", "unet",
          "sd3", "flux")  # fmt: skip


def blocks(names) -> dict[str, list[str]]:
    """The names of each block (those with a layer index), in the model's order."""
    grouped: dict[str, list[str]] = {}
    for name in names:
        if layer_index(name) is not None:
            grouped.setdefault(block_of(name), []).append(name)
    return grouped


def types_of(model: str, block: str) -> list[str]:
    """The module types (decided over the whole model) of one block's layers, in the model's order."""
    names = names_of(model)
    types = module_types(names)
    return [types[name] for name in names if block_of(name) == block]


# -- decoder-only models: the type is the last segment --------------------------------------------------------
@pytest.mark.parametrize("model", ["llama", "mixtral"])
def test_decoder_only_types_are_the_last_segment(model):
    names = names_of(model)
    last = {name: name.split(".")[-1].split("[")[0] for name in names}
    assert module_types(names) == last
    assert all(module_type(name) == last[name] for name in names)


def test_gpt2s_two_c_proj_are_told_apart():
    # GPT-2's block repeats c_proj (attention's output and the MLP's): the one decoder-only model qualified here
    assert types_of("gpt2", "transformer.h.1") == ["c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"]


def test_decoder_only_layer_index_is_the_block():
    names = names_of("llama")
    assert {name: layer_index(name) for name in names if "layers" in name} == {
        name: int(name.split(".")[2]) for name in names if "layers" in name
    }
    assert types_of("llama", "model.layers.1") == [f"{m}_proj" for m in ("q", "k", "v", "o", "gate", "up", "down")]


def test_fused_expert_slices_have_the_parameter_type_the_expert_and_the_blocks_index():
    names = names_of("mixtral")
    assert "model.layers.1.mlp.experts.gate_up_proj[2]" in names  # transformers 5 fuses experts into 3-D parameters
    name = "model.layers.1.mlp.experts.gate_up_proj[2]"
    assert (layer_index(name), expert_index(name), module_type(name)) == (1, 2, "gate_up_proj")
    assert block_of(name) == "model.layers.1"
    assert [expert_index(n) for n in names if n.startswith("model.layers.0.mlp.experts.down_proj")] == [0, 1, 2]
    assert all(expert_index(n) is None for n in names if "experts" not in n)


def test_a_shared_expert_beside_the_experts_qualifies_the_repeated_type():
    types = module_types(names_of("qwen2_moe"))
    assert types["model.layers.0.mlp.experts.down_proj[1]"] == "experts.down_proj"
    assert types["model.layers.0.mlp.shared_expert.down_proj"] == "shared_expert.down_proj"
    # types the block holds once stay plain
    assert types["model.layers.0.mlp.experts.gate_up_proj[1]"] == "gate_up_proj"
    assert types["model.layers.0.mlp.shared_expert.up_proj"] == "up_proj"
    assert types["model.layers.0.self_attn.q_proj"] == "q_proj"


def test_expert_modules_numbered_in_a_module_list():
    # transformers 4's MoE layout (and PEFT adapters trained on it): one module per expert
    name = "model.layers.4.mlp.experts.3.down_proj"
    assert (layer_index(name), expert_index(name), module_type(name)) == (4, 3, "down_proj")
    assert block_of(name) == "model.layers.4"
    names = [f"model.layers.4.mlp.experts.{e}.{m}" for e in range(12) for m in ("gate_proj", "up_proj", "down_proj")]
    assert set(module_types(names).values()) == {"gate_proj", "up_proj", "down_proj"}  # experts are one parent
    assert sorted(reversed(names), key=model_order_key) == names  # experts.2 before experts.10
    # Switch Transformers (transformers 5): experts.expert_N inside a T5 block's sub-layer
    switch = "encoder.block.1.layer.1.mlp.experts.expert_1.wo"
    assert switch in names_of("switch")
    assert (layer_index(switch), expert_index(switch), module_types(names_of("switch"))[switch]) == (1, 1, "wo")


# -- encoder-decoder models: the block is block.N; self- and cross-attention are told apart ---------------------
def test_t5_block_index_and_attention_types():
    names = names_of("t5")
    q = "decoder.block.1.layer.1.EncDecAttention.q"
    assert q in names and layer_index(q) == 1 and block_of(q) == "decoder.block.1"
    assert module_type(q) == "q"  # one name alone: its last segment
    self_attention, cross_attention = [f"SelfAttention.{m}" for m in "qkvo"], [f"EncDecAttention.{m}" for m in "qkvo"]
    assert types_of("t5", "decoder.block.1") == [*self_attention, *cross_attention, "wi", "wo"]
    # the encoder's attention has no cross-attention beside it, but its type is the same as the decoder's
    assert types_of("t5", "encoder.block.0") == [*self_attention, "wi", "wo"]
    assert {layer_index(n) for n in names if "block" in n} == {0, 1}  # never the sub-layer's 0, 1, 2


@pytest.mark.parametrize("model", ["bart", "whisper"])
def test_bart_and_whisper_self_and_encoder_attention(model):
    prefix = "model.decoder.layers.1"
    projections = ("k_proj", "v_proj", "q_proj", "out_proj")  # as these models declare them
    assert types_of(model, prefix) == [
        *(f"self_attn.{m}" for m in projections),
        *(f"encoder_attn.{m}" for m in projections),
        "fc1",
        "fc2",
    ]
    assert types_of(model, "model.encoder.layers.0")[2] == "self_attn.q_proj"
    assert layer_index(f"{prefix}.encoder_attn.q_proj") == 1


def test_a_decoder_only_self_attention_is_not_qualified_by_a_set_without_cross_attention():
    names = [*names_of("llama"), *(f"model.layers.{i}.self_attn.{m}" for i in (5, 6) for m in ("q_proj", "o_proj"))]
    assert module_types(names)["model.layers.5.self_attn.q_proj"] == "q_proj"


# -- vision encoders --------------------------------------------------------------------------------------------
def test_bert_style_blocks_qualify_their_three_dense_layers():
    # BERT keeps transformers 4's ViT layout (ViT's own is attention.attention.query, …)
    types = module_types(names_of("bert"))
    bert = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
    assert types_of("bert", "encoder.layer.1") == bert
    assert types["pooler.dense"] == "pooler.dense"  # a qualified type is qualified outside blocks too
    vit4 = [
        f"vit.encoder.layer.7.{m}"
        for m in (
            "attention.attention.query",
            "attention.attention.key",
            "attention.attention.value",
            "attention.output.dense",
            "intermediate.dense",
            "output.dense",
        )
    ]
    assert list(module_types(vit4).values()) == bert
    assert {layer_index(n) for n in vit4} == {7}
    assert sorted(reversed(vit4), key=model_order_key) == vit4
    assert module_type_order(types) == [*bert, "pooler.dense"]


def test_vit_in_transformers_5_has_plain_types():
    assert types_of("vit", "vit.layers.1") == ["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"]
    assert layer_index("vit.layers.1.mlp.fc2") == 1


# -- diffusion models -------------------------------------------------------------------------------------------
UNET_BLOCK = "down_blocks.0.attentions.0.transformer_blocks.0"


def test_unet_transformer_block_types():
    attention = ("to_q", "to_k", "to_v", "to_out.0")
    assert types_of("unet", UNET_BLOCK) == [
        *(f"attn1.{m}" for m in attention),
        *(f"attn2.{m}" for m in attention),
        "net.0.proj",  # ff.net.0.proj: the block holds it once
        "net.2",
    ]
    assert types_of("unet", "up_blocks.1.resnets.1") == ["conv1", "time_emb_proj", "conv2", "conv_shortcut"]
    assert layer_index(f"{UNET_BLOCK}.ff.net.2") == 0 and layer_index("up_blocks.1.attentions.1.proj_out") == 1


def test_kohya_flattened_unet_names_read_like_the_module_paths():
    # (outside blocks a flattened name cannot tell a module's own number from a block's: time_embedding_linear_1)
    for name in (n for n in names_of("unet") if layer_index(n) is not None):
        kohya = "lora_unet_" + name.replace(".", "_")
        assert layer_index(kohya) == layer_index(name), name
        assert block_of(kohya) == "lora_unet_" + block_of(name).replace(".", "_")
        assert module_type(kohya) == name[len(block_of(name)) + 1 :].replace(".", "_"), name
    kohya = f"lora_unet_{UNET_BLOCK.replace('.', '_')}_attn1_to_q"
    assert module_type(kohya) == "attn1_to_q" and module_types([kohya]) == {kohya: "attn1_to_q"}


def test_sd3_and_flux_dit_blocks():
    assert types_of("sd3", "transformer_blocks.1") == [
        "norm1.linear",
        "norm1_context.linear",
        "to_q",
        "to_k",
        "to_v",
        "add_k_proj",
        "add_v_proj",
        "add_q_proj",
        "to_out.0",
        "ff.net.0.proj",
        "ff.net.2",  # the last block has no ff_context, the first one does:
    ]
    assert "ff_context.net.2" in types_of("sd3", "transformer_blocks.0")
    single = ["norm.linear", "proj_mlp", "proj_out", "to_q", "to_k", "to_v"]
    assert types_of("flux", "single_transformer_blocks.1") == single
    assert layer_index("single_transformer_blocks.1.proj_mlp") == 1
    flux = module_types(names_of("flux"))
    assert flux["time_text_embed.timestep_embedder.linear_1"] == "timestep_embedder.linear_1"  # no block: one group
    assert flux["transformer_blocks.0.attn.to_add_out"] == "to_add_out"


def test_a_modulation_numbered_inside_its_block_keeps_the_blocks_index():
    """Qwen-Image's ``transformer_blocks.0.img_mod.1`` (a Sequential(SiLU, Linear)): block 0, type img_mod.1 —
    its kohya form too; a trailing number with no block number before it is the module's own (the original
    Wan's and Z-Image's embedders)."""
    names = names_of("qwen_image")
    types = module_types(names)
    for block in (0, 1):
        for stream in ("img_mod.1", "txt_mod.1"):
            name = f"transformer_blocks.{block}.{stream}"
            assert name in names and (layer_index(name), types[name]) == (block, stream)
    kohya = "lora_unet_transformer_blocks_1_img_mod_1"
    assert (layer_index(kohya), module_type(kohya)) == (1, "img_mod_1")
    assert layer_index("transformer_blocks.1.attn.to_out.0") == 1
    for top in ("img_emb.proj.3", "text_embedding.2", "time_embedding.0", "time_projection.1", "cap_embedder.1",
                "t_embedder.mlp.0"):  # fmt: skip
        assert layer_index(top) is None, top
    assert layer_index("blocks.7.ffn.2") == 7 and module_type("blocks.7.ffn.2") == "ffn.2"


# -- order within a block: the model's own ---------------------------------------------------------------------
# models whose blocks declare attention's projections q, k, v: rankscope's order is theirs exactly
EXACT = ("llama", "gpt2", "mixtral", "qwen2_moe", "t5", "switch", "bert", "vit", "unet", "flux")


@pytest.mark.parametrize("model", EXACT)
def test_model_order_within_a_block_is_named_modules_order(model):
    for block, names in blocks(names_of(model)).items():
        assert sorted(reversed(names), key=model_order_key) == names, block


def _qkv(names: list[str], order: tuple[str, ...]) -> list[str]:
    """``names`` with the projections named in ``order`` put in that order where they stand."""
    places = [i for i, n in enumerate(names) if n.rsplit(".", 1)[-1] in order]
    wanted = sorted((names[i] for i in places), key=lambda n: order.index(n.rsplit(".", 1)[-1]))
    out = list(names)
    for i, name in zip(places, wanted, strict=True):
        out[i] = name
    return out


@pytest.mark.parametrize("model", ["bart", "whisper", "clip"])
def test_attention_that_declares_k_v_q_is_read_q_k_v(model):
    # CLIP, BART and Whisper declare k_proj, v_proj, q_proj: everything else in their order, q, k, v in this one
    for block, names in blocks(names_of(model)).items():
        expected = []
        for parent in dict.fromkeys(n.rsplit(".", 1)[0] for n in names):
            expected += _qkv([n for n in names if n.rsplit(".", 1)[0] == parent], ("q_proj", "k_proj", "v_proj"))
        assert sorted(reversed(names), key=model_order_key) == expected, block


def test_sd3_attention_is_read_in_fluxs_order():
    # SD3 and Flux declare the same projections in two orders; rankscope reads Flux's (the image stream's, then
    # the context stream's)
    names = blocks(names_of("sd3"))["transformer_blocks.0"]
    attn = [
        f"transformer_blocks.0.attn.{m}"
        for m in ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
    ]
    assert sorted(reversed(names), key=model_order_key) == [*names[:2], *attn, *names[-4:]]
    assert set(attn) <= set(names)


@pytest.mark.parametrize("model", MODELS)
def test_types_are_stable_across_blocks_and_ordered_like_a_block(model):
    names = names_of(model)
    types = module_types(names)
    # one block's types never collide: each layer of a block is told apart by its type (and expert)
    for block, members in blocks(names).items():
        keys = [(types[n], expert_index(n)) for n in members]
        assert len(set(keys)) == len(keys), block
    order = module_type_order(types)
    assert sorted(set(types.values())) == sorted(order)
    for members in blocks(names).values():  # a block's types appear in module_type_order's order
        seen = list(dict.fromkeys(types[n] for n in sorted(members, key=model_order_key)))
        assert seen == [t for t in order if t in seen]


def test_records_carry_the_checkpoints_types_and_the_expert(tmp_path):
    import rankscope

    from .factories import lora_config, random_factors, write_lora

    t5 = [n for n in names_of("t5") if n.endswith((".q", ".v"))]
    moe = [f"model.layers.0.mlp.experts.{e}.down_proj" for e in range(2)]
    for folder, names in (("t5", t5), ("moe", moe)):
        write_lora(tmp_path / folder, {n: random_factors(8, 8, 2, i) for i, n in enumerate(names)}, lora_config(r=2))
    analysis = rankscope.analyze(rankscope.load(tmp_path / "t5"))
    got = {record.name: record.module_type for record in analysis}
    assert got["decoder.block.1.layer.1.EncDecAttention.q"] == "EncDecAttention.q"
    assert got["encoder.block.0.layer.0.SelfAttention.v"] == "SelfAttention.v"
    # a layer filter does not rename: types are decided over the whole checkpoint
    encoder = rankscope.analyze(rankscope.load(tmp_path / "t5"), layers="^encoder")
    assert {r.module_type for r in encoder} == {"SelfAttention.q", "SelfAttention.v"}
    assert set(analysis.summary()["by_module"]) == {
        "SelfAttention.q",
        "SelfAttention.v",
        "EncDecAttention.q",
        "EncDecAttention.v",
    }
    layers = rankscope.analyze(rankscope.load(tmp_path / "moe")).to_dict()["layers"]
    assert [(r["layer_index"], r["expert_index"], r["module_type"]) for r in layers] == [
        (0, 0, "down_proj"),
        (0, 1, "down_proj"),
    ]
    assert "expert_index" not in analysis.to_dict()["layers"][0]  # only MoE layers have the field
