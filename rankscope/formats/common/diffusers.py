"""diffusers' names for LoRA factors, read by the LoRA reader beside PEFT's ``lora_A``/``lora_B``.

diffusers still loads three older layouts, each a pair (down = A (r, in[, *k]), up = B (out, r[, 1…])):

- ``<module>.lora.down.weight`` / ``.lora.up.weight`` — what ``convert_state_dict_to_diffusers`` writes for a
  UNet's ``to_q``/``to_k``/``to_v``/``to_out.0`` (its other modules keep PEFT's names, so one file mixes both);
- ``<module>.lora_linear_layer.down.weight`` / ``.up.weight`` — the same for a text encoder's projections;
- ``<block>.processor.to_q_lora.down.weight`` (``to_k_lora``, ``to_v_lora``, ``to_out_lora``,
  ``add_k_proj_lora``, ``add_v_proj_lora``) — the attention processors of diffusers ≤ 0.20, whose module is
  ``<block>.to_q`` (``to_out_lora`` → ``<block>.to_out.0``, as diffusers' ``UNET_TO_DIFFUSERS`` maps it); in a
  text encoder (keys under ``text_encoder…``) ``<block>.q_proj`` (``k_proj``, ``v_proj``, ``to_out_lora`` →
  ``out_proj``), as ``DIFFUSERS_OLD_TO_PEFT`` maps it.

and XLabs' Flux LoRA (x-flux), which diffusers converts on load:

- ``[diffusion_model.]double_blocks.N.processor.{qkv,proj}_lora{1,2}.{down,up}.weight`` — lora1 on the image
  stream, lora2 on the text stream: the module is the original Flux model's ``double_blocks.N.img_attn.qkv``
  (``txt_attn``; ``proj``), one LoRA on the fused q, k, v rows, as kohya's Flux files name it;
- ``single_blocks.N.processor.{qkv,proj}_lora.{down,up}.weight`` — on a single block's attention alone (not
  its whole ``linear1``/``linear2``): named as stored, ``single_blocks.N.processor.qkv_lora``.

ΔW = s·up·down as for PEFT's LoRA; α from the file's ``lora_adapter_metadata`` where it gives one, else from an
``.alpha`` tensor beside the pair (``<module>.alpha``, diffusers' name for it, or
``<block>.processor.to_q_lora.alpha``), else s = 1 (diffusers loads such files with α = r).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_PAIR = re.compile(r"^(?P<stored>.+)\.(?P<layout>lora|lora_linear_layer)\.(?P<side>down|up)\.weight$")
_PROCESSOR = re.compile(
    r"^(?P<block>.+?)\.(?:processor\.)?(?P<target>to_q|to_k|to_v|to_out|add_k_proj|add_v_proj)_lora"
    r"\.(?P<side>down|up)\.weight$"
)
_XLABS = re.compile(
    r"^(?P<prefix>(?:diffusion_model\.)?)(?P<blocks>double_blocks|single_blocks)\.(?P<index>\d+)\.processor\."
    r"(?P<target>qkv|proj)_lora(?P<stream>[12]?)\.(?P<side>down|up)\.weight$"
)
_XLABS_STREAM = {"1": "img_attn", "2": "txt_attn"}
_ROLE = {"down": "A", "up": "B"}
_UNET_TARGET = {"to_out": "to_out.0"}  # diffusers' UNET_TO_DIFFUSERS
_TEXT_ENCODER_TARGET = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}  # …OLD_TO_PEFT
_TEXT_ENCODER = re.compile(r"^text_encoder(_\d+)?\.")  # diffusers routes keys to a text encoder by this prefix


@dataclass(frozen=True)
class AliasKey:
    """A diffusers factor key: the module it adapts (a base-model path), A or B, and the stored prefix that an
    ``.alpha`` beside it may be named after (besides the module's own ``<module>.alpha``, diffusers' name)."""

    module: str
    role: str
    stored: str


def split_key(key: str) -> AliasKey | None:
    """The parts of a diffusers-style LoRA factor key, or None for any other key.

    >>> split_key("unet.mid.attn1.processor.to_out_lora.up.weight")
    AliasKey(module='unet.mid.attn1.to_out.0', role='B', stored='unet.mid.attn1.processor.to_out_lora')
    >>> split_key("text_encoder.layers.0.self_attn.to_q_lora.down.weight").module
    'text_encoder.layers.0.self_attn.q_proj'
    """
    match = _PROCESSOR.match(key)
    if match is not None:
        targets = _TEXT_ENCODER_TARGET if _TEXT_ENCODER.match(key) else _UNET_TARGET
        target = targets.get(match["target"], match["target"])
        return AliasKey(f"{match['block']}.{target}", _ROLE[match["side"]], key.rsplit(".", 2)[0])
    match = _PAIR.match(key)
    if match is not None:
        return AliasKey(match["stored"], _ROLE[match["side"]], match["stored"])
    match = _XLABS.match(key)
    if match is not None and (match["blocks"] == "double_blocks") == bool(match["stream"]):
        stored = key.rsplit(".", 2)[0]
        block = f"{match['prefix']}{match['blocks']}.{match['index']}"
        module = f"{block}.{_XLABS_STREAM[match['stream']]}.{match['target']}" if match["stream"] else stored
        return AliasKey(module, _ROLE[match["side"]], stored)
    return None


def partner_key(key: str) -> str | None:
    """The key a diffusers-style factor's missing partner would have (``….lora.down.weight`` ↔ ``….lora.up.weight``)."""
    if split_key(key) is None:
        return None
    head, side, tail = key.rsplit(".", 2)
    return f"{head}.{'up' if side == 'down' else 'down'}.{tail}"
