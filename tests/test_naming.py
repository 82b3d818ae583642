from rankscope.core.naming import layer_index, layer_name, module_type, natural_key


def test_layer_names_are_base_model_module_paths():
    assert layer_name("base_model.model.model.layers.0.self_attn.q_proj") == "model.layers.0.self_attn.q_proj"
    assert layer_name("model.layers.0.self_attn.q_proj") == "model.layers.0.self_attn.q_proj"
    assert layer_name("module._orig_mod.base_model.model.transformer.h.0.attn.c_attn") == "transformer.h.0.attn.c_attn"
    assert layer_name("module._orig_mod.transformer.h.1.mlp.c_fc") == "transformer.h.1.mlp.c_fc"
    assert layer_name("lora_unet_down_blocks_0_attentions_0") == "lora_unet_down_blocks_0_attentions_0"


def test_natural_order_index_and_module_type():
    names = ["model.layers.10.q_proj", "model.layers.2.q_proj", "model.layers.1.v_proj", "model.layers.1.q_proj"]
    assert sorted(names, key=natural_key) == [
        "model.layers.1.q_proj",
        "model.layers.1.v_proj",
        "model.layers.2.q_proj",
        "model.layers.10.q_proj",
    ]
    assert layer_index("model.layers.7.self_attn.q_proj") == 7
    assert layer_index("lm_head") is None
    assert module_type("model.layers.7.self_attn.q_proj") == "q_proj"


def test_kohya_names_give_index_and_module_type():
    text = "lora_te_text_model_encoder_layers_11_self_attn_q_proj"
    assert layer_index(text) == 11 and module_type(text) == "self_attn_q_proj"
    unet = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    assert layer_index(unet) == 0 and module_type(unet) == "attn1_to_q"
    assert module_type("lora_unet_conv_in") == "conv_in" and layer_index("lora_unet_conv_in") is None
    assert module_type("lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_out_0") == "attn1_to_out_0"


def test_model_order_is_block_then_the_blocks_own_module_order():
    from rankscope.core.naming import model_order_key

    names = [
        "model.layers.10.self_attn.q_proj",
        "model.layers.2.mlp.down_proj",
        "model.layers.2.self_attn.v_proj",
        "model.layers.2.mlp.up_proj",
        "model.layers.2.self_attn.q_proj",
        "model.layers.2.mlp.gate_proj",
        "model.layers.2.self_attn.o_proj",
        "model.layers.2.self_attn.k_proj",
    ]
    assert sorted(names, key=model_order_key) == [
        "model.layers.2.self_attn.q_proj",
        "model.layers.2.self_attn.k_proj",
        "model.layers.2.self_attn.v_proj",
        "model.layers.2.self_attn.o_proj",
        "model.layers.2.mlp.gate_proj",
        "model.layers.2.mlp.up_proj",
        "model.layers.2.mlp.down_proj",
        "model.layers.10.self_attn.q_proj",
    ]


def test_the_issues_examples():
    from rankscope.core.naming import expert_index, module_types

    t5 = [f"{side}.block.5.layer.0.SelfAttention.q" for side in ("encoder", "decoder")]
    t5.append("decoder.block.5.layer.1.EncDecAttention.q")
    assert [layer_index(n) for n in t5] == [5, 5, 5]
    assert list(module_types(t5).values()) == ["SelfAttention.q", "SelfAttention.q", "EncDecAttention.q"]
    assert module_types(t5[:1]) == {t5[0]: "q"}  # an encoder alone repeats nothing
    seq2seq = ["decoder.layers.3.self_attn.q_proj", "decoder.layers.3.encoder_attn.q_proj"]
    assert list(module_types(seq2seq).values()) == ["self_attn.q_proj", "encoder_attn.q_proj"]
    assert module_types(["model.layers.3.self_attn.q_proj"]) == {"model.layers.3.self_attn.q_proj": "q_proj"}
    moe = "model.layers.4.mlp.experts.3.down_proj"
    assert (layer_index(moe), module_type(moe), expert_index(moe)) == (4, "down_proj", 3)
    fused = "model.layers.4.mlp.experts.gate_up_proj[7]"
    assert (layer_index(fused), module_type(fused), expert_index(fused)) == (4, "gate_up_proj", 7)
    assert expert_index("model.layers.4.mlp.down_proj") is None


def test_kohya_t5_names_drop_the_sub_layer():
    name = "lora_te3_encoder_block_5_layer_1_DenseReluDense_wo"
    assert (layer_index(name), module_type(name)) == (5, "DenseReluDense_wo")


def test_the_same_types_whatever_the_blocks_are_numbered():
    from rankscope.core.naming import module_types

    block = ["self_attn.q_proj", "encoder_attn.q_proj", "fc1"]
    one = module_types(f"model.decoder.layers.0.{m}" for m in block)
    many = module_types(f"model.decoder.layers.{i}.{m}" for i in range(12) for m in block)
    assert set(one.values()) == set(many.values()) == {"self_attn.q_proj", "encoder_attn.q_proj", "fc1"}
