"""PEFT VeRA (``peft_type`` "VERA"): two trained scaling vectors per layer on frozen random projections.

Per adapted layer the file holds ``<module>.vera_lambda_b`` (out,) and ``<module>.vera_lambda_d`` (r,); the
random projections are shared by all layers and saved once, as ``base_model.vera_A`` (r, max_in) and
``base_model.vera_B`` (max_out, r), when ``save_projection`` is true (PEFT's default). A layer uses their
top-left corner:

    ΔW = diag(λ_b) · B[:out, :] · diag(λ_d) · A[:, :in]        (no scaling factor)

transposed for GPT-2 Conv1D (``fan_in_fan_out``); the analysed matrix stays (out, in). As a
``FormedUpdate(left=λ_b[:, None]·B[:out], core=diag(λ_d), right=A[:, :in])`` its spectrum is exact, rank
≤ min(r, out, in). ``λ_b·B`` is a recipe (``core.formed.RowScaled``), formed in float64 only while the spectrum
reads it — exact products of float32 values, and nothing of out × r held per layer (at r = 256 and the
Llama-3-8B shape that would be 2.8 GB); the layers with the same fan-in share one view of A.

The file does not store a layer's input width ``in``. With the base model (``--base``) it is read from the base
weight; without it every layer is taken to use all max_in columns of A — right where all adapted layers have
the same fan-in (say q_proj and v_proj), wrong otherwise — and a warning says so.

With ``save_projection=False`` the projections are not in the file: PEFT redraws them from
``projection_prng_key`` with torch's CPU generator, sized by the largest adapted layer of the base model, so
rankscope can redraw them too when the base model is given (:func:`regenerate_projections`).

Parameters: λ_b and λ_d are what VeRA trains; A and B are frozen buffers (PEFT's ``requires_grad`` is off),
so ``params`` counts λ_b + λ_d per layer and the shared projections are not counted as trainable
(``shared_params`` = 0); a warning states their size.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from ..core.checkpoint import Checkpoint, Layer
from ..core.errors import CheckpointError
from ..core.formed import FormedUpdate, RowScaled
from . import Format, ReadOptions, register_format
from .common import reader
from .common.peft import nonfinite_problem, positive_integer, skip_reason, trained_bias_changes
from .common.source import AdapterSource

_LAMBDA = re.compile(r"^(?P<module>.+)\.vera_lambda_(?P<which>[bd])$")
_SHARED = {"A": ("base_model.vera_A", "vera_A"), "B": ("base_model.vera_B", "vera_B")}  # with and without prefix
_PER_LAYER_COPY = re.compile(r"\.vera_[AB]$")


detect = reader.detect_by("VERA", _LAMBDA.match)


def _kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """U(−b, b) with b = √3 · √2/√fan_in, fan_in = shape[1]: PEFT's ``_kaiming_init`` (float32, in this order)."""
    tensor = torch.empty(shape, dtype=torch.float32)
    bound = math.sqrt(3.0) * (math.sqrt(2) / math.sqrt(shape[1]))
    with torch.no_grad():
        return tensor.uniform_(-bound, bound, generator=generator)


