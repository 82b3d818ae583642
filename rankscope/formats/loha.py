"""PEFT LoHa (``peft_type`` "LOHA"): ``<module>.hada_w{1,2}_{a,b}`` and, for convs under
``use_effective_conv2d``, ``<module>.hada_t{1,2}`` — stored without ``.weight``.

ΔW = s·((w1a·w1b) ⊙ (w2a·w2b)) reshaped to W0, s = α/r with r and α per layer through ``rank_pattern`` and
``alpha_pattern`` (config fields ``r`` and ``alpha``). The analysed (out, in·∏k) matrix is factored exactly
(rank ≤ r²) through the face-splitting identity, see :mod:`.lycoris_math`:

- Linear, and convs in PEFT's flattened form (``w1a`` (out, r), ``w1b`` (r, in·∏k); PEFT always uses it for
  1×1 kernels): P_i = w_ia, Q_i = w_ib;
- convs under ``use_effective_conv2d`` (``t1`` (r, r, *k), ``w1a`` (r, out), ``w1b`` (r, in)): W_i is PEFT's
  einsum "ijkl,jr,ip->prkl", i.e. P_i = w_iaᵀ and Q_i[a, (c, κ)] = Σ_b t_i[a, b, κ]·w_ib[b, c] — the small
  r × in·∏k right factor is materialised, ΔW never is;

then FactoredUpdate(P1 ⊙ᵣ P2, Q1 ⊙꜀ Q2, scale s) with an r²×r² core, or a float64 dense recipe where
r² ≥ min(out, in·∏k). PEFT's Conv1d under ``use_effective_conv2d`` stores ``t`` as (r, r, k, 1): without
``--base`` such a layer reads as shape (out, in, k, 1).
"""

from __future__ import annotations

import re

from ..core.checkpoint import Checkpoint, Layer, Skipped
from ..core.naming import layer_name
from . import Format, ReadOptions, register_format
from .lycoris_math import (
    LOHA_ROLES,
    FactorError,
    PeftScaling,
    group_modules,
    layer_shape,
    loha_factors,
    loha_update,
    peft_scaling,
    peft_skip_reason,
)
from .source import AdapterSource

FAMILY = "loha"
_KEY = re.compile(rf"^(?P<module>.+)\.(?P<role>{'|'.join(LOHA_ROLES)})(?:\.weight)?$")


def detect(source: AdapterSource) -> bool:
    if source.peft_type is not None:
        return source.peft_type == "LOHA"
    return any(_KEY.match(key) for key in source.tensors)


def _layer(source: AdapterSource, module: str, roles: dict[str, str], scaling: PeftScaling, options: ReadOptions):
    name = layer_name(module)
    stored = {role: (key, source.tensors.get(key)) for role, key in roles.items()}
    params = sum(tensor.numel() for _, tensor in stored.values())
    try:
        factors = loha_factors(stored, module)
        config_r = scaling.rank(name)
        if config_r is not None and config_r != factors.rank:
            raise FactorError(
                f"{stored['hada_w1_b'][0]}: the config gives r={config_r} for this layer but the factors have "
                f"r={factors.rank}"
            )
        alpha = scaling.alpha(name)
        update = loha_update(factors, 1.0 if alpha is None else alpha / factors.rank)
        shape, kind = layer_shape(
            options.base, name, factors.out_features, factors.in_features, factors.kernel, update.shape[1]
        )
    except FactorError as exc:
        return Layer(name, None, (), params, family=FAMILY, error=str(exc))
    return Layer(name, update, shape, params, kind=kind, family=FAMILY)


def read(source: AdapterSource, options: ReadOptions) -> Checkpoint:
    scaling, warnings = peft_scaling(source.config, options.alpha, source.config_path or source.weights_path)
    modules, unused = group_modules(source.tensors.keys(), _KEY)
    layers = [_layer(source, module, roles, scaling, options) for module, roles in modules.items()]
    return Checkpoint(
        path=source.path,
        family=FAMILY,
        adapter_type="LOHA",
        config=dict(source.config or {}),
        layers=layers,
        skipped=[Skipped(key, peft_skip_reason(key, source.config, "LoHa")) for key in unused],
        warnings=warnings,
        weights_file=source.weights_path,
    )


register_format(Format(FAMILY, "PEFT LoHa (Linear, Conv1d/2d, use_effective_conv2d)", detect, read, priority=50))
