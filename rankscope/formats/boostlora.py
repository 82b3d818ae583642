"""BoostLoRA single-file layout: all k components of a weighted composition in one PEFT-like adapter.

rankscope defines this layout (no published one exists) for training code that keeps the k components in one
module. ``adapter_config.json``::

    {"peft_type": "BOOSTLORA", "r": 4 | [r_1, …, r_k], "lora_alpha": 8 | [α_1, …, α_k], "use_rslora": false,
     "num_components": k, "weight_normalization": "none" | "softmax", "mode": "sum" | "sequential"}

Tensors per module: ``<module>.lora_A.<i>.weight`` (r_i, in) and ``<module>.lora_B.<i>.weight`` (out, r_i) for
i = 0..k−1, and ``<module>.boost_weights`` (k,) — raw weights (logits under softmax). ΔW = Σ_i w_i·s_i·B_i·A_i with
s_i = α_i/r_i (α_i/√r_i with use_rslora). The keys look like MELoRA's; this reader is chosen by ``peft_type``
or by the presence of ``boost_weights``.
"""

from __future__ import annotations

import re
from dataclasses import replace

from ..core.checkpoint import Checkpoint, Layer
from ..core.compose import MODES, NORMALIZATIONS, compose_layer
from ..core.errors import CheckpointError
from ..core.update import FactoredUpdate
from . import Format, ReadOptions, register_format
from .common import reader
from .common.peft import positive_number, rank_scale
from .common.source import AdapterSource

_KEY = re.compile(r"^(?P<module>.+)\.(?:lora_(?P<factor>[AB])\.(?P<index>\d+)\.weight|(?P<weights>boost_weights))$")


detect = reader.detect_by("BOOSTLORA", lambda key: key.endswith(".boost_weights"))


def _role(match: re.Match) -> str | tuple[str, int]:
    return "weights" if match["weights"] else (match["factor"], int(match["index"]))


def _per_component(config: dict, field: str, count: int, where) -> list[float]:
    value = config.get(field)
    values = value if isinstance(value, list) else [value] * count
    if len(values) != count:
        raise CheckpointError(f"{field} lists {len(values)} values for {count} components", path=where)
    return [positive_number(config, field, config_path=where, value=v) for v in values]


def _choice(config: dict, field: str, allowed: tuple[str, ...], where) -> str:
    value = config.get(field, allowed[0])
    if value not in allowed:
        raise CheckpointError(f"{field} must be one of {', '.join(allowed)}, found {value!r}", path=where)
    return value


def _layer(source: AdapterSource, module: reader.Module, count: int, settings: dict) -> Layer:
    name, stored = module.name, module.stored
    tensors = source.tensors
    keys = {
        "A": module.indexed("A"),
        "B": module.indexed("B"),
        **({"weights": module.keys["weights"]} if "weights" in module.keys else {}),
    }
    params = sum(tensors.numel(k) for k in module.keys.values())

    def invalid(message: str) -> Layer:
        return reader.invalid_layer(name, message, params, family="composition")

    if "weights" not in keys:
        return invalid(f"{stored}: components without {stored}.boost_weights")
    for factor in ("A", "B"):
        if list(keys[factor]) != list(range(count)):
            missing = sorted(set(range(count)) - set(keys[factor]))
            return invalid(f"{stored}: missing lora_{factor}.{missing[0] if missing else count}.weight "
                           f"(num_components={count})")  # fmt: skip
    raw = tensors.get(keys["weights"]).double().reshape(-1)
    if raw.numel() != count:
        return invalid(f"{keys['weights']}: {raw.numel()} weights for {count} components")
    components = []
    for i in range(count):
        a, b = tensors.get(keys["A"][i]), tensors.get(keys["B"][i])
        problem = reader.nonfinite_among(((keys["A"][i], a), (keys["B"][i], b), (keys["weights"], raw)))
        if problem:
            return invalid(problem)
        if a.ndim != 2 or b.ndim != 2 or b.shape[1] != a.shape[0]:
            return invalid(f"{keys['B'][i]}: shape {list(b.shape)} does not fit {keys['A'][i]} {list(a.shape)}")
        rank = a.shape[0]
        if settings["ranks"][i] is not None and settings["ranks"][i] != rank:
            return invalid(
                f"{keys['A'][i]}: the config gives r={settings['ranks'][i]:g} but the tensor has {rank} rows"
            )
        alpha = settings["alphas"][i] if settings["alphas"][i] is not None else rank  # unknown α: scale 1
        scale = rank_scale(alpha, rank, settings["rslora"])
        components.append(Layer(f"c{i}", FactoredUpdate(b, a, scale=scale), (b.shape[0], a.shape[1]), 0))
    layer = compose_layer(name, components, raw.tolist(), normalize=settings["normalize"], mode=settings["mode"])
    return replace(layer, params=params)


def read(source: AdapterSource, options: ReadOptions) -> Checkpoint:
    config = dict(source.config or {})
    where = source.where
    modules, unused = reader.group_keys(source.tensors, _KEY, _role)
    indices = {role[1] for module in modules.values() for role in module.keys if isinstance(role, tuple)}
    count = config.get("num_components", max(indices, default=-1) + 1)
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise CheckpointError(f"num_components must be a positive integer, found {count!r}", path=where)
    warnings = reader.override_alpha(config, options.alpha)
    settings = {
        "alphas": _per_component(config, "lora_alpha", count, where) if "lora_alpha" in config else [None] * count,
        "ranks": _per_component(config, "r", count, where) if "r" in config else [None] * count,
        "rslora": bool(config.get("use_rslora")),
        "normalize": _choice(config, "weight_normalization", NORMALIZATIONS, where),
        "mode": _choice(config, "mode", MODES, where),
    }
    layers = [_layer(source, module, count, settings) for module in modules.values()]
    return reader.build_checkpoint(
        source,
        family="composition",
        adapter_type="BOOSTLORA",
        layers=layers,
        skipped=reader.skipped_keys(unused, lambda key: "not a tensor of a BoostLoRA adapter"),
        warnings=warnings,
        notes=[f"{count} components, mode {settings['mode']}, weights normalised: {settings['normalize']}"],
    )


register_format(
    Format(
        "boostlora",
        "BoostLoRA single file: lora_A.<i>/lora_B.<i> + boost_weights",
        detect,
        read,
        priority=12,
        needs="nothing",
        spectrum="factored",
    )
)
