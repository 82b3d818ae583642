"""PEFT AdaLoRA (``peft_type`` "ADALORA"): an SVD-shaped LoRA whose ranks are pruned during training.

Per adapted module the file holds ``<module>.lora_A`` (k, in), ``<module>.lora_E`` (k, 1) and
``<module>.lora_B`` (out, k) — ParameterDicts, so no ``.weight`` suffix — where k is the number of ranks kept:
PEFT cuts the saved tensors down to the rows/columns that ``rank_pattern`` (``{"<module>.lora_E": [bool] *
init_r}``, True = kept) keeps. The update PEFT merges is

    ΔW = B · diag(E) · A · s,    s = α / (ranknum + 1e-5),

with α = ``lora_alpha`` (PEFT uses the layer's r instead where ``lora_alpha ≤ 0``) and ``ranknum`` = ``init_r``:
``ranknum`` is not saved and PEFT keeps it at ``init_r`` after pruning, so pruning does not rescale what is kept.
Transposed for GPT-2 Conv1D (``fan_in_fan_out``); SVDConv2d stores A flattened to (k, in·kh·kw) and its ΔW is
B·diag(E)·A reshaped to the kernel. The analysed matrix is always (out, in·kh·kw), as a
``FactoredUpdate(left=B, core=diag(E), right=A, scale=s)``: exact, rank ≤ min(k, out, in).

Linear, Conv1D and Conv2d layers look alike in the file (A is 2-D for all of them): the reported base-weight
``shape`` is (out, in) — (in, out) under ``fan_in_fan_out`` — unless the base model is given (``--base``), whose
stored shape is then reported and checked against the factors.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from ..core.checkpoint import Checkpoint, Layer
from ..core.errors import CheckpointError
from ..core.update import FactoredUpdate
from . import Format, ReadOptions, register_format
from .common import reader
from .common.peft import positive_integer, skip_reason, trained_bias_changes
from .common.source import AdapterSource

_KEY = re.compile(r"^(?P<module>.+)\.(?P<attr>lora_A|lora_E|lora_B)$")
_ROLES = {"lora_A": "A", "lora_E": "E", "lora_B": "B"}
_RANKNUM_EPS = 1e-5  # PEFT divides by ranknum + 1e-5

# config fields that would make these factors mean something else
_REFUSED_FLAGS = {
    "use_dora": "AdaLoRA with use_dora is not a PEFT configuration this reader knows",
    "target_parameters": "AdaLoRA on parameters (target_parameters) stacks expert factors in one tensor",
    "layer_replication": "layer_replication renumbers layers away from the base model's",
}


detect = reader.detect_by("ADALORA", lambda key: key.endswith(".lora_E") and _KEY.match(key))


def adalora_scale(alpha: float, init_r: int, rank: int) -> float:
    """PEFT's AdaLoRA factor s = a / (init_r + 1e-5), a = α if α > 0 else ``rank``.

    ``rank`` is the r the layer was built with: PEFT rebuilds a reloaded layer with its kept rank, so a
    non-positive α scales by the kept rank there (``ranknum`` stays ``init_r``).

    >>> round(adalora_scale(8, 6, 3), 6)
    1.333331
    >>> round(adalora_scale(0, 6, 3), 6)
    0.499999
    """
    numerator = alpha if alpha > 0 else float(rank)
    return numerator / (init_r + _RANKNUM_EPS)


@dataclass(frozen=True)
class _Settings:
    """What the config says about every layer: α, init_r, the kept-rank masks and the Conv1D flag."""

    alpha: float | None
    init_r: int | None
    rank_pattern: dict
    fan_in_fan_out: bool


def _alpha(config: dict, where) -> float:
    """``lora_alpha``: any finite number (PEFT falls back to r where it is ≤ 0)."""
    raw = config.get("lora_alpha")
    if isinstance(raw, bool) or not isinstance(raw, (int, float)) or not math.isfinite(raw):
        raise CheckpointError(f"AdaLoRA config needs lora_alpha as a number, found {raw!r}", path=where)
    return float(raw)


def _settings(source: AdapterSource, options: ReadOptions) -> tuple[_Settings, list[str]]:
    """α, init_r and rank_pattern from the config (``--alpha`` overrides α), with warnings."""
    where = source.where
    config = source.config
    if config is None:
        alpha = options.alpha
        warning = (
            "no adapter_config.json: init_r is unknown, so each layer's kept rank k stands in for it "
            f"(s = {alpha:g}/(k + 1e-5)); PEFT divides by init_r"
            if alpha is not None
            else "no adapter_config.json: lora_alpha and init_r are unknown, scale 1 is assumed "
            "(ΔW = B·diag(E)·A; pass --alpha to set α)"
        )
        return _Settings(alpha, None, {}, False), [warning]
    reader.refuse_flags(config, _REFUSED_FLAGS, where)
    init_r = positive_integer(config.get("init_r"), "AdaLoRA's init_r", config_path=where)
    warnings = []
    if options.alpha is not None:
        alpha = float(options.alpha)
        warnings.append(f"--alpha {alpha:g} overrides lora_alpha of the config")
    else:
        alpha = _alpha(config, where)
    pattern = config.get("rank_pattern") or {}
    if not isinstance(pattern, dict):
        raise CheckpointError(f"rank_pattern must be an object, found {type(pattern).__name__}", path=where)
    settings = _Settings(alpha, init_r, pattern, bool(config.get("fan_in_fan_out")))
    if alpha <= 0:
        warnings.append(
            f"lora_alpha={alpha:g} ≤ 0: PEFT then scales by the layer's r, which is init_r={init_r} while training "
            "but the kept rank once the adapter is reloaded; rankscope follows the reloaded model"
        )
    return settings, warnings


def _kept_mask(settings: _Settings, name: str, where) -> list[bool] | None:
    """The layer's ``rank_pattern`` entry (PEFT keys it by module path + ``.lora_E``), checked."""
    mask = settings.rank_pattern.get(f"{name}.lora_E")
    if mask is None:
        return None
    if not isinstance(mask, list) or not all(isinstance(v, bool) for v in mask):
        raise CheckpointError(f"rank_pattern[{name + '.lora_E'!r}] must be a list of booleans", path=where)
    return mask


