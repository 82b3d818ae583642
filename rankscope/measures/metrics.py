"""Effective-rank metrics: pure functions of a singular-value vector (docs/metrics.md).

Every function takes σ (any order, any float dtype; computed in float64) and returns a Python number.
A zero spectrum (an untrained LoRA has B = 0) gives 0 for every metric, never NaN.

Each metric is implemented once, on a batch of spectra of one length (:class:`Spectra`: the rows of a B × k
tensor): an adapter has hundreds of layers, and the analysis takes the metrics of all its spectra of one length
in one pass of tensor ops (:func:`spectrum_metrics_batch`). The per-spectrum functions are that implementation
on a batch of one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from functools import cached_property

import torch

FLOAT32_EPS = float(torch.finfo(torch.float32).eps)
DEFAULT_THRESHOLDS = (0.005,)
DEFAULT_ENERGIES = (0.9, 0.95, 0.99)
DEFAULT_REL_THRESHOLDS = (0.001,)


Sigma = torch.Tensor | Sequence[float]
_SLACK = 1 - 4 * torch.finfo(torch.float64).eps  # energy_rank: p = 1 must not miss the last term through rounding


class Spectra:
    """Spectra of one length k ≥ 0 as the rows of a B × k float64 tensor of |σ| sorted descending, with the
    quantities several metrics share. Ratios to σ₁ (``normalized``) are scale-free and keep σ⁴ away from
    under/overflow; a zero row stays zero."""

    def __init__(self, sigmas: Sequence[Sigma]) -> None:
        rows = [torch.as_tensor(s, dtype=torch.float64).reshape(-1) for s in sigmas]
        stacked = torch.stack(rows) if rows else torch.zeros(0, 0, dtype=torch.float64)
        self.values = torch.sort(stacked.abs(), dim=1, descending=True).values
        self.top = self.values[:, 0] if self.values.shape[1] else self.values.new_zeros(len(rows))
        self.nonzero = self.top > 0

    @cached_property
    def normalized(self) -> torch.Tensor:
        """σ/σ₁ per row."""
        return self.values / torch.where(self.nonzero, self.top, 1.0)[:, None]

    @cached_property
    def squares(self) -> torch.Tensor:
        """(σ/σ₁)² per row."""
        return self.normalized**2

    @cached_property
    def square_sums(self) -> torch.Tensor:
        """Σ(σ/σ₁)² per row: the stable rank."""
        return self.squares.sum(dim=1)

    @cached_property
    def cumulative(self) -> torch.Tensor:
        """Σ_{j≤i}(σ_j/σ₁)² per row (k ≥ 1)."""
        return torch.cumsum(self.squares, dim=1)

    def masked(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` where the spectrum is nonzero, else 0 (a zero spectrum has every metric 0)."""
        return torch.where(self.nonzero, values, 0.0)


def _entropy_exp(shares: torch.Tensor) -> torch.Tensor:
    """exp(−Σ p ln p) per row (0·ln 0 = 0)."""
    return torch.exp(-torch.xlogy(shares, shares).sum(dim=1))


def _row_shares(values: torch.Tensor, spectra: Spectra) -> torch.Tensor:
    """Each row divided by its sum (a zero row stays zero)."""
    return values / torch.where(spectra.nonzero, values.sum(dim=1), 1.0)[:, None]


def _check_fraction(fraction: float) -> None:
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"energy fraction must be in (0, 1], got {fraction}")


# -- the metrics, each over the rows of a Spectra ----------------------------------------------------------------
def batch_count_above(spectra: Spectra, threshold: float) -> torch.Tensor:
    """#{σ_i > τ}, τ absolute (the BoRA/HiRA convention, τ = 0.005)."""
    return (spectra.values > threshold).sum(dim=1)


def batch_count_above_rel(spectra: Spectra, ratio: float) -> torch.Tensor:
    """#{σ_i > ρ·σ₁}."""
    return ((spectra.normalized > ratio) & spectra.nonzero[:, None]).sum(dim=1)


def batch_energy_rank(spectra: Spectra, fraction: float) -> torch.Tensor:
    """Smallest k with Σ_{i≤k} σ_i² ≥ p·Σσ²."""
    _check_fraction(fraction)
    if spectra.values.shape[1] == 0:
        return spectra.values.new_zeros(len(spectra.values), dtype=torch.int64)
    cumulative = spectra.cumulative
    below = (cumulative < (fraction * cumulative[:, -1] * _SLACK)[:, None]).sum(dim=1)
    positive = (spectra.squares > 0).sum(dim=1)
    return torch.where(spectra.nonzero, torch.minimum(below + 1, positive), 0)


def batch_erank(spectra: Spectra) -> torch.Tensor:
    """Roy & Vetterli (2007): exp(−Σ p_i ln p_i) with p_i = σ_i/Σσ."""
    return spectra.masked(_entropy_exp(_row_shares(spectra.normalized, spectra)))


