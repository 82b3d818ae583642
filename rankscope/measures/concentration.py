"""How concentrated a vector of weights is: pure functions of a weight (or share) vector.

With p_i = |w_i| / Σ|w| over k entries: normalised entropy H/ln k, effective number 1/Σp², Gini, max share, and
KL from uniform (ln k − H). Degenerate cases are defined: a single weight has normalised entropy 0, effective
number 1, Gini 0, max share 1; an all-zero vector has no distribution and gives None for each.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def shares(weights: torch.Tensor | Sequence[float]) -> torch.Tensor | None:
    """p_i = |w_i| / Σ_j |w_j| (None when every weight is 0)."""
    values = torch.as_tensor(weights, dtype=torch.float64).reshape(-1).abs()
    total = float(values.sum())
    return values / total if total > 0 else None


def _entropy(p: torch.Tensor) -> float:
    positive = p[p > 0]
    return float(-(positive * positive.log()).sum())


def normalized_entropy(weights: torch.Tensor | Sequence[float]) -> float | None:
    """H(p) / ln k ∈ [0, 1]: 1 for uniform weights, 0 when one carries everything (and for k = 1)."""
    p = shares(weights)
    if p is None:
        return None
    return _entropy(p) / math.log(p.numel()) if p.numel() > 1 else 0.0


def effective_number(weights: torch.Tensor | Sequence[float]) -> float | None:
    """1 / Σ p_i² ∈ [1, k] (the inverse Simpson index): how many components carry the weight."""
    p = shares(weights)
    return None if p is None else float(1.0 / (p**2).sum())


def gini(weights: torch.Tensor | Sequence[float]) -> float | None:
    """Σ_i (2i − k − 1)·p_(i) / k with p sorted ascending (Σp = 1): 0 for uniform, (k−1)/k for one-hot."""
    p = shares(weights)
    if p is None:
        return None
    k = p.numel()
    ranks = torch.arange(1, k + 1, dtype=torch.float64)
    return float(((2 * ranks - k - 1) * torch.sort(p).values).sum() / k)


def max_share(weights: torch.Tensor | Sequence[float]) -> float | None:
    """max_i p_i."""
    p = shares(weights)
    return None if p is None else float(p.max())


def kl_from_uniform(weights: torch.Tensor | Sequence[float]) -> float | None:
    """KL(p ‖ uniform) = ln k − H(p), in nats."""
    p = shares(weights)
    return None if p is None else math.log(p.numel()) - _entropy(p)


def concentration(weights: torch.Tensor | Sequence[float]) -> dict[str, float | None]:
    """Every measure above under its name."""
    return {
        "normalized_entropy": normalized_entropy(weights),
        "effective_number": effective_number(weights),
        "gini": gini(weights),
        "max_share": max_share(weights),
        "kl_from_uniform": kl_from_uniform(weights),
    }
