"""Effective-rank metrics: pure functions of a singular-value vector (DESIGN.md, "Metrics").

Every function takes σ (any order, any float dtype; computed in float64) and returns a Python number.
A zero spectrum (an untrained LoRA has B = 0) gives 0 for every metric, never NaN.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch

FLOAT32_EPS = float(torch.finfo(torch.float32).eps)
DEFAULT_THRESHOLDS = (0.005,)
DEFAULT_ENERGIES = (0.9, 0.95, 0.99)
DEFAULT_REL_THRESHOLDS = (0.001,)


def _sorted(sigma: torch.Tensor | Sequence[float]) -> torch.Tensor:
    values = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1)
    return torch.sort(values.abs(), descending=True).values


def _normalized(sigma: torch.Tensor | Sequence[float]) -> torch.Tensor:
    """σ/σ₁ (empty for a zero spectrum): ratios are scale-free and keep σ⁴ away from under/overflow."""
    values = _sorted(sigma)
    if values.numel() == 0 or values[0] == 0:
        return values[:0]
    return values / values[0]


def _entropy_exp(shares: torch.Tensor) -> float:
    """exp(−Σ p ln p) over the positive shares."""
    positive = shares[shares > 0]
    if positive.numel() == 0:
        return 0.0
    return math.exp(float(-(positive * positive.log()).sum()))


def count_above(sigma: torch.Tensor | Sequence[float], threshold: float = 0.005) -> int:
    """#{σ_i > τ}, τ absolute (the BoRA/HiRA convention, τ = 0.005)."""
    return int((_sorted(sigma) > threshold).sum())


def count_above_rel(sigma: torch.Tensor | Sequence[float], ratio: float = 0.001) -> int:
    """#{σ_i > ρ·σ₁}."""
    return int((_normalized(sigma) > ratio).sum())


def energy_rank(sigma: torch.Tensor | Sequence[float], fraction: float = 0.9) -> int:
    """Smallest k with Σ_{i≤k} σ_i² ≥ p·Σσ²."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"energy fraction must be in (0, 1], got {fraction}")
    energies = _normalized(sigma) ** 2
    if energies.numel() == 0:
        return 0
    cumulative = torch.cumsum(energies, 0)
    total = float(cumulative[-1])
    # a relative slack of a few ulps, so p = 1 does not miss the last term through rounding
    below = int((cumulative < fraction * total * (1 - 4 * torch.finfo(torch.float64).eps)).sum())
    return min(below + 1, int((energies > 0).sum()))


def erank(sigma: torch.Tensor | Sequence[float]) -> float:
    """Roy & Vetterli (2007): exp(−Σ p_i ln p_i) with p_i = σ_i/Σσ."""
    values = _normalized(sigma)
    return 0.0 if values.numel() == 0 else _entropy_exp(values / values.sum())


def erank_energy(sigma: torch.Tensor | Sequence[float]) -> float:
    """exp(−Σ e_i ln e_i) with energy shares e_i = σ_i²/Σσ²."""
    squares = _normalized(sigma) ** 2
    return 0.0 if squares.numel() == 0 else _entropy_exp(squares / squares.sum())


def stable_rank(sigma: torch.Tensor | Sequence[float]) -> float:
    """Σσ²/σ₁²."""
    return float((_normalized(sigma) ** 2).sum())


def participation_ratio(sigma: torch.Tensor | Sequence[float]) -> float:
    """(Σσ²)²/Σσ⁴."""
    squares = _normalized(sigma) ** 2
    if squares.numel() == 0:
        return 0.0
    return float(squares.sum() ** 2 / (squares**2).sum())


def numerical_rank(sigma: torch.Tensor | Sequence[float], shape: Sequence[int]) -> int:
    """#{σ_i > σ₁·max(m, n)·eps(float32)}: numpy's ``matrix_rank`` rule for a float32 matrix of ``shape``."""
    return int((_normalized(sigma) > max(shape) * FLOAT32_EPS).sum())


