"""GPT-2 ``Conv1D`` or ``nn.Linear``: told by the base weight's shape where the saved ``fan_in_fan_out`` cannot tell.

PEFT records one ``fan_in_fan_out`` for a whole adapter, and sets it while it builds each layer: True for a
``Conv1D``, False for an ``nn.Linear``, so the last target built wins. An adapter on GPT-2's ``c_attn`` and its
``lm_head`` saves ``false``, and its Conv1D layers (stored (in, out)) read as Linear ones. With ``--base`` the
stored base weight settles a layer whose shape is not square: (in, out) is a Conv1D, (out, in) a Linear. A square
one cannot be told apart and keeps the recorded layout (its σ are the same either way; a W₀-dependent update
— DoRA, PiSSA, OLoRA — of a square Conv1D recorded as Linear is computed on the wrong axis, and is warned).
"""

from __future__ import annotations

from dataclasses import replace

from ...core.base import BaseWeights
from ...core.checkpoint import Layer, listed

_FLIP = {"linear": "conv1d_gpt2", "conv1d_gpt2": "linear"}


def orient(layers: list[Layer], base: BaseWeights | None) -> tuple[list[Layer], str | None]:
    """The layers with the layout their base weight has, and a warning where the saved flag was wrong for some."""
    if base is None:
        return layers, None
    result, flipped = [], []
    for layer in layers:
        shape = tuple(layer.shape)
        if layer.kind in _FLIP and layer.update is not None and len(shape) == 2 and base.key_for(layer.name):
            stored = tuple(base.shape(layer.name))
            if stored != shape and stored == shape[::-1]:  # another mismatch is the readers' to report
                layer = replace(layer, kind=_FLIP[layer.kind], shape=stored)
                flipped.append(layer.name)
        result.append(layer)
    if not flipped:
        return result, None
    square = [layer.name for layer in result if layer.kind in _FLIP and len(set(layer.shape)) == 1]
    warning = (
        f"the adapter records one fan_in_fan_out for every layer, but --base stores {_layers(flipped)} the other "
        "way round (GPT-2 Conv1D (in, out) beside nn.Linear (out, in) targets): their layout is taken from --base"
    )
    if square:
        warning += (
            f"; square layers cannot be told apart by shape and keep the recorded layout ({_layers(square)}): their "
            "singular values are right, but DoRA, PiSSA or OLoRA on a square Conv1D recorded as Linear are not"
        )
    return result, warning


def _layers(names: list[str]) -> str:
    return listed(names, counted="layer(s)")
