"""LoRA on torch's ``nn.MultiheadAttention``, as PEFT 0.21 writes it.

PEFT's ``lora.MultiheadAttention`` keeps in_proj's factors on the attention module itself
(``attn.lora_A.weight`` (r, E), ``attn.lora_B.weight`` (3E, r), merged into ``attn.in_proj_weight``: q, k and v
stacked) and wraps the out-projection inside its own wrapper (``attn.base_layer.out_proj.lora_A.weight``): that
layer is the base model's ``attn.out_proj`` (:func:`rankscope.core.naming.layer_name`). Both take r and α from the
attention module's ``rank_pattern``/``alpha_pattern`` key (``attn``), not from one for ``out_proj``.

PEFT up to 0.21 adds the out-projection's s·B·A twice, in ``merge``/``merge_and_unload`` and in its forward
(which merges, runs, unmerges): the outer wrapper adds it and then merges the inner ``lora.Linear``, which adds
it again. rankscope analyses s·B·A, the update the file defines, and warns that the model applies 2·s·B·A.
"""

from __future__ import annotations

import re

from ...core.naming import layer_name

_OUT_PROJ = re.compile(r"\.base_layer\.out_proj$")


def is_out_proj(stored: str) -> bool:
    """Whether a stored module path is PEFT's LoRA on a MultiheadAttention's out-projection."""
    return _OUT_PROJ.search(stored) is not None


def pattern_name(stored: str, relative: str) -> str:
    """The name a layer's ``rank_pattern``/``alpha_pattern`` keys match: the attention module's for its
    out-projection (PEFT builds that LoRA with the attention module's r and α), else ``relative`` itself."""
    return relative.removesuffix(".out_proj") if is_out_proj(stored) else relative


def double_applied_warning(stored_modules: list[str], config: dict | None) -> str | None:
    """The warning that PEFT applies these out-projection LoRAs twice (None where there are none)."""
    names = [layer_name(stored) for stored in stored_modules if is_out_proj(stored)]
    if not names:
        return None
    version = (config or {}).get("peft_version")
    written = f"; this file was written by PEFT {version}" if isinstance(version, str) else ""
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return (
        f"LoRA on nn.MultiheadAttention's out_proj: PEFT ≤ 0.21 adds its s·B·A twice, in merge_and_unload and in "
        f"the forward (a PEFT bug{written}), so the model applies 2·s·B·A at {len(names)} layer(s): {shown}; "
        "the singular values shown are of s·B·A (double them for the model as PEFT runs it)"
    )
