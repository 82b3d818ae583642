"""HydraLoRA (Tian et al., NeurIPS 2024), in its published layout (a fork of peft 0.3).

Per module: a shared ``<module>.lora_A.weight`` (r, in), heads ``<module>.lora_B<i>.weight`` (out, r) — no dot
before i — and a router ``<module>.lora_route.weight`` (N, in); ``lora_nums`` = N in adapter_config.json
(``peft_type`` "LORA"). The forward is y += s·Σ_i softmax(W_route x)_i · B_i A x with s = α/r, so ΔW depends on
the input. rankscope reports, per module: the uniform-router mean update (s/N)·Σ_i B_i A as the layer's own
record (named by the module), and each head's update s·B_i A as its components, with their pairwise alignment.
"""

from __future__ import annotations

import re

from ..core.checkpoint import Checkpoint, Layer, Skipped
from ..core.formed import FormedUpdate, Summed
from ..core.update import FactoredUpdate
from . import Format, ReadOptions, register_format
from .common import reader
from .common.peft import pattern_value, positive_number
from .common.source import AdapterSource

ROUTER_NOTE = (
    "HydraLoRA's update depends on the input through its router: each layer reports the uniform-router mean "
    "(s/N)·Σ B_i A, with the heads s·B_i A as its components"
)
_KEY = re.compile(r"^(?P<module>.+)\.(?:lora_A\.weight|lora_B(?P<head>\d+)\.weight|(?P<route>lora_route)\.weight)$")


def detect(source: AdapterSource) -> bool:
    if source.peft_type is not None and source.peft_type not in ("LORA", "HYDRALORA"):
        return False
    if source.config and "lora_nums" in source.config:
        return True
    return any((m := _KEY.match(key)) and (m["head"] is not None or m["route"]) for key in source.tensors)


def _role(match: re.Match) -> str | tuple[str, int]:
    if match["head"] is not None:
        return "B", int(match["head"])
    return "route" if match["route"] else "A"


def _layer(source: AdapterSource, module: reader.Module, heads_expected: int | None, config: dict) -> Layer:
    name, stored, keys = module.name, module.stored, module.keys
    tensors = source.tensors
    head_keys = module.indexed("B")
    params = sum(tensors.numel(k) for k in keys.values())

    def invalid(message: str) -> Layer:
        return reader.invalid_layer(name, message, params, family="hydralora")

    if "A" not in keys:
        return invalid(f"{stored}: heads without the shared {stored}.lora_A.weight")
    indices = list(head_keys)
    count = heads_expected if heads_expected is not None else len(indices)
    if indices != list(range(count)):
        missing = sorted(set(range(count)) - set(indices))
        detail = f"missing lora_B{missing[0]}.weight" if missing else f"heads {indices} for lora_nums={count}"
        return invalid(f"{stored}: {detail}")
    a = tensors.get(keys["A"])
    heads = [tensors.get(head_keys[i]) for i in indices]
    problem = reader.nonfinite_among([(keys["A"], a), *zip(head_keys.values(), heads, strict=True)])
    if problem:
        return invalid(problem)
    rank = a.shape[0]
    for i, head in zip(indices, heads, strict=True):
        if head.ndim != 2 or head.shape[1] != rank or head.shape[0] != heads[0].shape[0]:
            return invalid(
                f"{head_keys[i]}: shape {list(head.shape)} does not fit lora_A's r={rank} and the other heads"
            )
    if "route" in keys and tuple(tensors.shape(keys["route"])) != (count, a.shape[1]):
        shape = list(tensors.shape(keys["route"]))
        return invalid(f"{keys['route']}: shape {shape}, expected [{count}, {a.shape[1]}]")
    where = source.where
    alpha = pattern_value(config.get("alpha_pattern"), name, config.get("lora_alpha", rank), config_path=where)
    scale = positive_number(config, "lora_alpha", config_path=where, value=alpha) / rank
    shape = (heads[0].shape[0], a.shape[1])
    components = [
        Layer(f"head{i}", FactoredUpdate(head, a, scale=scale), shape, 0, family="hydralora")
        for i, head in zip(indices, heads, strict=True)
    ]
    # the mean head (1/N)·Σ B_i is summed in float64 as the spectrum reads it, not held per layer
    mean = FormedUpdate(Summed(heads, count), a.mT, scale=scale)
    return Layer(name, mean, shape, params, family="hydralora", components=components)


def read(source: AdapterSource, options: ReadOptions) -> Checkpoint:
    config = dict(source.config or {})
    warnings = reader.override_alpha(config, options.alpha)
    heads = config.get("lora_nums")
    heads_expected = int(heads) if isinstance(heads, int) and not isinstance(heads, bool) and heads > 0 else None
    modules, unused = reader.group_keys(source.tensors, _KEY, _role)
    layers = [_layer(source, module, heads_expected, config) for module in modules.values()]
    skipped = reader.skipped_keys(unused, lambda key: "not a tensor of a HydraLoRA adapter")
    skipped += [
        Skipped(
            module.keys["route"],
            "HydraLoRA router: the input decides the head weights; layers use the uniform router",
            True,
        )
        for module in modules.values()
        if "route" in module.keys
    ]
    return reader.build_checkpoint(
        source,
        family="hydralora",
        adapter_type="HYDRALORA",
        layers=layers,
        skipped=skipped,
        warnings=warnings,
        notes=[ROUTER_NOTE],
    )


register_format(
    Format(
        "hydralora",
        "HydraLoRA: shared A, heads lora_B<i>, router lora_route",
        detect,
        read,
        priority=15,
        needs="nothing",
        spectrum="factored",
    )
)
