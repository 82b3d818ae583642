"""PEFT's LoHa and LoKr readers' shared steps: one ``LycorisConfig`` (r, alpha, rank_pattern, alpha_pattern) and
one reading loop; each reader supplies only how a module's factors become its scaled update."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ...core.checkpoint import Checkpoint, Layer
from ...core.errors import CheckpointError
from .lycoris_math import FactorError, Stored, layer_shape
from .peft import pattern_value, skip_reason
from .reader import Module, build_checkpoint, group_keys, invalid_layer, second_spellings, skipped_keys
from .source import AdapterSource


@dataclass(frozen=True)
class PeftScaling:
    """r and α per layer from a PEFT LoHa/LoKr adapter_config.json (None without one), or from ``--alpha``."""

    config: dict | None
    alpha_override: float | None
    where: Path | None

    def rank(self, name: str) -> int | None:
        """The config's r for this layer (``rank_pattern`` first), or None without a config."""
        if self.config is None:
            return None
        raw = pattern_value(self.config.get("rank_pattern"), name, self.config.get("r", 8), config_path=self.where)
        if isinstance(raw, bool) or not isinstance(raw, int) or raw <= 0:
            raise CheckpointError(f"r must be a positive integer, found {raw!r} for layer {name!r}", path=self.where)
        return raw

    def alpha(self, name: str) -> float | None:
        """The layer's α (``alpha_pattern`` first, ``--alpha`` over both), or None where nothing gives one."""
        if self.alpha_override is not None:
            return self.alpha_override
        if self.config is None:
            return None
        raw = pattern_value(self.config.get("alpha_pattern"), name, self.config.get("alpha", 8), config_path=self.where)
        if isinstance(raw, bool) or not isinstance(raw, (int, float)) or not math.isfinite(raw):
            raise CheckpointError(f"alpha must be a finite number, found {raw!r} for layer {name!r}", path=self.where)
        return float(raw)


def peft_scaling(
    config: dict | None, alpha_override: float | None, where: Path | None
) -> tuple[PeftScaling, list[str]]:
    """The scaling settings of a PEFT LoHa/LoKr adapter, with warnings about what had to be assumed."""
    warnings = []
    if alpha_override is not None:
        origin = "alpha and alpha_pattern of the config" if config is not None else "the unknown α"
        warnings.append(f"--alpha {alpha_override:g} overrides {origin}")
    elif config is None:
        warnings.append("no adapter_config.json: α is unknown, scale 1 is assumed (pass --alpha to set it)")
    return PeftScaling(config, alpha_override, where), warnings


Build = Callable[[Stored, Module, PeftScaling], tuple[object, object, bool]]
"""A module's (scaled update, its factors (``out_features``, ``in_features``, ``kernel``), whether scale 1 was
assumed for want of r); raises :class:`FactorError` where the factors do not fit."""


def read_peft_lycoris(
    source: AdapterSource, options, *, family: str, adapter_type: str, what: str, pattern: re.Pattern, build: Build
) -> tuple[Checkpoint, list[str]]:
    """Every module's layer of a PEFT LoHa/LoKr adapter (``what``: "LoHa", for messages), and the names of the
    layers whose scale 1 was assumed."""
    scaling, warnings = peft_scaling(source.config, options.alpha, source.where)
    modules, unused = group_keys(source.tensors.keys(), pattern)
    layers, assumed = [], []
    for module in modules.values():
        stored = {role: (key, source.tensors.get(key)) for role, key in module.keys.items()}
        params = sum(tensor.numel() for _, tensor in stored.values())
        try:
            update, factors, unknown = build(stored, module, scaling)
            width = update.shape[1]
            shape, kind = layer_shape(
                options.base, module.name, factors.out_features, factors.in_features, factors.kernel, width
            )
        except FactorError as exc:
            layers.append(invalid_layer(module.name, str(exc), params, family=family))
            continue
        layers.append(Layer(module.name, update, shape, params, kind=kind, family=family))
        if unknown:
            assumed.append(module.name)
    checkpoint = build_checkpoint(
        source,
        family=family,
        adapter_type=adapter_type,
        layers=layers,
        skipped=skipped_keys(unused, lambda key: skip_reason(key, source.config, what))
        + second_spellings(modules.values()),
        warnings=warnings,
    )
    return checkpoint, assumed
