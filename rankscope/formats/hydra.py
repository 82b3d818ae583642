"""HydraLoRA (Tian et al., NeurIPS 2024), in its published layout (a fork of peft 0.3).

Per module: a shared ``<module>.lora_A.weight`` (r, in), heads ``<module>.lora_B<i>.weight`` (out, r) — no dot
before i — and a router ``<module>.lora_route.weight`` (N, in); ``lora_nums`` = N in adapter_config.json
(``peft_type`` "LORA"). The forward is y += s·Σ_i softmax(W_route x)_i · B_i A x with s = α/r, so ΔW depends on
the input. rankscope reports, per module: the uniform-router mean update (s/N)·Σ_i B_i A as the layer's own
record (named by the module), and each head's update s·B_i A as its components, with their pairwise alignment.
"""

from __future__ import annotations

import re
from collections import defaultdict

from ..core.checkpoint import Checkpoint, Layer, Skipped
from ..core.naming import layer_name
from ..core.update import FactoredUpdate
from . import Format, ReadOptions, register_format
from .peft_common import nonfinite_problem, pattern_value, positive_number
from .source import AdapterSource

_KEY = re.compile(r"^(?P<module>.+)\.(?:lora_A\.weight|lora_B(?P<head>\d+)\.weight|(?P<route>lora_route)\.weight)$")


def detect(source: AdapterSource) -> bool:
    if source.peft_type is not None and source.peft_type not in ("LORA", "HYDRALORA"):
        return False
    if source.config and "lora_nums" in source.config:
        return True
    return any((m := _KEY.match(key)) and (m["head"] is not None or m["route"]) for key in source.tensors)


def _group(source: AdapterSource) -> tuple[dict[str, dict], list[str]]:
    modules: dict[str, dict] = defaultdict(lambda: {"heads": {}})
    unused = []
    for key in source.tensors:
        match = _KEY.match(key)
        if match is None:
            unused.append(key)
        elif match["head"] is not None:
            modules[match["module"]]["heads"][int(match["head"])] = key
        elif match["route"]:
            modules[match["module"]]["route"] = key
        else:
            modules[match["module"]]["A"] = key
    return modules, unused


def _layer(source: AdapterSource, stored: str, keys: dict, heads_expected: int | None, config: dict) -> Layer:
    name = layer_name(stored)
    tensors = source.tensors
    params = sum(tensors.get(k).numel() for k in (keys.get("A"), keys.get("route"), *keys["heads"].values()) if k)

    def invalid(message: str) -> Layer:
        return Layer(name, None, (), params, family="hydralora", error=message)

    if "A" not in keys:
        return invalid(f"{stored}: heads without the shared {stored}.lora_A.weight")
    indices = sorted(keys["heads"])
    count = heads_expected if heads_expected is not None else len(indices)
    if indices != list(range(count)):
        missing = sorted(set(range(count)) - set(indices))
        detail = f"missing lora_B{missing[0]}.weight" if missing else f"heads {indices} for lora_nums={count}"
        return invalid(f"{stored}: {detail}")
    a = tensors.get(keys["A"])
    heads = [tensors.get(keys["heads"][i]) for i in indices]
    for key, tensor in [(keys["A"], a)] + [(keys["heads"][i], h) for i, h in zip(indices, heads, strict=True)]:
        problem = nonfinite_problem(tensor, key)
        if problem:
            return invalid(problem)
    rank = a.shape[0]
    for i, head in zip(indices, heads, strict=True):
        if head.ndim != 2 or head.shape[1] != rank or head.shape[0] != heads[0].shape[0]:
            return invalid(
                f"{keys['heads'][i]}: shape {list(head.shape)} does not fit lora_A's r={rank} and the other heads"
            )
    if "route" in keys and tuple(tensors.shape(keys["route"])) != (count, a.shape[1]):
        shape = list(tensors.shape(keys["route"]))
        return invalid(f"{keys['route']}: shape {shape}, expected [{count}, {a.shape[1]}]")
    where = source.config_path or source.weights_path
    alpha = pattern_value(config.get("alpha_pattern"), name, config.get("lora_alpha", rank), config_path=where)
    scale = positive_number(config, "lora_alpha", config_path=where, value=alpha) / rank
    shape = (heads[0].shape[0], a.shape[1])
    components = [
        Layer(f"head{i}", FactoredUpdate(head, a, scale=scale), shape, 0, family="hydralora")
        for i, head in zip(indices, heads, strict=True)
    ]
    mean_head = sum(h.double() for h in heads) / count
    return Layer(
        name, FactoredUpdate(mean_head, a, scale=scale), shape, params, family="hydralora", components=components
    )


def read(source: AdapterSource, options: ReadOptions) -> Checkpoint:
    config = dict(source.config or {})
    warnings = []
    if options.alpha is not None:
        config["lora_alpha"], config["alpha_pattern"] = options.alpha, {}
    elif "lora_alpha" not in config:
        warnings.append("no lora_alpha in the config: α is unknown, scale 1 per unit of r assumed (pass --alpha)")
    heads = config.get("lora_nums")
    heads_expected = int(heads) if isinstance(heads, int) and not isinstance(heads, bool) and heads > 0 else None
    modules, unused = _group(source)
    layers = [_layer(source, stored, keys, heads_expected, config) for stored, keys in modules.items()]
    skipped = [Skipped(key, "not a tensor of a HydraLoRA adapter") for key in unused]
    skipped += [
        Skipped(
            keys["route"], "HydraLoRA router: the input decides the head weights; layers use the uniform router", True
        )
        for keys in modules.values()
        if "route" in keys
    ]
    notes = [
        "HydraLoRA's update depends on the input through its router: each layer reports the uniform-router mean "
        "(s/N)·Σ B_i A, with the heads s·B_i A as its components"
    ]
    return Checkpoint(
        path=source.path,
        family="hydralora",
        adapter_type="HYDRALORA",
        config=dict(source.config or {}),
        layers=layers,
        skipped=skipped,
        warnings=warnings,
        notes=notes,
        weights_file=source.weights_path,
    )


register_format(
    Format("hydralora", "HydraLoRA: shared A, heads lora_B<i>, router lora_route", detect, read, priority=15)
)
