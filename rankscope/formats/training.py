"""Training checkpoints: a whole model's state dict with PEFT LoRA (or DoRA) layers inside it.

``torch.save(peft_model.state_dict())``, or Lightning's ``{"state_dict": …, "epoch": …}`` (``.ckpt``, ``.pt``,
``.pth``, ``.bin``; a ``.safetensors`` works too). Unlike a saved adapter, the keys keep the adapter's name
(``…q_proj.lora_A.default.weight``, ``emb.lora_embedding_A.default``,
``…lora_magnitude_vector.default.weight``) and the base model's weights sit beside them
(``…q_proj.base_layer.weight`` and every untargeted weight; listed as skipped, "base model weight").

One adapter is analysed: ``--adapter NAME``, else ``default``, else the only one. A DoRA adapter takes W0 from
the same file (or from ``--base`` where given). There is usually no adapter_config.json, so α is unknown
(scale 1 and a warning; ``--alpha`` sets it); one beside the file is used. The per-module parsing is LoRA's.
"""

from __future__ import annotations

from pathlib import Path

from ..core.base import BaseWeights
from ..core.checkpoint import FULL_COPIES, MODULES_TO_SAVE, Checkpoint, Skipped
from ..core.errors import CheckpointError
from . import Format, ReadOptions, dora, lora, register_format
from .common.peft import truthy
from .common.source import AdapterSource

BASE_WEIGHT = "base model weight"


def adapter_names(keys) -> list[str | None]:
    """The adapter names in LoRA keys, in order of first appearance (None for a key saved without one)."""
    names: dict[str | None, None] = {}
    for key in keys:
        parts = lora.split_key(key)
        if parts is not None:
            names.setdefault(parts.adapter)
    return list(names)


def detect(source: AdapterSource) -> bool:
    """LoRA keys that keep an adapter name, or LoRA keys beside wrapped base weights (``base_layer.weight``)."""
    if source.peft_type not in (None, "LORA"):
        return False
    names = adapter_names(source.tensors)
    if any(name is not None for name in names):
        return True
    return bool(names) and any(key.endswith(".base_layer.weight") for key in source.tensors)


def choose_adapter(names: list[str | None], requested: str | None, path: Path) -> str | None:
    """``requested`` if the file holds it; else ``default``, or the only adapter; else an error listing them."""
    named = [name for name in names if name is not None]
    listed = ", ".join(named) or "none"
    if requested is not None:
        if requested not in named:
            raise CheckpointError(f"no adapter named {requested!r} in this file (adapters: {listed})", path=path)
        return requested
    if not named:
        return None
    if "default" in named:
        return "default"
    if len(named) == 1:
        return named[0]
    raise CheckpointError(
        f"this file holds adapters {listed}: pick one with adapter=NAME", path=path, argument="adapter"
    )


def _reason(skipped: Skipped, adapter: str | None) -> Skipped:
    """The skipped entry restated for a whole model's state dict (another adapter's tensors are expected)."""
    parts = lora.split_key(skipped.key)
    if parts is not None and parts.adapter != adapter:
        if parts.adapter is None:
            return Skipped(skipped.key, "a LoRA tensor without an adapter name, beside named ones")
        reason = f"a tensor of adapter {parts.adapter!r}, not the one analysed (--adapter {parts.adapter} picks it)"
        return Skipped(skipped.key, reason, expected=True)
    if parts is not None:
        return skipped
    if ".modules_to_save." in skipped.key:
        return Skipped(skipped.key, MODULES_TO_SAVE)
    if adapter is None and skipped.reason in FULL_COPIES:
        # a saved adapter (names stripped) with save_embedding_layers' base weights: its head copies are not base
        return skipped
    return Skipped(skipped.key, BASE_WEIGHT)


def read(source: AdapterSource, options: ReadOptions) -> Checkpoint:
    names = adapter_names(source.tensors)
    adapter = choose_adapter(names, source.adapter, source.weights_path)
    # load() reports the source's other adapters (as for a directory of adapters)
    source.other_adapters = [name for name in names if name is not None and name != adapter]
    magnitudes = any(
        parts is not None and parts.adapter == adapter and parts.attr == "lora_magnitude_vector"
        for parts in map(lora.split_key, source.tensors)
    )
    if magnitudes or truthy((source.config or {}).get("use_dora")):
        base = options.base or BaseWeights.from_tensor_file(source.tensors)
        checkpoint = dora.read_dora(source, options, base=base, adapter=adapter)
    else:
        parsed = lora.parse(source, options, adapter=adapter, allow=dora.ALLOW)
        rslora = parsed.config.get("use_rslora")  # a whole model's config is one LoraConfig, not per component
        checkpoint = lora.parsed_checkpoint(source, parsed, "RSLORA" if rslora else "LORA")
    checkpoint.skipped = [_reason(s, adapter) for s in checkpoint.skipped]
    return checkpoint


register_format(
    Format(
        "training",
        "a whole model's state dict (.ckpt/.pt/.pth/.bin, Lightning's too) with PEFT LoRA/DoRA layers inside",
        detect,
        read,
        priority=40,
        needs="nothing (the base weights are in the file)",
        spectrum="factored (dense for DoRA)",
    )
)
