"""PEFT (IA)³: ``<module>.ia3_l``, a learned vector l that rescales the base weight, so ΔW needs the base.

W' = W0 ⊙ l, hence ΔW = W0 ⊙ (l − 1), written on the analysed (out, in·k…) matrix:

- an output layer (the default): l is (out, 1), or (1, out, 1, …) for a conv: ΔW = diag(l − 1)·W0;
- a layer in ``feedforward_modules``: l is (1, in), or (1, in, 1, …): ΔW = W0·diag(l − 1) — each input
  channel's column block (its kernel taps) scaled alike; in a grouped conv, output channel o of group g
  sees input channels g·in_g … (g+1)·in_g − 1 of l.

PEFT's rule for ``feedforward_modules``: a string is ``re.fullmatch``-ed against the layer name, a list
matches where the name ends with one of its entries (plain ``str.endswith``). GPT-2's Conv1D (the config's
``fan_in_fan_out``) stores W0 as (in, out) and is transposed first. ΔW is generally full rank: a dense update
with no scale. An output layer's base bias is rescaled too: its change b ⊙ (l − 1) is reported as the layer's
bias update.
"""

from __future__ import annotations

import math
import re

import torch

from ..core.base import BaseWeights, as_matrix
from ..core.checkpoint import Checkpoint, Layer
from ..core.errors import CheckpointError
from ..core.update import DenseUpdate, upcast
from . import Format, ReadOptions, register_format
from .common.peft import nonfinite_problem, skip_reason
from .common.reader import Module, build_checkpoint, detect_by, group_keys, invalid_layer, skipped_keys
from .common.source import AdapterSource

_KEY = re.compile(r"^(?P<module>.+)\.(?P<role>ia3_l)$")
detect = detect_by("IA3", _KEY.match)


def is_feedforward(rule: object, name: str) -> bool:
    """PEFT's ``_check_target_module_feedforward``: fullmatch for a string, ``endswith`` for a list."""
    if rule is None:
        return False
    if isinstance(rule, str):
        return re.fullmatch(rule, name) is not None
    return any(name.endswith(str(entry)) for entry in rule)


def _kind(vector: torch.Tensor, fan_in_fan_out: bool) -> str | None:
    if vector.ndim == 2:
        return "conv1d_gpt2" if fan_in_fan_out else "linear"
    return f"conv{vector.ndim - 2}d" if vector.ndim in (3, 4, 5) else None


def _layout_problem(vector: torch.Tensor, key: str, feedforward: bool) -> str | None:
    """An (IA)³ vector is (out, 1) or (1, in) for a matrix, (1, C, 1, …) for a conv."""
    shape = tuple(vector.shape)
    if vector.ndim == 2:
        ok = shape[0] == 1 if feedforward else shape[1] == 1
        want = "(1, in) for a feedforward layer" if feedforward else "(out, 1)"
    else:
        ok = shape[0] == 1 and all(d == 1 for d in shape[2:])
        want = "(1, channels, 1, …)"
    return None if ok else f"{key}: expected an (IA)³ vector of shape {want}, found {list(shape)}"


def column_scale(factor: torch.Tensor, out_channels: int, in_per_group: int, taps: int) -> torch.Tensor:
    """The (out, in_g·taps) multiplier of a feedforward conv: output channel o of group g = o // out_g takes
    ``factor[g·in_g + c]`` on its input channel c, repeated over that channel's ``taps`` kernel positions."""
    groups = factor.numel() // in_per_group
    group_of = torch.arange(out_channels, device=factor.device) // (out_channels // groups)
    index = group_of[:, None] * in_per_group + torch.arange(in_per_group, device=factor.device)[None, :]
    return factor[index].repeat_interleave(taps, dim=1)


def ia3_delta(vector: torch.Tensor, weight: torch.Tensor, kind: str, feedforward: bool, dtype, device) -> torch.Tensor:
    """ΔW = W0 ⊙ (l − 1) as the analysed matrix (see the module docstring)."""
    factor = upcast(vector.reshape(-1), dtype, device) - 1
    w0 = as_matrix(upcast(weight, dtype, device), kind)
    if not feedforward:
        return factor[:, None] * w0
    if kind in ("linear", "conv1d_gpt2"):
        return w0 * factor[None, :]
    taps = math.prod(weight.shape[2:])
    return w0 * column_scale(factor, weight.shape[0], weight.shape[1], taps)


