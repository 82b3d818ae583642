"""Layer names: the module path in the base model (DESIGN.md, "Names of layers")."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

_PEFT_PREFIX = "base_model.model."
_WRAPPER_SEGMENTS = ("module.", "_orig_mod.")
_INNER_WRAPPER = re.compile(r"(\.base_layer)+\.")
_INT_SEGMENT = re.compile(r"^\d+$")
_NATURAL_CHUNK = re.compile(r"(\d+)")
_KOHYA_PREFIX = re.compile(r"^(lora|lycoris)_(unet|te\d*|transformer)_")


def layer_name(key_prefix: str) -> str:
    """Map a stored module path to the base model's module path.

    Everything up to and including ``base_model.model.`` is dropped, then leading ``module.`` (DDP) and
    ``_orig_mod.`` (torch.compile) segments, and inner ``base_layer`` segments: PEFT nests a LoRA inside another
    wrapper only for ``nn.MultiheadAttention``'s out-projection (``attn.base_layer.out_proj`` is the base model's
    ``attn.out_proj``). Names that never had these stay as stored.
    """
    name = key_prefix
    cut = name.rfind(_PEFT_PREFIX)
    if cut >= 0:
        name = name[cut + len(_PEFT_PREFIX) :]
    changed = True
    while changed:
        changed = False
        for segment in _WRAPPER_SEGMENTS:
            if name.startswith(segment):
                name = name[len(segment) :]
                changed = True
    return _INNER_WRAPPER.sub(".", name)


def checkpoint_labels(paths: Sequence[str | Path]) -> list[str]:
    """Short distinct names for checkpoints: the shortest path suffix that tells them apart.

    ``runs/a/final``, ``runs/b/final`` → ``a/final``, ``b/final``; ``lora/``, ``bora/`` → ``lora``, ``bora``;
    the same path twice → numbered (``1: lora``, ``2: lora``).
    """
    parts = [Path(path).absolute().parts for path in paths]
    for depth in range(1, max((len(p) for p in parts), default=1) + 1):
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [f"{i}: {Path(path).name or path}" for i, path in enumerate(paths, 1)]


# the order readers expect within a block (attention, then MLP), where alphabetical order would put mlp first
MODULE_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "query", "key",
                "value", "c_attn", "c_fc", "c_proj", "fc1", "fc2", "lm_head")  # fmt: skip
_MODULE_RANK = {name: rank for rank, name in enumerate(MODULE_ORDER)}


def model_order_key(name: str) -> tuple:
    """Sort key for layers in model order: by block (``layers.2`` before ``layers.10``), then by the module's
    place in a block (q, k, v, o, gate, up, down; other types after, by name)."""
    segments, separator = _segments(name)
    position = _block_position(segments, separator)
    cut = position + 1 if position is not None else 0
    block, rest = separator.join(segments[:cut]), separator.join(segments[cut:])
    return (natural_key(block), _MODULE_RANK.get(module_type(name), len(_MODULE_RANK)), natural_key(rest))


def natural_key(name: str) -> tuple:
    """Sort key that orders ``layers.2`` before ``layers.10``."""
    return tuple(int(chunk) if chunk.isdigit() else chunk for chunk in _NATURAL_CHUNK.split(name))


def _segments(name: str) -> tuple[list[str], str]:
    """Dotted module paths split on dots; kohya's flattened names (``lora_te_…_layers_0_self_attn_q_proj``,
    no dots) on underscores."""
    if "." not in name and "_" in name:
        return name.split("_"), "_"
    return name.split("."), "."


# containers whose integer index numbers a module's own parts, not a block: diffusers' ``to_out.0`` and
# FeedForward ``net.0.proj``/``net.2``, Wan's ``ffn.0``, Flux/BFL's ``img_mlp.2``, ldm's ``in_layers.2``, DiT's
# ``adaLN_modulation.1`` (kohya's flattened forms end the same way: ``…_to_out_0``)
_PART_CONTAINERS = ("to_out", "net", "ffn", "img_mlp", "txt_mlp", "in_layers", "out_layers", "emb_layers",
                    "time_embed", "adaLN_modulation")  # fmt: skip


def _is_part_index(segments: list[str], i: int, separator: str) -> bool:
    before = separator.join(segments[:i])
    return any(before == c or before.endswith(separator + c) for c in _PART_CONTAINERS)


def _block_position(segments: list[str], separator: str) -> int | None:
    """The position of the layer index: the last integer segment that does not number a module's own parts."""
    for i in range(len(segments) - 1, -1, -1):
        if _INT_SEGMENT.match(segments[i]) and not _is_part_index(segments, i, separator):
            return i
    return None


def layer_index(name: str) -> int | None:
    """The last integer segment that is a block's (``model.layers.7.self_attn.q_proj`` → 7;
    ``lora_te_…_layers_7_…_q_proj`` → 7; ``blocks.3.ffn.net.2`` → 3, not 2: see ``_PART_CONTAINERS``)."""
    segments, separator = _segments(name)
    position = _block_position(segments, separator)
    return int(segments[position]) if position is not None else None


def module_type(name: str) -> str:
    """The module after the layer index: ``…self_attn.q_proj`` → ``q_proj``; a module numbered inside its parent
    keeps that parent (``…attn1.to_out.0`` → ``to_out.0``, ``…ff.net.0.proj`` → ``net.0.proj``); for kohya names
    everything after the index (``lora_unet_…_transformer_blocks_0_attn1_to_out_0`` → ``attn1_to_out_0``) or, with
    no index, the name without its ``lora_unet_``/``lora_te_`` prefix (``lora_unet_conv_in`` → ``conv_in``)."""
    segments, separator = _segments(name)
    if separator == ".":
        position = _block_position(segments, separator)
        start = (position if position is not None else -1) + 1
        parts = [i for i in range(start, len(segments)) if _INT_SEGMENT.match(segments[i])]
        return ".".join(segments[parts[0] - 1 :]) if parts and parts[0] > start else segments[-1]
    position = _block_position(segments[:-1], separator)  # a kohya name's last word is never all of its type
    if position is not None:
        return separator.join(segments[position + 1 :])
    return _KOHYA_PREFIX.sub("", name)


def block_of(name: str) -> str:
    """The block a layer belongs to: its name up to its layer index (``model.layers.7.self_attn.q_proj`` →
    ``model.layers.7``; kohya's ``…_layers_7_self_attn_q_proj`` → ``…_layers_7``); the name itself without one."""
    segments, separator = _segments(name)
    position = _block_position(segments, separator)
    return separator.join(segments[: position + 1]) if position is not None else name
