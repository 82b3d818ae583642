"""Pieces every PEFT-style reader shares: config patterns, key parsing, tensor checks, trained biases."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ...core.checkpoint import MODULES_TO_SAVE, SAVED_NORM, SAVED_WEIGHT, Layer, adapter_module
from ...core.errors import CheckpointError
from ...core.naming import layer_name
from ...core.tensorfile import TensorFile
from .diffusers import split_key as split_diffusers_key

if TYPE_CHECKING:
    from ...core.base import BaseWeights


def pattern_value(
    patterns: Mapping[str, object] | None,
    name: str,
    default: object,
    *,
    config_path: Path | None,
    field: str = "rank_pattern/alpha_pattern",
):
    """PEFT's ``rank_pattern``/``alpha_pattern`` rule: the first key k, in dict order, for which
    ``re.match(rf"(.*\\.)?({k})$", name)`` matches gives the value; otherwise ``default``."""
    if patterns is not None and not isinstance(patterns, Mapping):
        raise CheckpointError(
            f"{field} must be a JSON object of pattern → value, found {type(patterns).__name__}", path=config_path
        )
    for key, value in (patterns or {}).items():
        try:
            if re.match(rf"(.*\.)?({key})$", name):
                return value
        except re.error as exc:
            raise CheckpointError(
                f"{field} pattern {key!r} is not a valid regular expression ({exc})", path=config_path
            ) from exc
    return default


def _matches(pattern: str, name: str) -> bool:
    try:
        return re.match(rf"(.*\.)?({pattern})$", name) is not None
    except re.error:  # pattern_value says so where the pattern is used
        return False


def ambiguous_patterns(config: Mapping | None, names: Iterable[str]) -> list[str]:
    """A warning per ``rank_pattern``/``alpha_pattern`` where a layer matches several keys of different values.

    PEFT applies the first matching key in dict order, and its ``save_pretrained`` writes the config with sorted
    keys: such a layer is read as PEFT reloads the file (its first key in the file), which need not be the key
    that won while training, if the keys were written in another order."""
    out = []
    for field in ("rank_pattern", "alpha_pattern"):
        patterns = (config or {}).get(field)
        if not isinstance(patterns, Mapping) or len(patterns) < 2:
            continue
        clashes = []
        for name in names:
            found = [(key, value) for key, value in patterns.items() if _matches(str(key), name)]
            if len({json.dumps(value, sort_keys=True) for _, value in found}) > 1:
                clashes.append((name, found))
        if clashes:
            name, found = clashes[0]
            keys = ", ".join(f"{key!r} → {value}" for key, value in found)
            out.append(
                f"{field}: {len(clashes)} layer(s) match several keys of different values (e.g. {name}: {keys}); "
                f"each is read as PEFT reloads this file, with the first in the file's order ({found[0][0]!r}) — "
                "PEFT saves these keys sorted, so training may have applied another"
            )
    return out


def nonfinite_problem(tensor: torch.Tensor, key: str) -> str | None:
    """``None`` for a finite tensor, else a message counting its NaN and Inf values."""
    # a finite sum proves every element finite (NaN and ±Inf propagate through addition); it is a plain
    # reduction, ~20× cheaper than isfinite on bf16; a sum that overflows falls through to the exact check
    if not tensor.is_floating_point() or math.isfinite(tensor.sum().item()) or bool(torch.isfinite(tensor).all()):
        return None
    nans = int(torch.isnan(tensor).sum())
    infs = int(torch.isinf(tensor).sum())
    return f"{key}: {nans} NaN and {infs} Inf values"


_FROM_CONFIG = object()


def positive_number(config: Mapping, field: str, *, config_path: Path | None, value: object = _FROM_CONFIG) -> float:
    """A config value that must be a finite positive number (r, lora_alpha, …): ``value`` where given (a
    pattern's value, which may itself be null), else ``config[field]``."""
    raw = config.get(field) if value is _FROM_CONFIG else value
    if isinstance(raw, bool) or not isinstance(raw, (int, float)) or not math.isfinite(raw) or raw <= 0:
        raise CheckpointError(f"{field} must be a positive number, found {raw!r}", path=config_path)
    return float(raw)


def positive_integer(value: object, what: str, *, config_path: Path | None) -> int:
    """A rank from a config (``r``, a ``rank_pattern`` value): a positive whole number (4 or 4.0)."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not number or value <= 0 or value != int(value):
        raise CheckpointError(f"{what} must be a positive integer, found {value!r}", path=config_path)
    return int(value)


def truthy(value: object) -> bool:
    """Whether a config field is set (PEFT writes unset fields as null, false, [] or {})."""
    return value not in (None, False, 0, "", [], {})


COMPONENTS = "components"  # a config recovered from a diffusers pipeline file: one LoraConfig per component


def config_from_metadata(metadata: Mapping[str, str]) -> tuple[dict | None, str | None]:
    """A LoRA config recovered from a safetensors file's ``__metadata__`` where a tool wrote one.

    diffusers writes the LoraConfig as JSON under ``lora_adapter_metadata``: unprefixed from a model's
    ``save_lora_adapter``, and from a pipeline's ``save_lora_weights`` with every key prefixed by its component
    (``"unet.lora_alpha": 8``, ``"text_encoder.r": 4``), returned as ``{"components": {"unet": {...}, ...}}``
    (see :func:`layer_config`). kohya's ``ss_network_alpha`` is not one: diffusers, PEFT, LyCORIS and ComfyUI never
    read it for a LoRA-style file (kohya_scale warns where it disagrees with α = r). Returns (config or None, where
    it came from).
    """
    if "lora_adapter_metadata" in metadata:
        try:
            config = json.loads(metadata["lora_adapter_metadata"])
        except json.JSONDecodeError:
            config = None
        if isinstance(config, dict) and "lora_alpha" in config:
            return config, "the file's lora_adapter_metadata"
        components = _split_components(config) if isinstance(config, dict) else {}
        if components:
            names = ", ".join(components)
            return {COMPONENTS: components}, f"the file's lora_adapter_metadata (one config per component: {names})"
    return None, None


def _split_components(config: Mapping) -> dict[str, dict]:
    """``{"unet.r": 4, "unet.lora_alpha": 8, …}`` → ``{"unet": {"r": 4, "lora_alpha": 8, …}}``; only components
    whose config gives ``lora_alpha`` (diffusers writes the whole LoraConfig, so a component without it is not one)."""
    components: dict[str, dict] = {}
    for key, value in config.items():
        component, dot, field = str(key).partition(".")
        if dot and field and "." not in field:
            components.setdefault(component, {})[field] = value
    return {name: fields for name, fields in components.items() if "lora_alpha" in fields}


def layer_config(config: Mapping, name: str) -> tuple[Mapping, str]:
    """The config that governs layer ``name``, and the name its ``rank_pattern``/``alpha_pattern`` keys match.

    A diffusers pipeline file has one config per component: layer ``unet.down_blocks.0…`` gets the unet's,
    matched as ``down_blocks.0…`` (diffusers applies each config to its component model); a layer of a component
    the metadata does not describe gets an empty config (no α from it: the module's ``.alpha``, else scale 1).
    """
    components = config.get(COMPONENTS)
    if not isinstance(components, Mapping):
        return config, name
    component, dot, rest = name.partition(".")
    if dot and component in components:
        return components[component], rest
    return {}, name


def any_config(config: Mapping, field: str) -> bool:
    """Whether ``field`` is set in ``config`` or in any of its components' configs."""
    components = config.get(COMPONENTS)
    parts = [config, *(components.values() if isinstance(components, Mapping) else ())]
    return any(truthy(part.get(field)) for part in parts)


def uncovered_components(config: Mapping, names: list[str]) -> str | None:
    """A warning naming the components of ``names`` that a per-component config leaves without α, or None."""
    components = config.get(COMPONENTS)
    if not isinstance(components, Mapping):
        return None
    missing = sorted({name.partition(".")[0] for name in names if name.partition(".")[0] not in components})
    if not missing:
        return None
    return (
        f"the file's lora_adapter_metadata has no config for {', '.join(missing)}: α unknown for those layers, "
        "scale 1 assumed (α = r, as diffusers loads a component saved without metadata; diffusers 0.42 itself "
        "fails to load a file whose metadata leaves a component out); pass --alpha to set it"
    )


def alpha_tensor(tensor, key: str) -> tuple[float | None, str | None]:
    """The value of a per-module ``.alpha`` scalar (kohya, musubi-tuner, ComfyUI), or a problem with it."""
    if tensor.numel() != 1 or tensor.ndim > 1:
        return None, f"{key}: alpha must be a scalar, found shape {list(tensor.shape)}"
    value = float(tensor.reshape(()).double())
    if not math.isfinite(value):
        return None, f"{key}: alpha is {value}"
    return value, None


def rank_scale(alpha: float, rank: int, rslora: bool = False) -> float:
    """LoRA's scale: α/r, or α/√r under rsLoRA (0 for rank 0)."""
    if rank <= 0:
        return 0.0
    return alpha / (math.sqrt(rank) if rslora else rank)


def layer_scale(config: Mapping, name: str, rank: int, *, config_path: Path | None, origin: str = "") -> float:
    """The scale of layer ``name``: α from ``alpha_pattern`` (PEFT's rule) or ``lora_alpha``, over r or √r;
    1 where α is unknown (no ``lora_alpha``: the caller has warned). A per-component config (diffusers) gives
    the layer its component's config, see :func:`layer_config`. ``origin`` (" (in the file's
    lora_adapter_metadata)") tells a bad value's message where the config came from."""
    config, name = layer_config(config, name)
    if "lora_alpha" not in config:
        return 1.0
    patterns = config.get("alpha_pattern")
    alpha = pattern_value(patterns, name, _FROM_CONFIG, config_path=config_path, field="alpha_pattern" + origin)
    field = "lora_alpha" if alpha is _FROM_CONFIG else f"alpha_pattern value for {name}"
    alpha = config["lora_alpha"] if alpha is _FROM_CONFIG else alpha
    alpha = positive_number(config, field + origin, config_path=config_path, value=alpha)
    return rank_scale(alpha, rank, bool(config.get("use_rslora")))


def alpha_config(
    config: Mapping | None, metadata: Mapping[str, str], alpha: float | None, *, every_module: bool = False
) -> tuple[dict, bool, list[str]]:
    """The config that gives a LoRA-style reader its α, whether it is authoritative for r, and warnings.

    In order: adapter_config.json (``--alpha`` overrides its ``lora_alpha`` and ``alpha_pattern``); ``--alpha``
    alone; diffusers' ``lora_adapter_metadata``; else α unknown and scale 1, said loudly — unless
    ``every_module`` is set: the caller scales each module itself (its ``.alpha`` scalar, kohya_scale's rules)
    and says so.
    """
    if config is not None:
        config = dict(config)
        if alpha is None:
            return config, True, []
        config["lora_alpha"], config["alpha_pattern"] = alpha, {}
        return config, True, [f"--alpha {alpha:g} overrides lora_alpha and alpha_pattern of the config"]
    if alpha is not None:
        return {"lora_alpha": alpha}, False, []
    recovered, origin = config_from_metadata(metadata)
    if recovered is not None:
        return recovered, False, [f"no adapter_config.json: α and r patterns taken from {origin}"]
    if every_module:
        return {}, False, []
    unknown = "no adapter_config.json and no α in the file's metadata: α is unknown, scale 1 is assumed"
    return {}, False, [unknown + " (pass --alpha to set it)"]


def trained_bias(
    config: Mapping, tensors: TensorFile, key: str, base: BaseWeights | None, name: str
) -> torch.Tensor | None:
    """The whole trained bias b that PEFT's ``bias="all"``/``"lora_only"``/``"<tuner>_only"`` saved under ``key``
    for layer ``name``, where the base holds a bias of its shape to take its change against; else None."""
    if base is None or config.get("bias", "none") == "none" or key not in tensors:
        return None
    if base.key_for(name, "bias") is None or tuple(base.shape(name, "bias")) != tuple(tensors.shape(key)):
        return None
    return tensors.get(key)


def trained_bias_changes(
    layers: Iterable[Layer], unused: list[str], tensors: TensorFile, base: BaseWeights | None, config: Mapping
) -> list[str]:
    """Each analysed layer's :func:`trained_bias` b becomes its change Δb = b − b₀ (``bias_update``, applied
    unscaled, as the merge applies it), plus s·b_B where the layer also has lora_B's own bias (``lora_bias``:
    PEFT's merge adds both). The keys left unused are returned: every one without a base, a layer, a base bias of
    its shape, or (beside a lora_B bias) one scale for the layer."""
    by_name = {layer.name: layer for layer in layers if layer.update is not None}
    left = []
    for key in unused:
        module, _, suffix = key.rpartition(".")
        layer = by_name.get(layer_name(module.removesuffix(".base_layer"))) if suffix == "bias" else None
        saved = trained_bias(config, tensors, key, base, layer.name) if layer is not None else None
        scalable = layer is not None and not (
            layer.bias_update is not None and layer.bias_scaled and layer.scale is None
        )
        if saved is None or not scalable:
            left.append(key)
            continue
        change = saved.double() - base.get(layer.name, "bias").double()
        if layer.bias_update is not None:  # lora_B's bias, applied ×s (a number: LoRA's) on top of b
            scale = layer.scale if layer.bias_scaled else 1.0
            change = change + scale * layer.bias_update.double().reshape(change.shape)
        layer.bias_update, layer.bias_scaled = change, False
        layer.params += saved.numel()
        del by_name[layer.name]  # one trained bias per layer
    return left


def skip_reason(key: str, config: Mapping | None, family: str) -> str:
    """Why a stored tensor of a PEFT-style adapter is not part of any layer's ΔW.

    A copy of a ``modules_to_save`` module first (it has its own bias), then base-model biases trained under
    ``bias="all"``/``"lora_only"``, else simply not a tensor of this family.
    """
    config = config or {}
    for module in config.get("modules_to_save") or []:
        if re.search(rf"(^|\.){re.escape(str(module))}\.", key):
            return MODULES_TO_SAVE
    if key.endswith(".alpha"):
        return "an .alpha scalar with no LoRA factors of its module beside it"
    alias = split_diffusers_key(key)
    if alias is not None:
        return f"a second {alias.role} factor of module {alias.module!r} (the file also names it in PEFT's layout)"
    if key.endswith(".bias") and (".base_layer." in key or config.get("bias", "none") != "none"):
        return f"a trained bias of the base model (bias={config.get('bias', 'none')!r}), not part of ΔW"
    if key.endswith(".base_layer.weight"):
        return "the base weight of a targeted input/output embedding, saved beside its LoRA (save_embedding_layers)"
    if key.endswith(".weight") and config.get("peft_type") and adapter_module(key) is None:
        return SAVED_WEIGHT  # the only plain weights PEFT itself writes into an adapter file
    if key.endswith("_norm.scale") and adapter_module(key) is None:
        return SAVED_NORM
    return f"not a tensor of a {family} adapter"