def batch_erank_energy(spectra: Spectra) -> torch.Tensor:
    """exp(−Σ e_i ln e_i) with energy shares e_i = σ_i²/Σσ²."""
    return spectra.masked(_entropy_exp(_row_shares(spectra.squares, spectra)))


def batch_stable_rank(spectra: Spectra) -> torch.Tensor:
    """Σσ²/σ₁²."""
    return spectra.square_sums


def batch_participation_ratio(spectra: Spectra) -> torch.Tensor:
    """(Σσ²)²/Σσ⁴."""
    fourth = torch.where(spectra.nonzero, (spectra.squares**2).sum(dim=1), 1.0)
    return spectra.masked(spectra.square_sums**2 / fourth)


def batch_numerical_rank(spectra: Spectra, max_dims: torch.Tensor) -> torch.Tensor:
    """#{σ_i > σ₁·max(m, n)·eps(float32)}: numpy's ``matrix_rank`` rule for float32 matrices of max(m, n) per row."""
    return (spectra.normalized > (max_dims * FLOAT32_EPS)[:, None]).sum(dim=1)  # a zero row stays 0


def batch_energy(spectra: Spectra) -> torch.Tensor:
    """Σσ² = ‖ΔW‖_F²."""
    return (spectra.values**2).sum(dim=1)


def batch_sigma_max(spectra: Spectra) -> torch.Tensor:
    """σ₁ (0 for an empty spectrum)."""
    return spectra.top


# -- one spectrum: the same implementation on a batch of one -----------------------------------------------------
def _one(metric: Callable[..., torch.Tensor], sigma: Sigma, *args) -> float:
    return metric(Spectra([sigma]), *args)[0].item()


def count_above(sigma: Sigma, threshold: float = 0.005) -> int:
    """#{σ_i > τ}, τ absolute (the BoRA/HiRA convention, τ = 0.005)."""
    return int(_one(batch_count_above, sigma, threshold))


def count_above_rel(sigma: Sigma, ratio: float = 0.001) -> int:
    """#{σ_i > ρ·σ₁}."""
    return int(_one(batch_count_above_rel, sigma, ratio))


def energy_rank(sigma: Sigma, fraction: float = 0.9) -> int:
    """Smallest k with Σ_{i≤k} σ_i² ≥ p·Σσ²."""
    return int(_one(batch_energy_rank, sigma, fraction))


def erank(sigma: Sigma) -> float:
    """Roy & Vetterli (2007): exp(−Σ p_i ln p_i) with p_i = σ_i/Σσ."""
    return _one(batch_erank, sigma)


def erank_energy(sigma: Sigma) -> float:
    """exp(−Σ e_i ln e_i) with energy shares e_i = σ_i²/Σσ²."""
    return _one(batch_erank_energy, sigma)


def stable_rank(sigma: Sigma) -> float:
    """Σσ²/σ₁²."""
    return _one(batch_stable_rank, sigma)


def participation_ratio(sigma: Sigma) -> float:
    """(Σσ²)²/Σσ⁴."""
    return _one(batch_participation_ratio, sigma)


def rank_threshold(sigma_max: float, shape: Sequence[int]) -> float:
    """σ₁·max(m, n)·eps(float32): the value a σ must exceed to count in :func:`numerical_rank`."""
    return sigma_max * max(shape) * FLOAT32_EPS


def numerical_rank(sigma: Sigma, shape: Sequence[int]) -> int:
    """#{σ_i > σ₁·max(m, n)·eps(float32)}: numpy's ``matrix_rank`` rule for a float32 matrix of ``shape``."""
    return int(_one(batch_numerical_rank, sigma, torch.tensor([float(max(shape))], dtype=torch.float64)))


def energy(sigma: Sigma) -> float:
    """Σσ² = ‖ΔW‖_F²."""
    return _one(batch_energy, sigma)


def frobenius(sigma: Sigma) -> float:
    """‖ΔW‖_F = √(Σσ²)."""
    return math.sqrt(energy(sigma))


def sigma_max(sigma: Sigma) -> float:
    """σ₁ (0 for an empty spectrum)."""
    return _one(batch_sigma_max, sigma)


def utilization(effective_rank: float, rank_bound: int) -> float:
    """An effective rank as a fraction of the rank the update could reach (0 when the bound is 0)."""
    return effective_rank / rank_bound if rank_bound > 0 else 0.0


def parameter_key(value: float) -> str:
    """How a metric parameter is written in outputs: Python's ``str(float)`` (``0.005`` → ``"0.005"``)."""
    return str(float(value))


