"""PEFT LN tuning (``LN_TUNING``): a trained full copy of each targeted module, ``<module>.ln_tuning_layers.weight``
(and ``.bias``); PEFT's merge swaps the copy in, so ΔW = W_saved − W₀ and the base is needed (``--base``).

- a norm (LayerNorm, RMSNorm: a 1-D weight γ) is a **vector** update, the diagonal scaling it changes:
  ΔW = diag(Δγ), n×n, whose singular values are |Δγ| sorted (no SVD); a Gemma-style RMSNorm that scales by
  (1 + γ) changes by the same Δγ;
- any other module copied this way (LN tuning may target a Linear or a conv) is a dense full-rank update
  W_saved − W₀ on its (out, in·∏k) matrix;
- the bias copy gives Δβ = β_saved − β₀, reported as the layer's bias update (applied as it is, unscaled).
"""

from __future__ import annotations

import re

import torch

from ..core.base import BaseWeights, as_matrix
from ..core.checkpoint import Checkpoint, Layer
from ..core.update import DenseUpdate, DiagonalUpdate, upcast
from . import Format, ReadOptions, register_format
from .common.peft import skip_reason
from .common.reader import (
    Module,
    build_checkpoint,
    detect_by,
    group_keys,
    invalid_layer,
    nonfinite_among,
    require_base,
    skipped_keys,
)
from .common.source import AdapterSource

FAMILY = "ln-tuning"
# saved files strip the adapter name (``norm.ln_tuning_layers.weight``); a whole model's state dict keeps it
_KEY = re.compile(r"^(?P<module>.+)\.ln_tuning_layers(?:\.(?!weight$|bias$)[^.]+)?\.(?P<role>weight|bias)$")
detect = detect_by("LN_TUNING", _KEY.match)


def _base_tensor(base: BaseWeights, name: str, suffix: str, key: str, saved: torch.Tensor) -> torch.Tensor | str:
    """The base model's tensor of the copied module, or why it cannot be compared with the saved copy."""
    if base.key_for(name, suffix) is None:
        return f"{key}: the base model has no {name}.{suffix} to compare the saved copy with"
    stored = base.get(name, suffix)
    if tuple(stored.shape) != tuple(saved.shape):
        return f"{key}: the saved copy has shape {list(saved.shape)} but the base stores {list(stored.shape)}"
    return stored


def _layer(source: AdapterSource, module: Module, base: BaseWeights) -> Layer:
    name = module.name
    if "weight" not in module.keys:
        return invalid_layer(name, f"{module.keys['bias']}: a bias copy without its module's weight")
    keys = {role: module.keys[role] for role in ("weight", "bias") if role in module.keys}
    saved = {role: source.tensors.get(key) for role, key in keys.items()}
    params = sum(tensor.numel() for tensor in saved.values())
    problem = nonfinite_among((keys[role], saved[role]) for role in keys)
    if problem:
        return invalid_layer(name, problem, params)
    originals = {role: _base_tensor(base, name, role, keys[role], saved[role]) for role in keys}
    problem = next((found for found in originals.values() if isinstance(found, str)), None)
    if problem:
        return invalid_layer(name, problem, params)
    weight, weight0 = saved["weight"], originals["weight"]
    bias = upcast(saved["bias"]) - upcast(originals["bias"]) if "bias" in keys else None
    if weight.ndim == 1:
        delta = upcast(weight) - upcast(weight0)
        update, shape, kind = DiagonalUpdate(delta), (weight.numel(),), "vector"
        return Layer(name, update, shape, params, kind, FAMILY, bias_update=bias, bias_scaled=False)
    kind = "linear" if weight.ndim == 2 else f"conv{weight.ndim - 2}d"

    def build(dtype: torch.dtype, device) -> torch.Tensor:
        return as_matrix(upcast(weight, dtype, device) - upcast(weight0, dtype, device), kind)

    matrix = (weight.shape[0], weight[0].numel())
    update = DenseUpdate(shape=matrix, build=build)
    return Layer(name, update, tuple(weight.shape), params, kind, FAMILY, bias_update=bias, bias_scaled=False)


def read(source: AdapterSource, options: ReadOptions) -> Checkpoint:
    base = require_base(
        source, options.base, "LN tuning saves full copies of the modules it trains (ΔW = W_saved − W0)"
    )
    modules, unused = group_keys(source.tensors.keys(), _KEY)
    layers = [_layer(source, module, base) for module in modules.values()]
    return build_checkpoint(
        source,
        family=FAMILY,
        adapter_type="LN_TUNING",
        layers=layers,
        skipped=skipped_keys(unused, lambda key: skip_reason(key, source.config, "LN tuning")),
        notes=[
            "LN tuning: a norm's update is the diagonal scaling it changes, ΔW = diag(Δγ) (kind vector: σ = |Δγ| "
            "sorted); its Δβ is the bias update"
        ]
        if any(layer.kind == "vector" for layer in layers)
        else [],
    )


register_format(
    Format(
        "ln-tuning",
        "PEFT LN tuning (full copies of norms, or of any module; needs --base)",
        detect,
        read,
        priority=50,
        needs="--base",
        spectrum="vector (norms), dense (other modules)",
    )
)