def regenerate_projections(seed: int, r: int, max_in: int, max_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """VeRA's shared (A, B) as PEFT draws them when ``save_projection`` is false.

    One CPU ``torch.Generator`` seeded with ``projection_prng_key`` draws A (r, max_in) first, then
    B (max_out, r), each Kaiming-uniform over its own fan-in. Deterministic for a given torch build (PEFT's own
    warning: "may not be accurate on all system configurations").
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    a = _kaiming_uniform((r, max_in), generator)
    b = _kaiming_uniform((max_out, r), generator)
    return a, b


@dataclass(frozen=True)
class _Orientation:
    """A layer's input width and whether its base weight is stored (in, out) (GPT-2 Conv1D)."""

    width: int
    transposed: bool
    shape: tuple[int, ...]


def _orientation(options: ReadOptions, name: str, out: int, max_in: int, fan_in_fan_out: bool) -> _Orientation:
    """in and the stored layout of one layer: from its base weight where the base model is given.

    PEFT sets ``fan_in_fan_out`` per module type while building (Linear: false, Conv1D: true) and saves the value
    left by the last module, so on a model mixing both the flag is not the layer's: the stored out width (the
    length of λ_b) tells which axis of the base weight is ``out``.
    """
    if options.base is None:
        shape = (max_in, out) if fan_in_fan_out else (out, max_in)
        return _Orientation(max_in, fan_in_fan_out, shape)
    shape = tuple(options.base.shape(name))
    if len(shape) != 2:
        raise CheckpointError(f"VeRA adapts Linear and Conv1D layers, but the base weight has shape {list(shape)}")
    # (axis of out, transposed): the config's layout first, then the other one
    candidates = ((1, True), (0, False)) if fan_in_fan_out else ((0, False), (1, True))
    for out_axis, transposed in candidates:
        if shape[out_axis] == out:
            return _Orientation(shape[1 - out_axis], transposed, shape)
    raise CheckpointError(f"the base weight has shape {list(shape)}, neither axis has the {out} outputs of λ_b")


def _stored_projection(source: AdapterSource, which: str) -> tuple[str, torch.Tensor] | None:
    for key in _SHARED[which]:
        if key in source.tensors:
            return key, source.tensors.get(key)
    return None


def _regenerated(
    source: AdapterSource, options: ReadOptions, modules: dict[str, reader.Module], r: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Redraw A and B from ``projection_prng_key``, sized by the largest adapted layer of the base model."""
    config = source.config or {}
    where = source.where
    if options.base is None:
        raise CheckpointError(
            f"the shared projection {_SHARED['A'][0]!r} is not in the file (save_projection=false): PEFT redraws "
            "it from projection_prng_key at the size of the base model's largest adapted layer; pass "
            "base=PATH (the base model) so rankscope can redraw it",
            path=source.weights_path,
            key=_SHARED["A"][0],
            argument="base",
        )
    seed = config.get("projection_prng_key")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise CheckpointError(
            f"save_projection is false and projection_prng_key is not an integer ({seed!r})", path=where
        )
    fan_in_fan_out = bool(config.get("fan_in_fan_out"))
    max_in = max_out = 0
    for module in modules.values():
        if "b" not in module.keys:
            continue  # an invalid layer (no λ_b): PEFT would not have built it either
        name = module.name
        out = source.tensors.shape(module.keys["b"])[0]
        try:
            orientation = _orientation(options, name, out, 0, fan_in_fan_out)
        except CheckpointError as exc:
            raise CheckpointError(f"cannot size the redrawn projections: {exc}", path=options.base.path) from exc
        max_in, max_out = max(max_in, orientation.width), max(max_out, out)
    return regenerate_projections(seed, r, max_in, max_out)


def _projections(
    source: AdapterSource, options: ReadOptions, modules: dict[str, reader.Module]
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """The shared (A, B), stored or redrawn, checked against each other and the config's r; with notes."""
    config = source.config or {}
    where = source.where
    stored_a, stored_b = _stored_projection(source, "A"), _stored_projection(source, "B")
    r = positive_integer(config["r"], "VeRA's r", config_path=where) if "r" in config else None
    if stored_a is None and stored_b is None and config.get("save_projection") is False:
        if r is None:
            raise CheckpointError("save_projection is false but the config has no r to redraw vera_A with", path=where)
        a, b = _regenerated(source, options, modules, r)
        notes = [
            f"vera_A/vera_B are not in the file (save_projection=false): redrawn from projection_prng_key="
            f"{config.get('projection_prng_key')} with torch's CPU generator, as PEFT does for a model whose only "
            "VeRA adapter is this one"
        ]
        return a, b, notes
    for which, found in (("A", stored_a), ("B", stored_b)):
        if found is None:
            said = source.config is not None and config.get("save_projection", True)
            why = "the config says save_projection=true" if said else "every layer's ΔW needs it"
            raise CheckpointError(
                f"the shared projection vera_{which} is missing ({why}); the file is incomplete",
                path=source.weights_path,
                key=_SHARED[which][0],
            )
    (a_key, a), (b_key, b) = stored_a, stored_b
    for key, tensor in ((a_key, a), (b_key, b)):
        problem = nonfinite_problem(tensor, key)
        if tensor.ndim != 2 or problem:
            message = problem.removeprefix(f"{key}: ") if problem else f"expected a matrix, found {list(tensor.shape)}"
            raise CheckpointError(message, path=source.weights_path, key=key)
    if a.shape[0] != b.shape[1]:
        raise CheckpointError(
            f"rank mismatch: {a_key} has {a.shape[0]} rows but {b_key} has {b.shape[1]} columns",
            path=source.weights_path,
            key=b_key,
        )
    if r is not None and a.shape[0] != r:
        raise CheckpointError(
            f"the config gives r={r} but {a_key} has {a.shape[0]} rows", path=source.weights_path, key=a_key
        )
    return a, b, []


def _layer(
    source: AdapterSource,
    module: reader.Module,
    projections: tuple[torch.Tensor, torch.Tensor],
    options: ReadOptions,
    fan_in_fan_out: bool,
    columns: dict[int, torch.Tensor],
) -> Layer:
    tensors = source.tensors
    name = module.name
    missing = reader.missing_parts(module, ("b", "d"), lambda which: f"vera_lambda_{which}")
    if missing:
        return reader.invalid_layer(name, missing, family="vera")
    b_key, d_key = module.keys["b"], module.keys["d"]
    lambda_b, lambda_d = tensors.get(b_key), tensors.get(d_key)
    params = lambda_b.numel() + lambda_d.numel()

    def invalid(message: str) -> Layer:
        return reader.invalid_layer(name, message, params, family="vera")

    for key, tensor in ((b_key, lambda_b), (d_key, lambda_d)):
        if tensor.ndim != 1:
            return invalid(f"{key}: expected a vector, found shape {list(tensor.shape)}")
        problem = nonfinite_problem(tensor, key)
        if problem:
            return invalid(problem)
    proj_a, proj_b = projections
    out, r = lambda_b.shape[0], lambda_d.shape[0]
    if r != proj_a.shape[0]:
        return invalid(f"{d_key}: has {r} entries but the shared vera_A has r={proj_a.shape[0]} rows")
    if out > proj_b.shape[0]:
        return invalid(f"{b_key}: the layer has {out} outputs but the shared vera_B has only {proj_b.shape[0]} rows")
    try:
        orientation = _orientation(options, name, out, proj_a.shape[1], fan_in_fan_out)
    except CheckpointError as exc:
        return invalid(f"{b_key}: {exc}")
    if orientation.width > proj_a.shape[1]:
        return invalid(
            f"{b_key}: the layer has {orientation.width} inputs but the shared vera_A has only "
            f"{proj_a.shape[1]} columns"
        )
    # one view of A's first columns per width (the factor cache and the spectrum then take its R once); λ_b·B is
    # formed in float64 as it is read (a float32 product would round each entry, ~6e-8 relative)
    right = columns.setdefault(orientation.width, proj_a[:, : orientation.width].mT)
    update = FormedUpdate(RowScaled(proj_b[:out], lambda_b), right, core=torch.diag(lambda_d))
    kind = "conv1d_gpt2" if orientation.transposed else "linear"
    return Layer(name, update, orientation.shape, params, kind=kind, family="vera")


def _skip_reason(key: str, config: dict) -> str:
    if _PER_LAYER_COPY.search(key):
        return "a per-layer copy of the shared projection (the shared one is used)"
    return skip_reason(key, config, "VeRA")


def read(source: AdapterSource, options: ReadOptions) -> Checkpoint:
    config = dict(source.config or {})
    modules, unused = reader.group_keys(source.tensors.keys(), _LAMBDA, lambda match: match["which"])
    if not modules:
        raise CheckpointError("no vera_lambda_b/vera_lambda_d tensors found", path=source.weights_path)
    proj_a, proj_b, warnings = _projections(source, options, modules)
    shared_keys = {key for keys in _SHARED.values() for key in keys}
    unused = [key for key in unused if key not in shared_keys]
    fan_in_fan_out = bool(config.get("fan_in_fan_out"))
    columns: dict[int, torch.Tensor] = {}
    layers = [_layer(source, module, (proj_a, proj_b), options, fan_in_fan_out, columns) for module in modules.values()]
    warnings.append(
        f"the shared random projections vera_A {list(proj_a.shape)} and vera_B {list(proj_b.shape)} "
        f"({proj_a.numel() + proj_b.numel()} values) are frozen, not trained: params count only λ_b and λ_d"
    )
    if options.base is None:
        warnings.append(
            f"VeRA files do not store a layer's input width: without --base every layer is taken to use all "
            f"{proj_a.shape[1]} columns of vera_A, which is right only where all adapted layers have the same "
            "fan-in; pass the base model (--base) to slice vera_A exactly"
        )
    return reader.build_checkpoint(
        source,
        family="vera",
        adapter_type="VERA",
        layers=layers,
        skipped=reader.skipped_keys(
            trained_bias_changes(layers, unused, source.tensors, options.base, config),
            lambda key: _skip_reason(key, config),
        ),
        warnings=warnings,
        shared_params=0,
    )


register_format(
    Format(
        "vera",
        "PEFT VeRA (shared random projections, Linear and Conv1D)",
        detect,
        read,
        priority=20,
        needs="nothing (--base for save_projection: false)",
        spectrum="factored",
    )
)
