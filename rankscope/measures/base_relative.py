"""Measures of an update against the weight it changes (``--base``): relative size, amplification, intruders.

For a layer with base weight W₀ (m×n, the analysed out×in matrix) and update ΔW:

- ``relative_update`` ‖ΔW‖_F / ‖W₀‖_F and ``relative_sigma_max`` σ₁(ΔW) / σ₁(W₀);
- ``amplification`` ‖ΔW‖_F / ‖U_kᵀ W₀ V_k‖_F with U_k, V_k the top-k singular vectors of ΔW: how much ΔW
  amplifies directions W₀ barely uses (Hu et al. 2021, LoRA, §7);
- ``intruders``: the left singular vectors u_i of W₀ + ΔW among the top k whose largest |cosine| with every left
  singular vector of W₀ is below ε (Shuttleworth et al. 2024, arXiv 2410.21228; PEFT's
  ``reduce_intruder_dimension`` uses the same test).

Pure functions of tensors; the caller reads W₀ and decomposes (``analysis.against_base``).
"""

from __future__ import annotations

import math

import torch

DEFAULT_INTRUDER_K = 10
DEFAULT_INTRUDER_EPSILON = 0.5
DEFAULT_AMPLIFICATION_K = 16


def ratio(numerator: float, denominator: float) -> float | None:
    """numerator / denominator; None where the denominator is 0 or either is not finite (JSON holds no Inf)."""
    if denominator == 0 or not (math.isfinite(numerator) and math.isfinite(denominator)):
        return None
    return numerator / denominator


def amplification_rank(numerical_rank: int, rank_bound: int, shape: tuple[int, int], full_rank_k: int) -> int:
    """k for the amplification factor: ΔW's numerical rank, capped at its rank bound, and at ``full_rank_k``
    where the bound is no bound (a full fine-tune, DoRA: rank_bound = min(m, n))."""
    k = min(numerical_rank, rank_bound)
    if rank_bound >= min(shape):
        k = min(k, full_rank_k)
    return max(k, 0)


def amplification(
    weight: torch.Tensor, left: torch.Tensor, right: torch.Tensor, delta_frobenius: float
) -> float | None:
    """‖ΔW‖_F / ‖U_kᵀ W₀ V_k‖_F, with ``left`` = U_k (m×k) and ``right`` = V_k (n×k); None where k = 0 or the
    projection vanishes."""
    if left.shape[-1] == 0:
        return None
    projected = left.mT @ (weight @ right)
    return ratio(delta_frobenius, float(torch.linalg.matrix_norm(projected)))


def intruder_dimensions(base_left: torch.Tensor, merged_left: torch.Tensor, top_k: int, epsilon: float) -> list[int]:
    """Indices i < top_k of the left singular vectors of W₀ + ΔW (columns of ``merged_left``, by descending σ)
    with max_j |⟨u_i, u⁰_j⟩| < ε over the left singular vectors u⁰_j of W₀ (columns of ``base_left``)."""
    top = merged_left[:, :top_k]
    cosine = (top.mT @ base_left).abs().amax(dim=1)
    return torch.nonzero(cosine < epsilon).flatten().tolist()


def base_fields(
    *,
    weight_frobenius: float,
    weight_sigma_max: float,
    delta_frobenius: float,
    delta_sigma_max: float,
    amplification_value: float | None,
    amplification_k: int,
    intruders: dict | None,
) -> dict:
    """A layer record's ``base`` object (docs/metrics.md)."""
    return {
        "weight_frobenius": weight_frobenius,
        "weight_sigma_max": weight_sigma_max,
        "relative_update": ratio(delta_frobenius, weight_frobenius),
        "relative_sigma_max": ratio(delta_sigma_max, weight_sigma_max),
        "amplification": amplification_value,
        "amplification_k": amplification_k,
        "intruders": intruders,
    }


__all__ = [
    "DEFAULT_AMPLIFICATION_K",
    "DEFAULT_INTRUDER_EPSILON",
    "DEFAULT_INTRUDER_K",
    "amplification",
    "amplification_rank",
    "base_fields",
    "intruder_dimensions",
    "ratio",
]
