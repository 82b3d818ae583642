"""GPT-2 ``Conv1D`` or ``nn.Linear``: told by the base weight's shape where the saved ``fan_in_fan_out`` cannot tell.

PEFT records one ``fan_in_fan_out`` for a whole adapter, and sets it while it builds each layer: True for a
``Conv1D``, False for an ``nn.Linear``, so the last target built wins. An adapter on GPT-2's ``c_attn`` and its
``lm_head`` saves ``false``, and its Conv1D layers (stored (in, out)) read as Linear ones; a training checkpoint
records none. With ``--base`` the stored base weight settles a layer whose shape is not square: (in, out) is a
Conv1D, (out, in) a Linear. A square one cannot be told by shape: where every layer the base could tell was the
other way round, the square ones are too (one layout throughout); else the base model's own classes settle them
where its directory has a transformers ``config.json`` (``peft_tuner.BaseLayout``: built on the meta device);
else they keep the recorded layout, warned (their σ are the same either way; their base-relative measures and a
W₀-dependent update — DoRA, PiSSA, OLoRA — are not).
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
    result, flipped, kept, square = [], [], [], []
    for layer in layers:
        shape = tuple(layer.shape)
        if layer.kind in _FLIP and layer.update is not None and len(shape) == 2 and base.key_for(layer.name):
            stored = tuple(base.shape(layer.name))
            if shape[0] == shape[1]:
                square.append(len(result))
            elif stored != shape and stored == shape[::-1]:  # another mismatch is the readers' to report
                layer = replace(layer, kind=_FLIP[layer.kind], shape=stored)
                flipped.append(layer.name)
            elif stored == shape:
                kept.append(layer.name)
        result.append(layer)
    if not flipped:
        return result, None
    warning = (
        f"the adapter records one fan_in_fan_out for every layer, but --base stores {_layers(flipped)} the other "
        "way round (GPT-2 Conv1D (in, out) beside nn.Linear (out, in) targets): their layout is taken from --base"
    )
    if square and not kept:  # every layer the base could tell was flipped: one layout throughout
        for i in square:
            result[i] = replace(result[i], kind=_FLIP[result[i].kind])
        return result, warning + f", and the square ones' ({_layers([result[i].name for i in square])}) likewise"
    told = _by_class(base, [result[i] for i in square])
    for i in square:
        if result[i].name in told:
            result[i] = replace(result[i], kind=told[result[i].name])
    unsure = [result[i].name for i in square if result[i].name not in told]
    if unsure:
        warning += (
            f"; square layers cannot be told apart by shape and keep the recorded layout ({_layers(unsure)}): "
            "their singular values are right, but their base-relative measures (amplification, intruders) and "
            "DoRA, PiSSA or OLoRA on a square Conv1D recorded as Linear are not"
        )
    elif square:
        warning += f", and the square ones' ({_layers([result[i].name for i in square])}) from the base model's classes"
    return result, warning


def _by_class(base: BaseWeights, layers: list[Layer]) -> dict[str, str]:
    """Layer name → kind for the ``layers`` whose module the base model's transformers config builds as a Conv1D or
    an nn.Linear (nothing where the base is no such directory, or its config does not build)."""
    if not layers or not (base.path.is_dir() and (base.path / "config.json").is_file()):
        return {}
    from .peft_tuner import BaseLayout, kind_of

    layout = BaseLayout(base.path)
    modules = {layer.name: layout.module(layer.name) for layer in layers}
    return {
        name: kind_of(module) for name, module in modules.items() if module is not None and kind_of(module) in _FLIP
    }


def _layers(names: list[str]) -> str:
    return listed(names, counted="layer(s)")
