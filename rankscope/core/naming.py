"""Layer names and what they say: block, layer index, expert, module type, place in the block.

A layer is named by its module path in the base model (docs/architecture.md, "Names of layers"). Everything
else here is read off that path: the **block** is the name up to its layer index, the **module type** is what
follows (the last segment, qualified only where a block repeats it), and the **order** of layers is by block,
then by the module's place in its block as the model declares it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TypeVar

_PEFT_PREFIX = "base_model.model."
_WRAPPER_SEGMENTS = ("module.", "_orig_mod.")
_INNER_WRAPPER = re.compile(r"(\.base_layer)+\.")
_INT_SEGMENT = re.compile(r"^\d+$")
_NATURAL_CHUNK = re.compile(r"(\d+)")
_KOHYA_PREFIX = re.compile(r"^(lora|lycoris)_(unet|te\d*|transformer)_")
_EXPERT_SLICE = re.compile(r"^(.*)\[(\d+)\]$")  # one expert of a fused 3-D parameter: `…experts.gate_up_proj[7]`
_EXPERT_NUMBER = re.compile(r"^(?:expert_)?(\d+)$")  # `experts.3`; Switch Transformers' `experts.expert_3`


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


def natural_key(name: str) -> tuple:
    """Sort key that orders ``layers.2`` before ``layers.10``."""
    return tuple(int(chunk) if chunk.isdigit() else chunk for chunk in _NATURAL_CHUNK.split(name))


# -- reading a name -------------------------------------------------------------------------------------------
# containers whose integer index numbers a module's own parts, not a block: diffusers' ``to_out.0`` and
# FeedForward ``net.0.proj``/``net.2``, Wan's ``ffn.0``, Flux/BFL's ``img_mlp.2``, ldm's ``in_layers.2``, DiT's
# ``adaLN_modulation.1``, Qwen-Image's ``img_mod.1``, the original Wan's ``img_emb.proj.3``, ``text_embedding.2``,
# ``time_embedding.0`` and ``time_projection.1``, Z-Image's ``cap_embedder.1`` and ``t_embedder.mlp.0`` (kohya's
# flattened forms end the same way: ``…_to_out_0``). A trailing number after a block's number is a part too
# (``_block_position``).
_PART_CONTAINERS = ("to_out", "net", "ffn", "img_mlp", "txt_mlp", "in_layers", "out_layers", "emb_layers",
                    "time_embed", "adaLN_modulation", "img_mod", "txt_mod", "proj", "mlp", "text_embedding",
                    "time_embedding", "time_projection", "cap_embedder")  # fmt: skip


@dataclass(frozen=True)
class _Parsed:
    segments: tuple[str, ...]  # the name split on its separator; an expert slice's ``[e]`` taken off
    separator: str  # "." for module paths, "_" for kohya's flattened names
    block: int | None  # the position of the layer index
    expert: int | None  # the expert's number, for a MoE expert
    inner: frozenset[int]  # positions of T5's ``layer.N`` and of expert numbers inside a block: never in a type


def _segments(name: str) -> tuple[list[str], str]:
    """Dotted module paths split on dots; kohya's flattened names (``lora_te_…_layers_0_self_attn_q_proj``,
    no dots) on underscores."""
    if "." not in name and "_" in name:
        return name.split("_"), "_"
    return name.split("."), "."


def _is_int(segments: Sequence[str], i: int) -> bool:
    return i >= 0 and bool(_INT_SEGMENT.match(segments[i]))


def _is_part_index(segments: Sequence[str], i: int, separator: str) -> bool:
    before = separator.join(segments[:i])
    return any(before == c or before.endswith(separator + c) for c in _PART_CONTAINERS)


def _inner_positions(segments: Sequence[str]) -> tuple[frozenset[int], int | None]:
    """Positions of T5's sub-layers (``layer.1`` in ``block.5.layer.1``: the block is ``block.5``) and of expert
    numbers (``experts.3``, ``experts.expert_3``; kohya's ``experts_3``), and the expert's number."""
    inner, expert = set(), None
    for i in range(1, len(segments)):
        if segments[i - 1] == "experts" and (match := _EXPERT_NUMBER.match(segments[i])):
            inner.add(i)
            expert = int(match[1]) if expert is None else expert
        elif (
            i >= 3
            and tuple(segments[i - 3 : i : 2]) == ("block", "layer")
            and _is_int(segments, i - 2)
            and _is_int(segments, i)
        ):
            inner |= {i - 1, i}
    return frozenset(inner), expert


def _block_position(segments: Sequence[str], separator: str, inner: frozenset[int], whole: bool = True) -> int | None:
    """The position of the layer index: the last integer segment that numbers neither a module's own parts
    nor a sub-layer or expert inside the block. The last segment of a ``whole`` name names the module itself, so
    a number there with another number before it numbers the module inside its block
    (``transformer_blocks.0.img_mod.1``)."""
    numbers = [i for i in range(len(segments)) if _is_int(segments, i) and i not in inner]
    for i in reversed(numbers):
        trailing = whole and i == len(segments) - 1 and i != numbers[0]
        if not trailing and not _is_part_index(segments, i, separator):
            return i
    return None


def expert_slice(name: str) -> tuple[str, int] | None:
    """(parameter path, expert index) of one expert of a fused 3-D parameter, ``<path>[<e>]``; None otherwise."""
    match = _EXPERT_SLICE.match(name)
    return (match[1], int(match[2])) if match else None


@lru_cache(maxsize=1 << 16)
def _parse(name: str) -> _Parsed:
    expert = None
    if match := _EXPERT_SLICE.match(name):
        name, expert = match[1], int(match[2])
    segments, separator = _segments(name)
    inner, numbered = _inner_positions(segments)
    block = _block_position(segments, separator, inner)
    return _Parsed(tuple(segments), separator, block, expert if expert is not None else numbered, inner)


def _rest(parsed: _Parsed) -> list[str]:
    """The segments after the layer index (all of them without one), T5's ``layer.N`` and expert numbers left out."""
    start = parsed.block + 1 if parsed.block is not None else 0
    return [s for i, s in enumerate(parsed.segments) if i >= start and i not in parsed.inner]


# -- what a name says -----------------------------------------------------------------------------------------
def layer_index(name: str) -> int | None:
    """The block's number: the last integer segment that numbers a block (``model.layers.7.self_attn.q_proj``
    → 7; ``lora_te_…_layers_7_…_q_proj`` → 7). Not a module's own parts (``blocks.3.ffn.net.2`` → 3: see
    ``_PART_CONTAINERS``), T5's sub-layers (``encoder.block.5.layer.0.SelfAttention.q`` → 5) or experts
    (``model.layers.4.mlp.experts.3.down_proj`` and ``….experts.down_proj[3]`` → 4)."""
    parsed = _parse(name)
    return int(parsed.segments[parsed.block]) if parsed.block is not None else None


def expert_index(name: str) -> int | None:
    """The expert a MoE layer belongs to (``mlp.experts.3.down_proj``, ``mlp.experts.down_proj[3]``,
    ``mlp.experts.expert_3.wi`` → 3); None for other layers."""
    return _parse(name).expert


def block_of(name: str) -> str:
    """The block a layer belongs to: its name up to its layer index (``model.layers.7.self_attn.q_proj`` →
    ``model.layers.7``; kohya's ``…_layers_7_self_attn_q_proj`` → ``…_layers_7``); the name itself without one."""
    parsed = _parse(name)
    if parsed.block is None:
        return name
    return parsed.separator.join(parsed.segments[: parsed.block + 1])


def module_type(name: str) -> str:
    """The module after the layer index, from this name alone: ``…self_attn.q_proj`` → ``q_proj``,
    ``…experts.3.down_proj`` → ``down_proj``. A module numbered inside its parent keeps that parent
    (``…attn1.to_out.0`` → ``to_out.0``, ``…ff.net.0.proj`` → ``net.0.proj``). For kohya names everything after
    the index (``lora_unet_…_transformer_blocks_0_attn1_to_out_0`` → ``attn1_to_out_0``) or, with no index, the
    name without its ``lora_unet_``/``lora_te_`` prefix (``lora_unet_conv_in`` → ``conv_in``).

    Layers of one checkpoint take :func:`module_types`, which qualifies a type where a block repeats it.
    """
    parsed = _parse(name)
    if parsed.separator == ".":
        rest = _rest(parsed) or [parsed.segments[-1]]
        numbered = [i for i in range(1, len(rest)) if _INT_SEGMENT.match(rest[i])]  # parts: the rest has no index
        return ".".join(rest[numbered[0] - 1 :]) if numbered else rest[-1]
    # a kohya name's last word is never all of its type
    position = _block_position(parsed.segments[:-1], parsed.separator, parsed.inner, whole=False)
    if position is not None:
        return "_".join(s for i, s in enumerate(parsed.segments) if i > position and i not in parsed.inner)
    return _KOHYA_PREFIX.sub("", name)


def module_types(names: Iterable[str]) -> dict[str, str]:
    """The module type of each of a checkpoint's layers, decided over all of them.

    A layer keeps :func:`module_type` (``q_proj``) unless some block holds that type under two different
    parents — T5's ``layer.0.SelfAttention.q`` and ``layer.1.EncDecAttention.q``, Whisper's ``self_attn.q_proj``
    and ``encoder_attn.q_proj``, BERT's three ``dense``. Then every layer of that type, in every block, is
    qualified by the fewest trailing parent segments that tell its parent from the others (``SelfAttention.q``,
    ``EncDecAttention.q``; ``attention.output.dense``, ``intermediate.dense``, ``output.dense``). Parents are
    read within the block (names without a layer index form one group), without sub-layer and expert numbers:
    all of a MoE's experts are one parent. kohya's flattened names keep :func:`module_type`, which is everything
    after the index already.
    """
    leaf: dict[str, str] = {}
    parent: dict[str, tuple[str, ...]] = {}
    in_block: dict[tuple[str | None, str], set[tuple[str, ...]]] = {}
    for name in names:
        leaf[name] = module_type(name)
        parsed = _parse(name)
        if parsed.separator != ".":
            continue
        rest = _rest(parsed)
        parent[name] = tuple(rest[: max(len(rest) - leaf[name].count(".") - 1, 0)])
        block = block_of(name) if parsed.block is not None else None
        in_block.setdefault((block, leaf[name]), set()).add(parent[name])
    repeated = {kind for (_, kind), parents in in_block.items() if len(parents) > 1}
    parents_of: dict[str, set[tuple[str, ...]]] = {}  # of a repeated type, over all blocks
    for (_, kind), parents in in_block.items():
        if kind in repeated:
            parents_of.setdefault(kind, set()).update(parents)
    types = {}
    for name, kind in leaf.items():
        if name not in parent or kind not in repeated:
            types[name] = kind
            continue
        own, others = parent[name], parents_of[kind] - {parent[name]}
        depth = next((d for d in range(1, len(own) + 1) if all(own[-d:] != other[-d:] for other in others)), None)
        types[name] = ".".join((*own[-(depth or len(own)) :], kind)) if own else kind
    return types


# -- order ----------------------------------------------------------------------------------------------------
# modules and their containers in the order blocks declare them (their ``named_modules()`` order, checked on
# tiny models in tests/test_naming_models.py), where alphabetical order would put ``mlp`` before ``self_attn``:
# adaLN norms first (SD3/Flux), Flux's single-stream projections (declared before its attention), attention
# (self before cross), its projections (q, k, v read in that order: CLIP, BART and Whisper declare k, v, q),
# the MLP, resnet blocks
MODULE_ORDER = (
    "norm", "norm1", "norm1_context", "proj_in", "proj_mlp", "proj_out",
    "self_attn", "self_attention", "SelfAttention", "attention", "attn", "self", "attn1", "attn2", "encoder_attn",
    "EncDecAttention", "cross_attn", "crossattention",
    "q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj", "out_proj", "query", "key", "value", "query_key_value",
    "c_attn", "q", "k", "v", "o", "to_q", "to_k", "to_v", "to_out", "add_q_proj", "add_k_proj", "add_v_proj",
    "to_add_out", "dense",
    "intermediate", "output", "mlp", "feed_forward", "block_sparse_moe", "ff", "ff_context", "DenseReluDense",
    "router", "gate", "experts", "shared_expert", "shared_experts", "shared_expert_gate",
    "gate_proj", "up_proj", "gate_up_proj", "down_proj", "c_fc", "c_proj", "fc1", "fc2", "wi", "wi_0", "wi_1", "wo",
    "dense_h_to_4h", "dense_4h_to_h",
    "conv1", "time_emb_proj", "conv2", "conv_shortcut",
    "lm_head",
)  # fmt: skip
_MODULE_RANK = {name: rank for rank, name in enumerate(MODULE_ORDER)}


def _rank(segment: str) -> tuple[int, tuple]:
    return _MODULE_RANK.get(segment, len(_MODULE_RANK)), natural_key(segment)


def position_in_block(name: str) -> tuple:
    """Sort key for a module's place in its block: segment by segment after the layer index, each by its place
    in ``MODULE_ORDER`` (unknown names after the known ones), then naturally (``layer.0`` before ``layer.1``,
    ``experts.2`` before ``experts.10``); an expert slice ``down_proj[3]`` as ``down_proj.3``. kohya names by
    their module type's place, then naturally."""
    parsed = _parse(name)
    start = parsed.block + 1 if parsed.block is not None else 0
    if parsed.separator != ".":
        return ((_rank(module_type(name))[0], natural_key("_".join(parsed.segments[start:]))),)
    slice_index = _EXPERT_SLICE.match(name)
    tail = (slice_index[2],) if slice_index else ()
    return tuple(_rank(segment) for segment in (*parsed.segments[start:], *tail))


def model_order_key(name: str) -> tuple:
    """Sort key for layers in model order: by block (``layers.2`` before ``layers.10``; names without a layer
    index first), then by the module's place in the block (:func:`position_in_block`: q, k, v, o, gate, up,
    down; self-attention before cross-attention before the MLP)."""
    parsed = _parse(name)
    block = parsed.separator.join(parsed.segments[: parsed.block + 1]) if parsed.block is not None else ""
    return natural_key(block), position_in_block(name)


def module_type_order(types: Mapping[str, str]) -> list[str]:
    """The distinct module types of ``{layer name: type}`` in the order a block holds them: each type where its
    earliest layer sits in its block (``query``, ``key``, ``value``, ``attention.output.dense``, … for BERT)."""
    first: dict[str, tuple] = {}
    for name, kind in types.items():
        key = position_in_block(name)
        if kind not in first or key < first[kind]:
            first[kind] = key
    return sorted(first, key=lambda kind: (first[kind], kind))


T = TypeVar("T")


def group_by_module(items: Iterable[T], name_of: Callable[[T], str], type_of: Callable[[T], str]) -> dict[str, list[T]]:
    """Items grouped by module type, the types in :func:`module_type_order`, items in their given order — the one
    grouping that summaries, tables and figures share."""
    groups: dict[str, list[T]] = {}
    names: dict[str, str] = {}
    for item in items:
        kind = type_of(item)
        groups.setdefault(kind, []).append(item)
        names.setdefault(name_of(item), kind)
    return {kind: groups[kind] for kind in module_type_order(names)}
