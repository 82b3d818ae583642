"""MoE expert layers written back in PEFT's stacked layout (``target_parameters``, ``lora.ParamWrapper``).

PEFT gives all E experts of a parameter one rank r and one pair of factors: ``lora_A`` (E·r, in), whose rows
[e·r, (e+1)·r) are expert e's A_e, and ``lora_B`` (out, E·r), whose columns e, e + E, … are its B_e (the layout
``formats.common.lora_params`` reads). Expert e keeps its own rank k_e ≤ r = max_e k_e: its truncated factors fill
the first k_e of its r rows and columns, the rest are zero, so that s·B_e·A_e is still U_kΣ_kV_kᵀ with the one
scale s = α/r (α/√r under rsLoRA) of the parameter.

Several parameters of one module nest as PEFT wraps them, the first declared deepest (``experts.base_layer.lora_A``
for ``gate_up_proj`` where ``down_proj`` is wrapped too): the depth is taken over the module's parameters that the
written ``target_parameters`` select, in the order the reader assumes (``lora_params.declared_order``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from ..core.naming import expert_slice
from ..formats.common.lora_params import declared_order


def parameter_of(name: str) -> tuple[str, int] | None:
    """(parameter path, expert index) of an expert layer's name ``<path>[<e>]``; None for other names."""
    return expert_slice(name)


def group_experts(items: Sequence, name_of: Callable) -> tuple[dict[str, dict[int, object]], list[str]]:
    """{parameter path: {expert index: item}} where every expert 0 … E−1 is there; and the paths left out, each
    with the experts missing (an expert that could not be analysed leaves its whole parameter unwritable)."""
    groups: dict[str, dict[int, object]] = {}
    for item in items:
        path, expert = parameter_of(name_of(item))  # type: ignore[misc]
        groups.setdefault(path, {})[expert] = item
    whole, broken = {}, []
    for path, members in groups.items():
        missing = sorted(set(range(max(members) + 1)) - set(members))
        if missing:
            broken.append(f"{path} (expert(s) {', '.join(map(str, missing[:3]))} cannot be analysed)")
        else:
            whole[path] = dict(sorted(members.items()))
    return whole, broken


def stack(
    experts: Sequence[tuple[torch.Tensor, torch.Tensor] | None],
    shape: tuple[int, int],
    alpha: float,
    rank: int,
    use_rslora: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(lora_A (E·r, in), lora_B (out, E·r)) of E experts given as (U_kΣ_k^½, Σ_k^½V_kᵀ) each (None: a zero
    expert), divided by √s so that s·B_e·A_e = U_kΣ_kV_kᵀ, s = α/r (α/√r)."""
    count, (out, width) = len(experts), shape
    root = math.sqrt(alpha / (math.sqrt(rank) if use_rslora else rank))
    down = torch.zeros(count * rank, width, dtype=torch.float64)
    up = torch.zeros(out, count * rank, dtype=torch.float64)
    for e, factors in enumerate(experts):
        if factors is None:
            continue
        left, right = factors
        k = left.shape[1]
        down[e * rank : e * rank + k] = right / root
        up[:, e::count][:, :k] = left / root
    return down, up


def nesting_depths(parameters: Sequence[str], targets: Sequence[str]) -> dict[str, int]:
    """Parameter path → how many ``.base_layer`` wrappers lie outside its factors: per module, over its parameters
    that ``targets`` select (PEFT's rule: the path is a target or ends in ``.<target>``), the last declared 0."""
    modules: dict[str, list[str]] = {}
    for path in parameters:
        module, _, name = path.rpartition(".")
        modules.setdefault(module, []).append(name)
    depths = {}
    for module, names in modules.items():
        wrapped = [n for n in declared_order(names) if any(f"{module}.{n}" == t or f"{module}.{n}".endswith(f".{t}")
                                                           for t in targets)]  # fmt: skip
        for name in names:
            depths[f"{module}.{name}"] = len(wrapped) - 1 - wrapped.index(name) if name in wrapped else 0
    return depths


__all__ = ["group_experts", "nesting_depths", "parameter_of", "stack"]
