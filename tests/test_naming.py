from rankscope.naming import layer_index, layer_name, module_type, natural_key


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
