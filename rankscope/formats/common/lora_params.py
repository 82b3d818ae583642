"""LoRA on parameters (PEFT's ``target_parameters``, ``lora.ParamWrapper``): MoE expert tensors, one layer per expert.

PEFT 0.21 wraps an ``nn.Parameter`` of E stacked experts, stored (E, d₁, d₂), with one pair of factors for all of
them: ``lora_A`` (E·r, in), ``lora_B`` (out, E·r). Expert e's factors are A_e = A[e·r:(e+1)·r] (A reshaped
(E, r, in)) and B_e = B[:, e::E] (B reshaped (out, r, E)), and its update is s·B_e·A_e (s = α/r, or α/√r), an
(out, in) matrix. Most MoE blocks (Mixtral, Qwen-MoE: ``F.linear(x, W[e])``) store it as it is, (d₁, d₂) =
(out, in); blocks marked ``is_transposed`` (GPT-OSS, Aria) store (in, out) and PEFT adds its transpose. The file
cannot tell the two apart: ``--base`` does (the stored (E, d₁, d₂)); without it (out, in) is assumed, and the
singular values are the same either way. A 2-D parameter (E = 1, the MoE router ``gate.weight`` that
``target_modules="all-linear"`` adds by itself) is a plain s·B·A on its (out, in) weight.

Several parameters of one module nest: PEFT wraps them in the order the module declares them, each around the
previous, so the first declared sits deepest (``experts.base_layer.lora_A`` is ``gate_up_proj``'s when
``down_proj`` is wrapped too: ``experts.lora_A``). The file does not say which is which: the declaration order is
taken as MoE blocks have it (naming's ``MODULE_ORDER``: ``gate_up_proj`` before ``down_proj``), and ``--base``
settles it by shape where that order does not fit. r and α follow ``rank_pattern``/``alpha_pattern`` matched
against the parameter's path (``model.layers.0.mlp.experts.gate_up_proj``), as PEFT matches them.

Each expert e is a layer named ``<parameter path>[<e>]`` (``model.layers.3.mlp.experts.gate_up_proj[7]``;
core.naming reads module type ``gate_up_proj``, layer index 3, expert 7), of kind ``expert`` ((out, in) stored)
or ``expert_transposed`` ((in, out) stored), ``shape`` the stored slice's.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Mapping

from ...core.base import BaseWeights
from ...core.checkpoint import Layer
from ...core.errors import CheckpointError
from ...core.naming import MODULE_ORDER, layer_name
from ...core.update import FactoredUpdate
from . import reader
from .peft import layer_scale, pattern_value, positive_integer
from .source import AdapterSource

_WRAPPERS = re.compile(r"((?:\.base_layer)*)$")
EXPERT, TRANSPOSED = "expert", "expert_transposed"
LAYOUT_NOTE = (
    "LoRA on MoE expert parameters: each expert is analysed in the (out, in) layout Mixtral and Qwen-MoE store "
    "(kind expert); GPT-OSS-style blocks store (in, out) — a --base that stores the fused expert tensors tells "
    "(the singular values are the same either way)"
)


ORDER_NOTE = (
    "LoRA on several parameters of one module: the file does not say which nested wrapper holds which; they are "
    "taken in the order MoE blocks declare them (gate_up_proj, then down_proj; the first sits deepest, "
    "experts.base_layer) — a --base that stores the fused expert tensors checks it by shape"
)


def targets(config: Mapping) -> list[str]:
    """The config's ``target_parameters`` (a list, or one name)."""
    value = config.get("target_parameters") or []
    return [value] if isinstance(value, str) else [str(name) for name in value]


def _unwrapped(stored: str) -> tuple[str, int]:
    """A stored module path without PEFT's prefix and its trailing ``.base_layer`` wrappers, and how many."""
    wrappers = _WRAPPERS.search(stored)[1]
    return layer_name(stored[: len(stored) - len(wrappers)]), wrappers.count(".base_layer")


def _parameters(module: str, names: list[str]) -> list[str]:
    """The parameters of ``module`` that ``target_parameters`` names, as PEFT matches them (``<module>.<p>`` is a
    target or ends in ``.<target>``), in the order the module is taken to declare them (``MODULE_ORDER``). A
    target that names its module too (``gate.weight``) is taken over bare names (``gate_up_proj``), which would
    match any module: PEFT matches only parameters the module has, and the file does not list them."""
    matched = [name for name in names if _matches(f"{module}.{name.rpartition('.')[2]}", name)]
    specific = [name for name in matched if "." in name]
    return declared_order(name.rpartition(".")[2] for name in specific or matched)


