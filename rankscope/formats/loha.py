"""PEFT LoHa (``peft_type`` "LOHA"): ``<module>.hada_w{1,2}_{a,b}`` and, for convs under
``use_effective_conv2d``, ``<module>.hada_t{1,2}`` — stored without ``.weight``.

ΔW = s·((w1a·w1b) ⊙ (w2a·w2b)) reshaped to W0, s = α/r with r and α per layer through ``rank_pattern`` and
``alpha_pattern`` (config fields ``r`` and ``alpha``). The analysed (out, in·∏k) matrix is factored exactly
(rank ≤ r²) through the face-splitting identity, see :mod:`.common.lycoris_math`:

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

from ..core.checkpoint import Checkpoint
from . import Format, ReadOptions, register_format
from .common.lycoris_math import LOHA_ROLES, FactorError, LohaFactors, Stored, loha_factors, loha_update
from .common.lycoris_peft import PeftScaling, read_peft_lycoris
from .common.reader import Module, detect_by
from .common.source import AdapterSource

FAMILY = "loha"
_KEY = re.compile(rf"^(?P<module>.+)\.(?P<role>{'|'.join(LOHA_ROLES)})(?:\.weight)?$")
detect = detect_by("LOHA", _KEY.match)


def _build(stored: Stored, module: Module, scaling: PeftScaling) -> tuple[object, LohaFactors, bool]:
    """s·((w1a·w1b) ⊙ (w2a·w2b)) with s = α/r, r checked against the config's."""
    factors = loha_factors(stored, module.stored)
    config_r = scaling.rank(module.name)
    if config_r is not None and config_r != factors.rank:
        raise FactorError(
            f"{stored['hada_w1_b'][0]}: the config gives r={config_r} for this layer but the factors have "
            f"r={factors.rank}"
        )
    alpha = scaling.alpha(module.name)
    return loha_update(factors, 1.0 if alpha is None else alpha / factors.rank), factors, False


def read(source: AdapterSource, options: ReadOptions) -> Checkpoint:
    checkpoint, _ = read_peft_lycoris(
        source, options, family=FAMILY, adapter_type="LOHA", what="LoHa", pattern=_KEY, build=_build
    )
    return checkpoint


register_format(
    Format(
        FAMILY,
        "PEFT LoHa (Linear, Conv1d/2d, use_effective_conv2d)",
        detect,
        read,
        priority=50,
        needs="nothing",
        spectrum="factored",
    )
)