def _check_base(base: BaseWeights, name: str, key: str, vector: torch.Tensor, kind: str, feedforward: bool) -> None:
    """The base weight must have the layout the vector scales; a mismatch is an error naming both shapes."""
    base_key = base.key_for(name)
    shape = tuple(base.shape(name))
    ndim = 2 if kind in ("linear", "conv1d_gpt2") else vector.ndim
    ok = len(shape) == ndim
    if ok:
        out, inner = (shape[1], shape[0]) if kind == "conv1d_gpt2" else (shape[0], shape[1])
        size = vector.numel()
        if not feedforward:
            ok = size == out
        elif kind.startswith("conv") and kind != "conv1d_gpt2":
            groups = size // inner if inner else 0
            ok = size % inner == 0 and groups > 0 and out % groups == 0  # in = groups·in_per_group
        else:
            ok = size == inner
    if not ok:
        role = "input channels" if feedforward else "output channels"
        raise CheckpointError(
            f"the weight's shape {list(shape)} does not fit the (IA)³ vector {key!r} of shape "
            f"{list(vector.shape)} ({role} of a {kind} layer; is base the model this adapter was trained on?)",
            path=base.path,
            key=base_key,
            argument="base",
        )


def _bias_change(base: BaseWeights, name: str, vector: torch.Tensor, feedforward: bool) -> torch.Tensor | None:
    """An output layer scales its base bias too: b ⊙ (l − 1); an input (feedforward) scaling leaves it."""
    key = base.key_for(name, "bias")
    if feedforward or key is None:
        return None
    if tuple(base.shape(name, "bias")) != (vector.numel(),):
        raise CheckpointError(
            f"base bias shape {list(base.shape(name, 'bias'))} does not fit the (IA)³ vector of {vector.numel()} "
            f"values of layer {name!r}",
            path=base.path,
            key=key,
        )
    return base.get(name, "bias").double() * (vector.reshape(-1).double() - 1)


def _layer(source: AdapterSource, module: Module, base: BaseWeights, config: dict) -> Layer:
    name, key = module.name, module.keys["ia3_l"]
    vector = source.tensors.get(key)
    params = vector.numel()
    kind = _kind(vector, bool(config.get("fan_in_fan_out")))
    if source.config is not None:
        feedforward = is_feedforward(config.get("feedforward_modules"), name)
    else:  # no config: a matrix layer's vector says it by its layout; a conv's cannot
        feedforward = vector.ndim == 2 and vector.shape[0] == 1 and vector.shape[1] != 1
    problem = nonfinite_problem(vector, key)
    if kind is None:
        problem = f"{key}: expected a 2-D (linear) or 3-5-D (conv) (IA)³ vector, found shape {list(vector.shape)}"
    elif source.config is None and vector.ndim > 2:
        problem = (
            f"{key}: a conv's (IA)³ vector does not say whether it scales inputs or outputs; needs adapter_config.json"
        )
    problem = problem or _layout_problem(vector, key, feedforward)
    if problem is None and base.key_for(name) is None:
        problem = f"{key}: the base model has no weight for layer {name!r} (looked for '{name}.weight' in {base.path})"
    if problem:
        return invalid_layer(name, problem, params, kind=kind or "linear", family="ia3")
    _check_base(base, name, key, vector, kind, feedforward)
    shape = tuple(base.shape(name))
    m, n = (shape[1], shape[0]) if kind == "conv1d_gpt2" else (shape[0], math.prod(shape[1:]))

    def build(dtype, device) -> torch.Tensor:
        return ia3_delta(vector, base.get(name), kind, feedforward, dtype, device)

    return Layer(
        name,
        DenseUpdate((m, n), build),
        shape,
        params,
        kind=kind,
        family="ia3",
        bias_update=_bias_change(base, name, vector, feedforward),
    )


def read(source: AdapterSource, options: ReadOptions) -> Checkpoint:
    if options.base is None:
        raise CheckpointError(
            "(IA)³ rescales the base weights (ΔW = W0 ⊙ (l − 1)), so its ΔW needs the base model's weights: pass "
            "base=PATH (the base model directory or safetensors file)",
            path=source.where,
            argument="base",
        )
    config = source.config or {}
    modules, unused = group_keys(source.tensors, _KEY)
    layers = [_layer(source, module, options.base, config) for module in modules.values()]
    skipped = skipped_keys(unused, lambda key: skip_reason(key, config, "(IA)³"))  # a modules_to_save head, …
    warnings = []
    if source.config is None:
        warnings.append(
            "no adapter_config.json: feedforward layers are told by their vector's layout ((1, in) against "
            "(out, 1)); a conv layer's cannot, and those layers are reported invalid"
        )
    return build_checkpoint(source, family="ia3", adapter_type="IA3", layers=layers, skipped=skipped, warnings=warnings)


register_format(
    Format(
        "ia3",
        "PEFT (IA)³ (Linear, Conv1D, Conv; needs --base)",
        detect,
        read,
        priority=50,
        needs="--base",
        spectrum="dense",
    )
)
