"""PEFT LoKr (``peft_type`` "LOKR"): ``<module>.lokr_w1`` or ``lokr_w1_a``/``lokr_w1_b``, and ``lokr_w2``,
``lokr_w2_a``/``lokr_w2_b`` or, for convs under ``use_effective_conv2d``, ``lokr_t2``/``lokr_w2_a``/``lokr_w2_b``
— stored without ``.weight``.

ΔW = s·(W1 ⊗ W2) reshaped to W0 with W1 (a, c), W2 (b, d[, *k]), out = a·b, in = c·d. s = α/r with r and α
per layer from ``r``/``rank_pattern`` and ``alpha``/``alpha_pattern`` — applied even when both factors are
stored in full (unlike LyCORIS), so r comes from the config, never from the shapes. The analysed matrix is
W1 ⊗ W2.reshape(b, d·∏k): a KroneckerUpdate of the two factors (each factored as w_a·w_b, or the Tucker form
w2_aᵀ·(t2 ×₂ w2_b), or dense when stored in full), whose singular values are the products σ_i(W1)·σ_j(W2),
exactly; rank ≤ rank(W1)·rank(W2).

One exception: for a Conv1d whose W2 is stored in full, (b, d, k), PEFT 0.21 pairs the indices differently
(``torch.kron`` of a 2-D and a 3-D tensor); that layer is a dense recipe of PEFT's own layout, same spectrum.
"""

from __future__ import annotations

import re

from ..core.checkpoint import Checkpoint
from . import Format, ReadOptions, register_format
from .common.lycoris_math import LOKR_ROLES, FactorError, LokrFactors, Stored, lokr_factors, lokr_update
from .common.lycoris_peft import PeftScaling, read_peft_lycoris
from .common.reader import Module, detect_by
from .common.source import AdapterSource

FAMILY = "lokr"
_KEY = re.compile(rf"^(?P<module>.+)\.(?P<role>{'|'.join(LOKR_ROLES)})(?:\.weight)?$")
detect = detect_by("LOKR", _KEY.match)


def _scale(scaling: PeftScaling, name: str, rank: int | None, rank_key: str | None) -> tuple[float, bool]:
    """(s = α/r, whether r was unknown and scale 1 assumed)."""
    config_r = scaling.rank(name)
    if config_r is not None and rank is not None and config_r != rank:
        raise FactorError(f"{rank_key}: the config gives r={config_r} for this layer but the factors have r={rank}")
    alpha = scaling.alpha(name)
    if alpha is None:
        return 1.0, False
    r = config_r if config_r is not None else rank
    if r is None:
        return 1.0, True
    return alpha / r, False


def _build(stored: Stored, module: Module, scaling: PeftScaling) -> tuple[object, LokrFactors, bool]:
    """s·(W1 ⊗ W2) in PEFT's layout, with s = α/r (r from the config where the factors do not show it)."""
    factors = lokr_factors(stored, module.stored)
    rank_key = module.keys.get("lokr_w1_b", module.keys.get("lokr_w2_b"))  # where the stored r shows, if anywhere
    scale, assumed = _scale(scaling, module.name, factors.rank, rank_key)
    return lokr_update(factors, scale, peft_conv1d_layout=True), factors, assumed


def read(source: AdapterSource, options: ReadOptions) -> Checkpoint:
    checkpoint, assumed = read_peft_lycoris(
        source, options, family=FAMILY, adapter_type="LOKR", what="LoKr", pattern=_KEY, build=_build
    )
    if assumed:
        checkpoint.warnings.append(
            f"no adapter_config.json: r is not stored for LoKr layers with both factors in full, scale 1 is assumed "
            f"for {len(assumed)} layer(s) ({assumed[0]} …)"
        )
    return checkpoint


register_format(
    Format(
        FAMILY,
        "PEFT LoKr (Linear, Conv1d/2d, decompose_both, use_effective_conv2d)",
        detect,
        read,
        priority=50,
        needs="nothing",
        spectrum="Kronecker",
    )
)
