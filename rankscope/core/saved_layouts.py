"""The names transformers ≥ 5 saves a model's weights under, where they differ from the modules in memory.

transformers loads older checkpoints through its conversion mapping and saves them back in the older layout,
while PEFT names an adapter's layers as the modules are in memory: ``--base`` finds such a layer's weight by
renaming the in-memory name to the saved one. Each family below is one model family's renamings, applied in order
(a ViT name needs several at once), and two families in order where one model nests another (LLaVA's vision
tower around a ViT); a family is only ever tried after the name as it is was not found, and its result only taken
where the base holds it. Found with transformers 5.23's ``save_pretrained`` over 216 tiny models,
each checked parameter by parameter (tests/test_base_layouts.py checks one model of each family).
"""

from __future__ import annotations

import re
from collections.abc import Iterator

_ATTENTION = (("q", "query"), ("k", "key"), ("v", "value"))
_VIT = (  # ViT, DeiT, BEiT, ViTMAE, ViTMSN: encoder.layer.N with the attention's and the MLP's old names
    (r"(^|\.)layers\.(\d+)\.", r"\1encoder.layer.\2."),
    *((rf"\.attention\.{short}_proj\.", f".attention.attention.{long}.") for short, long in _ATTENTION),
    (r"\.attention\.o_proj\.", ".attention.output.dense."),
    (r"\.mlp\.fc1\.", ".intermediate.dense."),
    (r"\.mlp\.fc2\.", ".output.dense."),
)
_SWIN = (
    *((rf"\.attention\.{short}_proj\.", f".attention.self.{long}.") for short, long in _ATTENTION),
    (r"\.attention\.o_proj\.", ".attention.output.dense."),
    (
        r"\.attention\.relative_position_bias\.relative_position_bias_table$",
        ".attention.self.relative_position_bias_table",
    ),
    (r"\.mlp\.fc1\.", ".intermediate.dense."),
    (r"\.mlp\.fc2\.", ".output.dense."),
)
RENAMINGS: tuple[tuple[tuple[str, str], ...], ...] = (
    # LLaVA, Gemma 3, PaliGemma, Mistral 3, InternVL … (ForConditionalGeneration): language_model.model.…
    ((r"^model\.language_model\.", "language_model.model."),),
    ((r"^model\.language_model\.", "model."),),
    ((r"^language_model\.", "language_model.model."),),  # their bare *Model classes
    ((r"^model\.(vision_tower|visual|multi_modal_projector|audio_tower)\.", r"\1."),),  # + Qwen2-VL, Qwen2-Audio
    ((r"^model\.vision_model\.", "vision_model."),),  # Mllama
    ((r"^model\.(encoder|projector)\.", r"\1."),),  # Granite Speech
    ((r"^model\.vision_embed_tokens\.", "vision_embed_tokens."),),  # Fuyu
    ((r"^lm_head\.", "language_model.lm_head."),),
    ((r"\.mlp\.gate\.weight$", ".block_sparse_moe.gate.weight"),),  # Mixtral's router
    ((r"\.mlp\.router\.weight$", ".block_sparse_moe.gate.weight"),),  # PhiMoE's
    ((r"\.experts\.gate_up_proj$", ".input_linear.weight"),),  # GraniteMoE's experts and router
    ((r"\.experts\.down_proj$", ".output_linear.weight"),),
    ((r"\.router\.weight$", ".router.layer.weight"),),
    _VIT,
    ((r"^backbone\.beit\.", "backbone."), *_VIT),  # ZoeDepth's BEiT backbone
    # ViTMAE's decoder: transformers 5.23 saves decoder_layers.N as decoder_encoder.layer.N (its ViT renaming
    # applied inside the name) and reloads it so
    ((r"\.decoder_layers\.(\d+)\.", r".decoder_encoder.layer.\1."), *_VIT[1:]),
    (  # Dinov2: the attention's old names only
        *((rf"\.attention\.{short}_proj\.", f".attention.attention.{long}.") for short, long in _ATTENTION),
        (r"\.attention\.o_proj\.", ".attention.output.dense."),
    ),
    _SWIN,
    ((r"\.encoder\.swin\.", ".encoder."), *_SWIN),  # Mask2Former's Swin backbone
    (  # Segformer
        (r"(^|\.)stages\.(\d+)\.patch_embeddings\.", r"\1encoder.patch_embeddings.\2."),
        (r"(^|\.)stages\.(\d+)\.blocks\.(\d+)\.", r"\1encoder.block.\2.\3."),
        (r"(^|\.)stages\.(\d+)\.layer_norm\.", r"\1encoder.layer_norm.\2."),
        (r"\.layernorm_before\.", ".layer_norm_1."),
        (r"\.layernorm_after\.", ".layer_norm_2."),
        *((rf"\.attention\.{short}_proj\.", f".attention.self.{long}.") for short, long in _ATTENTION),
        (r"\.attention\.o_proj\.", ".attention.output.dense."),
        (r"\.attention\.sequence_reduction\.sequence_reduction\.", ".attention.self.sr."),
        (r"\.attention\.sequence_reduction\.layer_norm\.", ".attention.self.layer_norm."),
        (r"\.mlp\.fc1\.", ".mlp.dense1."),
        (r"\.mlp\.fc2\.", ".mlp.dense2."),
        (r"^decode_head\.linear_projections\.", "decode_head.linear_c."),
    ),
    (  # DETR-style encoders and decoders (RT-DETR, MaskFormer)
        (r"\.encoder\.aifi\.(\d+)\.", r".encoder.encoder.\1."),
        (r"\.(self_attn|encoder_attn)\.o_proj\.", r".\1.out_proj."),
        (r"\.mlp\.(fc1|fc2)\.", r".\1."),
    ),
    ((r"\.LayerNorm\.weight$", ".LayerNorm.gamma"), (r"\.LayerNorm\.bias$", ".LayerNorm.beta")),  # ESM
    (  # VideoMAE's query and value biases
        (r"\.attention\.attention\.query\.bias$", ".attention.attention.q_bias"),
        (r"\.attention\.attention\.value\.bias$", ".attention.attention.v_bias"),
    ),
    ((r"^lm_head\.", "embed_out."),),  # GPT-NeoX
)
_COMPILED = tuple(tuple((re.compile(pattern), replacement) for pattern, replacement in family) for family in RENAMINGS)


def _renamed(family: tuple, name: str) -> tuple[str, int]:
    renamed = 0
    for pattern, replacement in family:
        name, count = pattern.subn(replacement, name)
        renamed += count
    return name, renamed


def saved_names(name: str) -> Iterator[str]:
    """Each name ``name`` (an in-memory parameter path) may be saved under: one per family that renames it, then
    one per two such families applied in order — a model that nests one renamed family in another (LLaVA's
    ``model.vision_tower.`` around a ViT's ``layers.N.attention.q_proj``)."""
    renaming = []
    for family in _COMPILED:
        saved, count = _renamed(family, name)
        if count:
            yield saved
            renaming.append((family, saved))
    for position, (_, saved) in enumerate(renaming):
        for inner, _ in renaming[position + 1 :]:
            twice, count = _renamed(inner, saved)
            if count:
                yield twice


__all__ = ["RENAMINGS", "saved_names"]