# -- every metric of many spectra ----------------------------------------------------------------------------------
def spectrum_metrics(
    sigma: Sigma,
    shape: Sequence[int],
    rank_bound: int,
    *,
    thresholds: Iterable[float] = DEFAULT_THRESHOLDS,
    energies: Iterable[float] = DEFAULT_ENERGIES,
    rel_thresholds: Iterable[float] = DEFAULT_REL_THRESHOLDS,
) -> dict:
    """Every metric of docs/metrics.md's table under its key; parametrised ones keyed by ``str(float)``."""
    options = {"thresholds": thresholds, "energies": energies, "rel_thresholds": rel_thresholds}
    return spectrum_metrics_batch([sigma], [shape], [rank_bound], **options)[0]


def spectrum_metrics_batch(
    sigmas: Sequence[Sigma],
    shapes: Sequence[Sequence[int]],
    rank_bounds: Sequence[int],
    *,
    thresholds: Iterable[float] = DEFAULT_THRESHOLDS,
    energies: Iterable[float] = DEFAULT_ENERGIES,
    rel_thresholds: Iterable[float] = DEFAULT_REL_THRESHOLDS,
) -> list[dict]:
    """``[spectrum_metrics(σ, shape, bound, …) for each]``, one pass of tensor ops per length of spectrum.

    Same keys in the same order (the JSON contract's); counts and ranks as ints, the rest as floats.
    """
    thresholds, energies, rel_thresholds = tuple(thresholds), tuple(energies), tuple(rel_thresholds)
    for p in energies:
        _check_fraction(p)
    flat = [torch.as_tensor(s, dtype=torch.float64).reshape(-1) for s in sigmas]
    by_length: dict[int, list[int]] = {}
    for i, values in enumerate(flat):
        by_length.setdefault(values.numel(), []).append(i)
    results: list[dict | None] = [None] * len(flat)
    for indices in by_length.values():
        spectra = Spectra([flat[i] for i in indices])
        max_dims = torch.tensor([float(max(shapes[i])) for i in indices], dtype=torch.float64)
        counts = {parameter_key(t): batch_count_above(spectra, t).tolist() for t in thresholds}
        relative = {parameter_key(r): batch_count_above_rel(spectra, r).tolist() for r in rel_thresholds}
        ranks = {parameter_key(p): batch_energy_rank(spectra, p).tolist() for p in energies}
        columns = {
            "erank": batch_erank(spectra).tolist(),
            "erank_energy": batch_erank_energy(spectra).tolist(),
            "stable_rank": batch_stable_rank(spectra).tolist(),
            "participation_ratio": batch_participation_ratio(spectra).tolist(),
            "numerical_rank": batch_numerical_rank(spectra, max_dims).tolist(),
            "energy": batch_energy(spectra).tolist(),
            "sigma_max": batch_sigma_max(spectra).tolist(),
        }
        for row, i in enumerate(indices):
            value = {key: column[row] for key, column in columns.items()}
            results[i] = {
                "count_above": {key: column[row] for key, column in counts.items()},
                "count_above_rel": {key: column[row] for key, column in relative.items()},
                "energy_rank": {key: column[row] for key, column in ranks.items()},
                "erank": value["erank"],
                "erank_energy": value["erank_energy"],
                "stable_rank": value["stable_rank"],
                "participation_ratio": value["participation_ratio"],
                "numerical_rank": value["numerical_rank"],
                "utilization": utilization(value["erank"], rank_bounds[i]),
                "frobenius": math.sqrt(value["energy"]),
                "sigma_max": value["sigma_max"],
                "energy": value["energy"],
            }
    return results  # type: ignore[return-value]


def truncated_metrics(
    energy_value: float,
    fourth_moment: float,
    top: float,
    *,
    thresholds: Iterable[float] = DEFAULT_THRESHOLDS,
    energies: Iterable[float] = DEFAULT_ENERGIES,
    rel_thresholds: Iterable[float] = DEFAULT_REL_THRESHOLDS,
) -> dict:
    """The metrics of a truncated spectrum (``--top-k``), same keys as :func:`spectrum_metrics`: those that norms
    give exactly — energy Σσ² = ‖ΔW‖_F², frobenius, sigma_max σ₁, stable_rank Σσ²/σ₁², participation_ratio
    (Σσ²)²/Σσ⁴ with Σσ⁴ = ‖ΔWᵀΔW‖_F² — and None for those that need every σ."""
    nonzero = top > 0 and energy_value > 0
    return {
        "count_above": dict.fromkeys(map(parameter_key, thresholds)),
        "count_above_rel": dict.fromkeys(map(parameter_key, rel_thresholds)),
        "energy_rank": dict.fromkeys(map(parameter_key, energies)),
        "erank": None,
        "erank_energy": None,
        "stable_rank": energy_value / top**2 if nonzero else 0.0,
        "participation_ratio": energy_value**2 / fourth_moment if nonzero and fourth_moment > 0 else 0.0,
        "numerical_rank": None,
        "utilization": None,
        "frobenius": math.sqrt(max(energy_value, 0.0)),
        "sigma_max": top,
        "energy": energy_value,
    }


__all__ = [
    "Spectra",
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
    "truncated_metrics",
    "utilization",
]
