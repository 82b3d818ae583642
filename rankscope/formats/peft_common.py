"""Pieces every PEFT-style reader shares: config patterns, key parsing, tensor checks."""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from ..checkpoint import MODULES_TO_SAVE
from ..errors import CheckpointError


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
                f"pattern {key!r} is not a valid regular expression ({exc})", path=config_path
            ) from exc
    return default


def nonfinite_problem(tensor: torch.Tensor, key: str) -> str | None:
    """``None`` for a finite tensor, else a message counting its NaN and Inf values."""
    # a finite sum proves every element finite (NaN and ±Inf propagate through addition); it is a plain
    # reduction, ~20× cheaper than isfinite on bf16; a sum that overflows falls through to the exact check
    if not tensor.is_floating_point() or bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all()):
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


def config_from_metadata(metadata: Mapping[str, str]) -> tuple[dict | None, str | None]:
    """A LoRA config recovered from a safetensors file's ``__metadata__`` where a tool wrote one.

    diffusers writes the whole LoraConfig as JSON under ``lora_adapter_metadata``; kohya writes
    ``ss_network_alpha`` and ``ss_network_dim``. Returns (config or None, where it came from).
    """
    if "lora_adapter_metadata" in metadata:
        try:
            config = json.loads(metadata["lora_adapter_metadata"])
        except json.JSONDecodeError:
            config = None
        if isinstance(config, dict) and "lora_alpha" in config:
            return config, "the file's lora_adapter_metadata"
    if "ss_network_alpha" in metadata:
        try:
            alpha = float(metadata["ss_network_alpha"])
        except ValueError:
            return None, None
        config = {"lora_alpha": alpha}
        with contextlib.suppress(KeyError, ValueError):
            config["r"] = int(float(metadata["ss_network_dim"]))
        return config, "the file's ss_network_alpha"
    return None, None


def rank_scale(alpha: float, rank: int, rslora: bool = False) -> float:
    """LoRA's scale: α/r, or α/√r under rsLoRA (0 for rank 0)."""
    if rank <= 0:
        return 0.0
    return alpha / (math.sqrt(rank) if rslora else rank)


def layer_scale(config: Mapping, name: str, rank: int, *, config_path: Path | None) -> float:
    """The scale of layer ``name``: α from ``alpha_pattern`` (PEFT's rule) or ``lora_alpha``, over r or √r;
    1 where α is unknown (no ``lora_alpha``: the caller has warned)."""
    if "lora_alpha" not in config:
        return 1.0
    alpha = pattern_value(
        config.get("alpha_pattern"), name, config["lora_alpha"], config_path=config_path, field="alpha_pattern"
    )
    alpha = positive_number(config, "lora_alpha", config_path=config_path, value=alpha)
    return rank_scale(alpha, rank, bool(config.get("use_rslora")))


def alpha_config(
    config: Mapping | None, metadata: Mapping[str, str], alpha: float | None
) -> tuple[dict, bool, list[str]]:
    """The config that gives a LoRA-style reader its α, whether it is authoritative for r, and warnings.

    In order: adapter_config.json (``--alpha`` overrides its ``lora_alpha`` and ``alpha_pattern``); ``--alpha``
    alone; α from the safetensors metadata where tools write it; else α unknown and scale 1, said loudly.
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
    unknown = "no adapter_config.json and no α in the file's metadata: α is unknown, scale 1 is assumed"
    return {}, False, [unknown + " (pass --alpha to set it)"]


def skip_reason(key: str, config: Mapping | None, family: str) -> str:
    """Why a stored tensor of a PEFT-style adapter is not part of any layer's ΔW.

    A copy of a ``modules_to_save`` module first (it has its own bias), then base-model biases trained under
    ``bias="all"``/``"lora_only"``, else simply not a tensor of this family.
    """
    config = config or {}
    for module in config.get("modules_to_save") or []:
        if re.search(rf"(^|\.){re.escape(str(module))}\.", key):
            return MODULES_TO_SAVE
    if key.endswith(".bias") and (".base_layer." in key or config.get("bias", "none") != "none"):
        return f"a trained bias of the base model (bias={config.get('bias', 'none')!r}), not part of ΔW"
    return f"not a tensor of a {family} adapter"