def energy(sigma: torch.Tensor | Sequence[float]) -> float:
    """Σσ² = ‖ΔW‖_F²."""
    return float((_sorted(sigma) ** 2).sum())


def frobenius(sigma: torch.Tensor | Sequence[float]) -> float:
    """‖ΔW‖_F = √(Σσ²)."""
    return math.sqrt(energy(sigma))


def sigma_max(sigma: torch.Tensor | Sequence[float]) -> float:
    """σ₁ (0 for an empty spectrum)."""
    values = _sorted(sigma)
    return float(values[0]) if values.numel() else 0.0


def utilization(effective_rank: float, rank_bound: int) -> float:
    """An effective rank as a fraction of the rank the update could reach (0 when the bound is 0)."""
    return effective_rank / rank_bound if rank_bound > 0 else 0.0


def parameter_key(value: float) -> str:
    """How a metric parameter is written in outputs: Python's ``str(float)`` (``0.005`` → ``"0.005"``)."""
    return str(float(value))


def spectrum_metrics(
    sigma: torch.Tensor | Sequence[float],
    shape: Sequence[int],
    rank_bound: int,
    *,
    thresholds: Iterable[float] = DEFAULT_THRESHOLDS,
    energies: Iterable[float] = DEFAULT_ENERGIES,
    rel_thresholds: Iterable[float] = DEFAULT_REL_THRESHOLDS,
) -> dict:
    """Every metric of DESIGN.md's table under its key; parametrised ones keyed by ``str(float)``."""
    effective = erank(sigma)
    return {
        "count_above": {parameter_key(t): count_above(sigma, t) for t in thresholds},
        "count_above_rel": {parameter_key(r): count_above_rel(sigma, r) for r in rel_thresholds},
        "energy_rank": {parameter_key(p): energy_rank(sigma, p) for p in energies},
        "erank": effective,
        "erank_energy": erank_energy(sigma),
        "stable_rank": stable_rank(sigma),
        "participation_ratio": participation_ratio(sigma),
        "numerical_rank": numerical_rank(sigma, shape),
        "utilization": utilization(effective, rank_bound),
        "frobenius": frobenius(sigma),
        "sigma_max": sigma_max(sigma),
        "energy": energy(sigma),
    }


# -- the same metrics for many spectra at once ---------------------------------------------------------------
# An adapter has hundreds of layers and each per-spectrum function costs a few tensor calls: the analysis takes
# the metrics of all its spectra of one length in one pass of tensor ops instead. The functions above stay the
# definition (and the public API); tests hold this batched form to them.
def _batch_entropy_exp(shares: torch.Tensor) -> torch.Tensor:
    """exp(−Σ p ln p) per row (0·ln 0 = 0)."""
    return torch.exp(-torch.xlogy(shares, shares).sum(dim=1))


def _batch_columns(
    values: torch.Tensor,
    max_dims: torch.Tensor,
    thresholds: Sequence[float],
    energies: Sequence[float],
    rel_thresholds: Sequence[float],
) -> dict[str, list]:
    """Each metric as a list over the rows of ``values`` (B × k, |σ| sorted descending, float64, k ≥ 1)."""
    top = values[:, 0]
    nonzero = top > 0
    normalized = values / torch.where(nonzero, top, 1.0)[:, None]  # a zero row stays 0
    squares = normalized**2
    square_sums = squares.sum(dim=1)
    safe = torch.where(nonzero, 1.0, 0.0)
    cumulative = torch.cumsum(squares, dim=1)
    total = cumulative[:, -1]
    positive = (squares > 0).sum(dim=1)
    slack = 1 - 4 * torch.finfo(torch.float64).eps
    columns: dict[str, list] = {}
    for t in thresholds:
        columns[f"count_above:{t}"] = (values > t).sum(dim=1).tolist()
    for r in rel_thresholds:
        columns[f"count_above_rel:{r}"] = ((normalized > r) & nonzero[:, None]).sum(dim=1).tolist()
    for p in energies:
        below = (cumulative < (p * total * slack)[:, None]).sum(dim=1)
        columns[f"energy_rank:{p}"] = torch.where(nonzero, torch.minimum(below + 1, positive), 0).tolist()
    ones = torch.where(nonzero, normalized.sum(dim=1), 1.0)[:, None]
    columns["erank"] = (_batch_entropy_exp(normalized / ones) * safe).tolist()
    columns["erank_energy"] = (
        _batch_entropy_exp(squares / torch.where(nonzero, square_sums, 1.0)[:, None]) * safe
    ).tolist()
    columns["stable_rank"] = square_sums.tolist()
    fourth = torch.where(nonzero, (squares**2).sum(dim=1), 1.0)
    columns["participation_ratio"] = (square_sums**2 / fourth * safe).tolist()
    columns["numerical_rank"] = (normalized > (max_dims * FLOAT32_EPS)[:, None]).sum(dim=1).tolist()
    columns["energy"] = (values**2).sum(dim=1).tolist()
    columns["sigma_max"] = top.tolist()
    return columns