def declared_order(names: Iterable[str]) -> list[str]:
    """Parameter names of one module (each once) in the order MoE blocks declare them, as PEFT wraps them
    (``MODULE_ORDER``: ``gate_up_proj`` before ``down_proj``; unknown names after, in the order given)."""
    order = {name: rank for rank, name in enumerate(MODULE_ORDER)}
    return sorted(dict.fromkeys(names), key=lambda p: order.get(p, len(order)))


def _matches(key: str, target: str) -> bool:
    """PEFT's rule for a name in ``target_parameters`` or a list of ``target_modules``."""
    return key == target or key.endswith("." + target)


def _module_targeted(module: str, config: Mapping) -> bool:
    """Whether ``target_modules`` selects ``module`` (a regex string matches it whole, a list by PEFT's rule)."""
    targets = config.get("target_modules") or []
    if isinstance(targets, str):
        try:
            return re.fullmatch(targets, module) is not None
        except re.error:  # PEFT itself could not have used it
            return False
    return any(_matches(module, str(target)) for target in targets)


def split(modules: dict[str, reader.Module], config: Mapping) -> tuple[dict[str, reader.Module], dict[str, dict]]:
    """The modules that wrap no parameter, and the wrapped ones: {module path: {depth: Module}} (depth 0 is the
    outermost wrapper, the last parameter declared). A module wraps parameters where PEFT nested wrappers on it
    (``.base_layer`` after its path), or where ``target_parameters`` names a parameter of it and
    ``target_modules`` does not select it (PEFT refuses a module both select)."""
    names = targets(config)
    if not names:
        return modules, {}
    by_path: dict[str, dict[int, tuple[str, reader.Module]]] = {}
    for stored, module in modules.items():
        path, depth = _unwrapped(stored)
        by_path.setdefault(path, {})[depth] = (stored, module)
    plain: dict[str, reader.Module] = {}
    wrapped: dict[str, dict[int, reader.Module]] = {}
    for path, levels in by_path.items():
        if max(levels) > 0 or (_parameters(path, names) and not _module_targeted(path, config)):
            wrapped[path] = {depth: module for depth, (_, module) in levels.items()}
        else:
            plain |= dict(levels.values())
    return plain, wrapped


def read_wrapped(
    source: AdapterSource, wrapped: dict[str, dict[int, reader.Module]], config: dict, base: BaseWeights | None
) -> tuple[list[tuple[reader.Module, Layer]], list[str]]:
    """Every wrapped parameter's layers (one per expert), each with the stored keys it came from, and a note
    where an expert layout was assumed (no --base, or one that stores the experts otherwise)."""
    result, assumed, ordered = [], False, False
    for path, levels in wrapped.items():
        parameters = _parameters(path, targets(config))
        stored = {name: _stored(base, f"{path}.{name}") for name in parameters}
        assigned, problem = _assign(path, levels, parameters, source, stored)
        if problem is not None:
            result.append((next(iter(levels.values())), reader.invalid_layer(path, problem)))
            continue
        ordered |= len(parameters) > 1 and not all(stored.values())
        for depth, module in sorted(levels.items(), reverse=True):
            name = assigned[depth]
            parameter = f"{path}.{name}"
            layers = _expert_layers(source, module, parameter, config, stored[name])
            assumed |= stored[name] is None and any(layer.kind == EXPERT for layer in layers)
            result += [(module, layer) for layer in layers]
    return result, ([LAYOUT_NOTE] if assumed else []) + ([ORDER_NOTE] if ordered else [])


def _stored(base: BaseWeights | None, parameter: str) -> tuple[int, ...] | None:
    """The shape ``base`` stores the parameter in, where it stores it fused (transformers ≥ 5 saves Mixtral and
    Qwen-MoE per expert, ``experts.N.w1``: those give no layout)."""
    module, _, name = parameter.rpartition(".")
    if base is None or base.key_for(module, name) is None:
        return None
    return tuple(base.shape(module, name))


def _factor_shapes(source: AdapterSource, module: reader.Module) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    if "A" not in module.keys or "B" not in module.keys:
        return None
    return tuple(source.tensors.shape(module.keys["A"])), tuple(source.tensors.shape(module.keys["B"]))


def _fits(shapes, stored: tuple[int, ...]) -> bool:
    """Whether factors A (E·r, in), B (out, E·r) fit a stored parameter (E, out, in), (E, in, out) or (out, in)."""
    if shapes is None or len(shapes[0]) != 2 or len(shapes[1]) != 2:
        return True  # a missing or malformed factor is the layer's own error
    (rows, width), (height, _) = shapes
    if len(stored) == 2:
        return stored == (height, width)
    return len(stored) == 3 and rows % stored[0] == 0 and stored[1:] in ((height, width), (width, height))


