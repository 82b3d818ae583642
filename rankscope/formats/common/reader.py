"""The steps every reader shares, in one place: a reader declares its keys and its per-layer maths, these do the rest.

(Model: PEFT's ``BaseTunerLayer``, whose subclasses declare ``adapter_layer_names`` and whose generic code works
from them.) A family's reader

1. says whether the files are its: :func:`detect_by` (the config's ``peft_type``, else a key pattern);
2. checks its config: :func:`refuse_flags` (switches it would misread), :func:`override_alpha` (``alpha``);
3. groups the stored keys by module and part: :func:`group_keys` (its key pattern names the ``module``, a role
   function the part), keeping what no module owns for ``skipped``;
4. builds each module's :class:`~...core.checkpoint.Layer` (its own maths), or :func:`invalid_layer` with the
   first problem (:func:`nonfinite_among` for NaN/Inf factors, :func:`missing_parts` for a part without its partner);
5. returns :func:`build_checkpoint`: the layers with the source's paths and config, ``skipped``, warnings, notes.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ...core.base import BaseWeights
from ...core.checkpoint import Checkpoint, Layer, Skipped
from ...core.errors import CheckpointError, UnsupportedAdapterError
from ...core.naming import layer_name
from .peft import ambiguous_patterns, nonfinite_problem, truthy
from .source import AdapterSource

Role = Hashable  # a part of a module: "A", "sigma", ("B", 3) for an indexed factor


@dataclass
class Module:
    """The stored keys of one adapted module: role → key (the first key of a role; any later one of the same
    role is kept in ``duplicates``, for the reader to refuse or skip)."""

    stored: str
    keys: dict[Role, str] = field(default_factory=dict)
    duplicates: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        """The layer's name (:func:`~...core.naming.layer_name` of the stored module path)."""
        return layer_name(self.stored)

    def indexed(self, part: str) -> dict[int, str]:
        """The keys of an indexed part (roles ``(part, i)``): i → key, in index order."""
        found = {role[1]: key for role, key in self.keys.items() if isinstance(role, tuple) and role[0] == part}
        return dict(sorted(found.items()))


def named_role(match: re.Match) -> Role | None:
    """The role a key pattern names in its ``role`` group."""
    return match["role"]


def group_keys(
    keys: Iterable[str], pattern: re.Pattern, role: Callable[[re.Match], Role | None] = named_role
) -> tuple[dict[str, Module], list[str]]:
    """Keys by the module ``pattern``'s ``module`` group names and the part ``role(match)`` gives (None: not one
    of this family's keys); returns ({module path: Module}, the keys no module owns), both in stored order."""
    modules: dict[str, Module] = {}
    unused: list[str] = []
    for key in keys:
        match = pattern.match(key)
        part = role(match) if match is not None else None
        if part is None:
            unused.append(key)
            continue
        module = modules.setdefault(match["module"], Module(match["module"]))
        if part in module.keys:
            module.duplicates.append(key)  # a second spelling of one part ("lora_sigma" and "lora_sigma.weight")
        else:
            module.keys[part] = key
    return modules, unused


def detect_by(peft_type: str, matches: Callable[[str], object]) -> Callable[[AdapterSource], bool]:
    """A detector: a config's ``peft_type`` decides where there is one, else any key that ``matches``."""

    def detect(source: AdapterSource) -> bool:
        if source.peft_type is not None:
            return source.peft_type == peft_type
        return any(matches(key) for key in source.tensors)

    return detect


def refuse_flags(config: Mapping | None, refused: Mapping[str, str], where: Path | None) -> None:
    """Raise for the first config switch in ``refused`` (flag → why this reader would misread it) that is set."""
    for flag, reason in refused.items():
        if truthy((config or {}).get(flag)):
            raise UnsupportedAdapterError(f"{reason} ({flag} is set)", path=where)


ALPHA_UNKNOWN = "no lora_alpha in the config: α is unknown, scale 1 per unit of r assumed (pass --alpha)"


def override_alpha(config: dict, alpha: float | None) -> list[str]:
    """Apply ``alpha`` to a config in place (it replaces ``lora_alpha`` and every ``alpha_pattern``); a warning
    where neither gives α."""
    if alpha is not None:
        config["lora_alpha"], config["alpha_pattern"] = alpha, {}
        return []
    return [] if "lora_alpha" in config else [ALPHA_UNKNOWN]


def nonfinite_among(tensors: Iterable[tuple[str | None, torch.Tensor | None]]) -> str | None:
    """The first NaN/Inf problem among (key, tensor) pairs (a None tensor is absent), or None."""
    for key, tensor in tensors:
        problem = nonfinite_problem(tensor, key) if tensor is not None else None
        if problem:
            return problem
    return None


def missing_parts(
    module: Module, needed: Sequence[Role], spelling: Callable[[Role], str], sep: str = " and "
) -> str | None:
    """ "<a stored key>: has no matching <the missing parts>" where a part in ``needed`` is absent, else None."""
    missing = [role for role in needed if role not in module.keys]
    if not missing:
        return None
    present = next(iter(module.keys.values()))
    return f"{present}: has no matching {sep.join(spelling(role) for role in missing)}"


def require_base(source: AdapterSource, base: BaseWeights | None, why: str) -> BaseWeights:
    """``base``, or a one-line error naming the argument: ``why`` says what of ΔW needs the base weights."""
    if base is None:
        raise CheckpointError(
            f"{why}, so ΔW needs the base model's weights: pass base=PATH (the base model directory or safetensors "
            "file)",
            path=source.where,
            argument="base",
        )
    return base


def invalid_layer(name: str, message: str, params: int = 0, **fields) -> Layer:
    """A layer that cannot be analysed: no update, no shape, ``message`` says why (it names the key)."""
    return Layer(name, None, (), params, error=message, **fields)


def skipped_keys(keys: Iterable[str], reason: Callable[[str], str]) -> list[Skipped]:
    """The keys no layer uses, each with ``reason(key)``."""
    return [Skipped(key, reason(key)) for key in keys]


def second_spellings(modules: Iterable[Module]) -> list[Skipped]:
    """The later keys of a part stored twice (``lora_down`` and ``lora_down.weight``), for readers that read the
    first one and skip the others."""
    return [
        Skipped(key, "a second tensor for a part of this module (the first one stored is read)")
        for module in modules
        for key in module.duplicates
    ]


def build_checkpoint(
    source: AdapterSource,
    *,
    family: str,
    adapter_type: str,
    layers: list[Layer],
    skipped: list[Skipped] | None = None,
    warnings: list[str] | None = None,
    notes: list[str] | None = None,
    config: dict | None = None,
    **extra,
) -> Checkpoint:
    """The reader's result: ``layers`` with the source's path, weights file and config (``config`` where the
    reader records another, as kohya does its metadata), and whatever it skipped, warned about and noted."""
    return Checkpoint(
        path=source.path,
        family=family,
        adapter_type=adapter_type,
        config=dict(source.config or {}) if config is None else config,
        layers=layers,
        skipped=list(skipped or []),
        warnings=list(warnings or []) + ambiguous_patterns(source.config, [layer.name for layer in layers]),
        notes=list(notes or []),
        weights_file=source.weights_path,
        **extra,
    )