def spectrum_metrics_batch(
    sigmas: Sequence[torch.Tensor | Sequence[float]],
    shapes: Sequence[Sequence[int]],
    rank_bounds: Sequence[int],
    *,
    thresholds: Iterable[float] = DEFAULT_THRESHOLDS,
    energies: Iterable[float] = DEFAULT_ENERGIES,
    rel_thresholds: Iterable[float] = DEFAULT_REL_THRESHOLDS,
) -> list[dict]:
    """``[spectrum_metrics(σ, shape, bound, …) for each]``, vectorised over the spectra of equal length.

    Same keys in the same order, integers equal, floats equal to rounding (the reductions may add in another order).
    """
    thresholds, energies, rel_thresholds = tuple(thresholds), tuple(energies), tuple(rel_thresholds)
    for p in energies:
        if not 0.0 < p <= 1.0:
            raise ValueError(f"energy fraction must be in (0, 1], got {p}")
    flat = [torch.as_tensor(s, dtype=torch.float64).reshape(-1) for s in sigmas]
    results: list[dict | None] = [None] * len(flat)
    by_length: dict[int, list[int]] = {}
    for i, values in enumerate(flat):
        by_length.setdefault(values.numel(), []).append(i)
    for length, indices in by_length.items():
        if length == 0:
            for i in indices:
                results[i] = spectrum_metrics(flat[i], shapes[i], rank_bounds[i], thresholds=thresholds,
                                              energies=energies, rel_thresholds=rel_thresholds)  # fmt: skip
            continue
        values = torch.sort(torch.stack([flat[i] for i in indices]).abs(), dim=1, descending=True).values
        max_dims = torch.tensor([float(max(shapes[i])) for i in indices], dtype=torch.float64)
        columns = _batch_columns(values, max_dims, thresholds, energies, rel_thresholds)
        for row, i in enumerate(indices):
            effective = columns["erank"][row]
            bound = rank_bounds[i]
            results[i] = {
                "count_above": {parameter_key(t): columns[f"count_above:{t}"][row] for t in thresholds},
                "count_above_rel": {parameter_key(r): columns[f"count_above_rel:{r}"][row] for r in rel_thresholds},
                "energy_rank": {parameter_key(p): columns[f"energy_rank:{p}"][row] for p in energies},
                "erank": effective,
                "erank_energy": columns["erank_energy"][row],
                "stable_rank": columns["stable_rank"][row],
                "participation_ratio": columns["participation_ratio"][row],
                "numerical_rank": columns["numerical_rank"][row],
                "utilization": effective / bound if bound > 0 else 0.0,
                "frobenius": math.sqrt(columns["energy"][row]),
                "sigma_max": columns["sigma_max"][row],
                "energy": columns["energy"][row],
            }
    return results  # type: ignore[return-value]


__all__ = [
    "count_above",
    "count_above_rel",
    "energy",
    "energy_rank",
    "erank",
    "erank_energy",
    "frobenius",
    "numerical_rank",
    "parameter_key",
    "participation_ratio",
    "sigma_max",
    "spectrum_metrics",
    "spectrum_metrics_batch",
    "stable_rank",
    "utilization",
]