def _assign(
    path: str, levels: dict[int, reader.Module], parameters: list[str], source: AdapterSource, stored: dict
) -> tuple[dict[int, str], str | None]:
    """Which parameter each nesting depth wraps: the deepest the first declared; where the base stores them
    (``stored``: parameter → shape or None), the order of ``parameters`` that fits every level's factor shapes
    (the declared order where it does)."""
    depths = sorted(levels, reverse=True)  # deepest first: the first parameter wrapped
    keys = next(iter(levels.values())).keys
    where = f"{next(iter(keys.values()))}: " if keys else ""
    if depths != list(range(len(depths) - 1, -1, -1)) or len(depths) > len(parameters):
        return {}, (
            f"{where}{len(depths)} nested LoRA wrapper(s) on {path}, but target_parameters names "
            f"{len(parameters)} of its parameters ({', '.join(parameters) or 'none'})"
        )
    if not any(stored.values()):
        return dict(zip(depths, parameters, strict=False)), None
    shapes = {depth: _factor_shapes(source, levels[depth]) for depth in depths}
    for order in itertools.permutations(parameters, len(depths)):
        if all(
            stored[name] is None or _fits(shapes[depth], stored[name])
            for depth, name in zip(depths, order, strict=True)
        ):
            return dict(zip(depths, order, strict=True)), None
    return {}, f"{where}the LoRA factors on {path} fit none of --base's parameters {', '.join(parameters)} by shape"


def _expert_layers(
    source: AdapterSource, module: reader.Module, path: str, config: dict, stored: tuple[int, ...] | None
) -> list[Layer]:
    """The layers of one wrapped parameter ``path`` (``stored``: its shape in the base, if known): one per expert,
    or one for a 2-D parameter."""
    problem = reader.missing_parts(module, ("A", "B"), lambda role: f"lora_{role}.weight")
    if problem:
        return [reader.invalid_layer(path, problem)]
    a_key, b_key = module.keys["A"], module.keys["B"]
    a, b = source.tensors.get(a_key), source.tensors.get(b_key)
    params = a.numel() + b.numel()
    problem = reader.nonfinite_among(((a_key, a), (b_key, b)))
    if problem is None and (a.ndim != 2 or b.ndim != 2 or b.shape[1] != a.shape[0]):
        problem = f"{b_key}: expected A (E·r, in) and B (out, E·r), found {list(a.shape)} and {list(b.shape)}"
    counted = problem or _experts(source, a_key, path, a.shape[0], config, stored)
    if isinstance(counted, str):
        return [reader.invalid_layer(path, counted, params)]
    experts, rank = counted
    scale = layer_scale(config, path, rank, config_path=source.where)
    out, width = b.shape[0], a.shape[1]
    if experts == 1:  # a 2-D parameter (or a single expert): one plain s·B·A
        return [Layer(path_name(path), FactoredUpdate(b, a, scale=scale), (out, width), params, kind="linear")]
    transposed = stored is not None and stored[1:] == (width, out) and out != width
    kind, shape = (TRANSPOSED, (width, out)) if transposed else (EXPERT, (out, width))
    per_expert = rank * (out + width)
    return [
        Layer(
            f"{path}[{e}]",
            FactoredUpdate(b[:, e::experts], a[e * rank : (e + 1) * rank], scale=scale),
            shape,
            per_expert,
            kind=kind,
        )
        for e in range(experts)
    ]


def path_name(path: str) -> str:
    """A 2-D parameter's layer name: its module's for ``weight`` (``mlp.gate``), else the parameter's path."""
    return path.removesuffix(".weight")


def _experts(
    source: AdapterSource, a_key: str, path: str, rows: int, config: dict, stored: tuple[int, ...] | None
) -> tuple[int, int] | str:
    """(E, r), or the problem: E from --base's stored shape, else E·r rows over the config's r for ``path``."""
    where = source.where
    config_r = pattern_value(config.get("rank_pattern"), path, config.get("r"), config_path=where, field="rank_pattern")
    rank = positive_integer(config_r, f"r of {path}", config_path=where) if config_r is not None else None
    if stored is not None:
        experts = stored[0] if len(stored) == 3 else 1
        if rows % experts or (rank is not None and rows != experts * rank):
            return f"{a_key}: {rows} rows do not fit {experts} expert(s) of r={rank} (--base stores {list(stored)})"
        return experts, rows // experts
    if rank is None:
        raise CheckpointError(
            f"no r in the config: the expert count of {path} is unknown (pass base: the base model stores it)",
            path=where,
            argument="base",
        )
    if rows % rank:
        return f"{a_key}: {rows} rows are not a whole number of experts of r={rank}"
    return rows // rank, rank
