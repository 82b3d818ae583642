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
    p = _shares(weights)
    return None if p is None else torch.tensor(p, dtype=torch.float64)


# k is the number of components (a handful): plain float64 arithmetic, not torch ops, whose dispatch cost ~10 µs
# each and made these five measures ≈ 0.4 ms per layer (0.1 s for a composed 8B model's 224 layers)
def _shares(weights: torch.Tensor | Sequence[float]) -> list[float] | None:
    flat = weights.reshape(-1).tolist() if isinstance(weights, torch.Tensor) else weights
    values = [abs(float(w)) for w in flat]
    total = sum(values)
    return [v / total for v in values] if total > 0 else None


def _entropy(p: list[float]) -> float:
    return -sum(x * math.log(x) for x in p if x > 0)


def _normalized_entropy(p: list[float]) -> float:
    return _entropy(p) / math.log(len(p)) if len(p) > 1 else 0.0


def _effective_number(p: list[float]) -> float:
    return 1.0 / sum(x * x for x in p)


def _gini(p: list[float]) -> float:
    k = len(p)
    return sum((2 * i - k - 1) * x for i, x in enumerate(sorted(p), start=1)) / k


def _kl_from_uniform(p: list[float]) -> float:
    return math.log(len(p)) - _entropy(p)


def normalized_entropy(weights: torch.Tensor | Sequence[float]) -> float | None:
    """H(p) / ln k ∈ [0, 1]: 1 for uniform weights, 0 when one carries everything (and for k = 1)."""
    p = _shares(weights)
    return None if p is None else _normalized_entropy(p)


def effective_number(weights: torch.Tensor | Sequence[float]) -> float | None:
    """1 / Σ p_i² ∈ [1, k] (the inverse Simpson index): how many components carry the weight."""
    p = _shares(weights)
    return None if p is None else _effective_number(p)


def gini(weights: torch.Tensor | Sequence[float]) -> float | None:
    """Σ_i (2i − k − 1)·p_(i) / k with p sorted ascending (Σp = 1): 0 for uniform, (k−1)/k for one-hot."""
    p = _shares(weights)
    return None if p is None else _gini(p)


def max_share(weights: torch.Tensor | Sequence[float]) -> float | None:
    """max_i p_i."""
    p = _shares(weights)
    return None if p is None else max(p)


def kl_from_uniform(weights: torch.Tensor | Sequence[float]) -> float | None:
    """KL(p ‖ uniform) = ln k − H(p), in nats."""
    p = _shares(weights)
    return None if p is None else _kl_from_uniform(p)


def concentration(weights: torch.Tensor | Sequence[float]) -> dict[str, float | None]:
    """Every measure above under its name (the shares computed once)."""
    p = _shares(weights)
    if p is None:
        return dict.fromkeys(("normalized_entropy", "effective_number", "gini", "max_share", "kl_from_uniform"))
    return {
        "normalized_entropy": _normalized_entropy(p),
        "effective_number": _effective_number(p),
        "gini": _gini(p),
        "max_share": max(p),
        "kl_from_uniform": _kl_from_uniform(p),
    }
