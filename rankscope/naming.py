"""Layer names: the module path in the base model (DESIGN.md, "Names of layers")."""

from __future__ import annotations

import re

_PEFT_PREFIX = "base_model.model."
_WRAPPER_SEGMENTS = ("module.", "_orig_mod.")
_INT_SEGMENT = re.compile(r"^\d+$")
_NATURAL_CHUNK = re.compile(r"(\d+)")


def layer_name(key_prefix: str) -> str:
    """Map a stored module path to the base model's module path.

    Everything up to and including ``base_model.model.`` is dropped, then leading ``module.`` (DDP) and
    ``_orig_mod.`` (torch.compile) segments. Names that never had these stay as stored.
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
    return name


def natural_key(name: str) -> tuple:
    """Sort key that orders ``layers.2`` before ``layers.10``."""
    return tuple(int(chunk) if chunk.isdigit() else chunk for chunk in _NATURAL_CHUNK.split(name))


def layer_index(name: str) -> int | None:
    """The last integer segment of a dotted name (``model.layers.7.self_attn.q_proj`` → 7), or None."""
    for segment in reversed(name.split(".")):
        if _INT_SEGMENT.match(segment):
            return int(segment)
    return None


def module_type(name: str) -> str:
    """The last segment of a dotted name (``…self_attn.q_proj`` → ``q_proj``)."""
    return name.rsplit(".", 1)[-1]
