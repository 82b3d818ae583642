"""LoRA's ``layer_replication`` (PEFT): a model whose decoder layers are copies of the base model's.

``layer_replication = [[0, 2], [1, 2]]`` builds the layer list [0, 1, 1] from the base's (PEFT's
``replicate_layers``: ``…layers`` / ``…encoder.layer`` / ``…h``): each copy shares its base weights and has its
own LoRA, saved under the copy's index (``model.layers.2.self_attn.q_proj``). Each copy's forward adds its own
s·B·A, so layers keep the replicated model's names and ΔW = s·B·A. The base weight of copy j is base layer
``sources[j]``: base lookups (Conv1D layout, PiSSA/OLoRA) go through :class:`ReplicatedBase`.

PEFT 0.21's ``merge_and_unload()`` merges every copy's ΔW into the one shared base tensor, so a merged model's
copies all carry the sum; rankscope follows the unmerged forward, which is what the adapter trains.
"""

from __future__ import annotations

import re
from pathlib import Path

from ...core.base import BaseWeights
from ...core.errors import UnsupportedAdapterError

_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h)\.(?P<index>\d+)(?=\.|$)")


def sources(rule: object, where: Path | None) -> list[int]:
    """The base layer each replicated layer copies: [start, end) ranges concatenated."""
    ranges = rule if isinstance(rule, list | tuple) else None
    if not ranges or not all(
        isinstance(pair, list | tuple) and len(pair) == 2 and all(isinstance(i, int) and i >= 0 for i in pair)
        for pair in ranges
    ):
        raise UnsupportedAdapterError(
            f"layer_replication must be a list of [start, end] pairs, found {rule!r}", path=where
        )
    return [i for start, end in ranges for i in range(start, end)]


def base_layer_name(name: str, copies: list[int]) -> str:
    """The base model's name of a layer of the replicated model (``layers.2.`` → ``layers.<copies[2]>.``)."""
    match = _LAYER.search(name)
    if match is None or int(match["index"]) >= len(copies):
        return name
    start, end = match.span("index")
    return f"{name[:start]}{copies[int(match['index'])]}{name[end:]}"


class ReplicatedBase:
    """A :class:`BaseWeights` seen through the replication: a copy's name finds its source layer's tensors."""

    def __init__(self, base: BaseWeights, copies: list[int]) -> None:
        self._base, self._copies = base, copies

    def __getattr__(self, attribute: str):
        return getattr(self._base, attribute)

    def key_for(self, layer: str, suffix: str = "weight") -> str | None:
        return self._base.key_for(base_layer_name(layer, self._copies), suffix)

    def shape(self, layer: str, suffix: str = "weight") -> tuple[int, ...]:
        return self._base.shape(base_layer_name(layer, self._copies), suffix)

    def get(self, layer: str, suffix: str = "weight"):
        return self._base.get(base_layer_name(layer, self._copies), suffix)


def note(copies: list[int]) -> str:
    """What the reader says of a replicated model's layer names."""
    moved = {j: i for j, i in enumerate(copies) if i != j}
    example = next(iter(moved.items()), None)
    where = f" (layer {example[0]} is a copy of base layer {example[1]})" if example else ""
    return (
        f"layer_replication: {len(copies)} layers built from the base's{where}; layers are named as in the "
        "replicated model, each copy's ΔW = s·B·A as its forward applies it"
    )