def _base_shape(
    options: ReadOptions, name: str, out: int, width: int, fan_in_fan_out: bool
) -> tuple[tuple[int, ...], str]:
    """The stored base-weight shape and the layer kind: from the base model where given, else from the config."""
    if options.base is None:
        return ((width, out), "conv1d_gpt2") if fan_in_fan_out else ((out, width), "linear")
    shape = tuple(options.base.shape(name))
    if len(shape) == 4 and shape[0] == out and math.prod(shape[1:]) == width:
        return shape, "conv2d"
    if shape == (out, width):
        return shape, "linear"
    if shape == (width, out):
        return shape, "conv1d_gpt2"
    raise CheckpointError(f"the base weight has shape {list(shape)}, which does not fit ΔW of shape [{out}, {width}]")


def _layer(source: AdapterSource, module: reader.Module, settings: _Settings, options: ReadOptions) -> Layer:
    tensors = source.tensors
    name = module.name
    missing = reader.missing_parts(module, ("A", "E", "B"), lambda role: f"lora_{role}", ", ")
    if missing:
        return reader.invalid_layer(name, missing, family="adalora")
    keys = module.keys
    a, e, b = (tensors.get(keys[role]) for role in ("A", "E", "B"))
    params = a.numel() + e.numel() + b.numel()

    def invalid(message: str) -> Layer:
        return reader.invalid_layer(name, message, params, family="adalora")

    problem = reader.nonfinite_among((keys[role], tensor) for role, tensor in (("A", a), ("E", e), ("B", b)))
    if problem:
        return invalid(problem)
    if a.ndim != 2 or b.ndim != 2:
        role, bad = ("A", a) if a.ndim != 2 else ("B", b)
        return invalid(f"{keys[role]}: expected a matrix, found shape {list(bad.shape)}")
    k = a.shape[0]
    if e.shape not in ((k, 1), (k,)):
        return invalid(
            f"{keys['E']}: expected shape [{k}, 1] to match the {k} rows of {keys['A']}, found {list(e.shape)}"
        )
    if b.shape[1] != k:
        return invalid(f"{keys['B']}: rank mismatch: {keys['A']} has {k} rows but {keys['B']} has {b.shape[1]} columns")

    where = source.where
    mask = _kept_mask(settings, name, where)
    init_r = settings.init_r
    if init_r is not None and mask is not None and len(mask) != init_r:
        return invalid(f"{keys['E']}: rank_pattern has {len(mask)} entries for this layer but init_r is {init_r}")
    expected = sum(mask) if mask is not None else init_r
    if expected is not None and k != expected:
        origin = f"rank_pattern keeps {expected} of its {init_r} ranks" if mask is not None else f"init_r is {expected}"
        return invalid(f"{keys['A']}: {origin} but the stored factors have k={k}")
    # without a config α and init_r are unknown: scale 1 (or --alpha over k, as the warning says)
    scale = 1.0 if settings.alpha is None else adalora_scale(settings.alpha, init_r or k, k)

    try:
        shape, kind = _base_shape(options, name, b.shape[0], a.shape[1], settings.fan_in_fan_out)
    except CheckpointError as exc:
        return invalid(f"{keys['A']}: {exc}")
    update = FactoredUpdate(b, a, core=torch.diag(e.reshape(-1)), scale=scale)
    return Layer(name, update, shape, params, kind=kind, family="adalora")


def read(source: AdapterSource, options: ReadOptions) -> Checkpoint:
    settings, warnings = _settings(source, options)
    modules, unused = reader.group_keys(source.tensors.keys(), _KEY, lambda match: _ROLES[match["attr"]])
    layers = [_layer(source, module, settings, options) for module in modules.values()]
    return reader.build_checkpoint(
        source,
        family="adalora",
        adapter_type="ADALORA",
        layers=layers,
        skipped=reader.skipped_keys(
            trained_bias_changes(layers, unused, source.tensors, options.base, source.config or {}),
            lambda key: skip_reason(key, source.config, "AdaLoRA"),
        ),
        warnings=warnings,
    )


register_format(
    Format(
        "adalora",
        "PEFT AdaLoRA (SVDLinear, Conv1D, SVDConv2d; pruned ranks)",
        detect,
        read,
        priority=20,
        needs="nothing",
        spectrum="factored",
    )
)
