"""Truncated spectra of large dense updates (``--top-k K``): the top K singular values by a seeded randomised range
finder with power iterations (Halko, Martinsson & Tropp 2011, Algorithm 4.4), and what stays exact without the rest
of the spectrum.

For an m×n matrix A, Q (m×q, q = K + oversampling) is an orthonormal basis of (AAᵀ)^p·A·Ω with Ω a seeded Gaussian
n×q sketch, re-orthonormalised after every product; σ̃ are the singular values of QᵀA. Because QᵀA is a projection
of A, σ̃_i ≤ σ_i for every i, and with the exact energy ‖A‖_F² = Σσ² the residual r = ‖A‖_F² − Σ_{i≤K} σ̃_i² bounds
what was missed:

- Σ_{i>K} σ_i² ≤ r, so σ_{K+1} ≤ √r: where r < σ̃_K², no singular value above σ̃_K was missed (the certificate);
- 0 ≤ σ_i² − σ̃_i² ≤ r for each i ≤ K, i.e. σ̃_i ≤ σ_i ≤ √(σ̃_i² + r).

Exact from norms, whatever K: the energy ‖A‖_F², Σσ⁴ = ‖AᵀA‖_F² (the smaller Gram matrix), and σ₁ by power
iteration on that Gram matrix started from the sketch's top right singular vector.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .update import Update

OVERSAMPLING = 10
POWER_ITERATIONS = 4
SEED = 0
_POWER_STEPS = 200  # σ₁'s power iteration on the Gram matrix, started from the sketch's top vector


@dataclass(frozen=True)
class TruncatedSpectrum:
    """The top ``k`` singular values of one update and the exact quantities beside them (module docstring)."""

    values: torch.Tensor  # σ̃_1 ≥ … ≥ σ̃_k, float64 on the CPU; σ̃_i ≤ σ_i
    energy: float  # ‖ΔW‖_F² = Σσ²
    fourth_moment: float  # ‖ΔWᵀΔW‖_F² = Σσ⁴
    sigma_max: float  # σ₁, power iteration on the Gram matrix
    residual: float  # ‖ΔW‖_F² − Σσ̃_i² ≥ Σ_{i>k} σ_i²
    certified: bool  # residual < σ̃_k² (or at rounding level): no σ above σ̃_k was missed
    k: int
    oversampling: int = OVERSAMPLING
    power_iterations: int = POWER_ITERATIONS
    seed: int = SEED

    def to_dict(self) -> dict:
        """The JSON ``truncated`` object of a layer record."""
        return {
            "k": self.k,
            "method": "randomized range finder with power iterations (Halko et al. 2011, Alg. 4.4)",
            "oversampling": self.oversampling,
            "power_iterations": self.power_iterations,
            "seed": self.seed,
            "residual_energy": self.residual,
            "certified": self.certified,
        }


def _sketch(shape: tuple[int, ...], q: int, seed: int, like: torch.Tensor) -> torch.Tensor:
    """A seeded Gaussian sketch, drawn on the CPU (the same numbers on every device) and moved once."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape[:-2], shape[-1], q, generator=generator, dtype=torch.float64).to(like.device, like.dtype)


def randomized_top_k(
    batch: torch.Tensor,
    k: int,
    *,
    oversampling: int = OVERSAMPLING,
    power_iterations: int = POWER_ITERATIONS,
    seed: int = SEED,
) -> list[TruncatedSpectrum]:
    """The truncated spectrum of each matrix of a B×m×n ``batch`` (module docstring for the bounds)."""
    a = batch if batch.shape[-2] >= batch.shape[-1] else batch.mT  # tall: the Gram matrix is the smaller one
    small = a.shape[-1]
    q = min(k + oversampling, small)
    basis = torch.linalg.qr(a @ _sketch(tuple(a.shape), q, seed, a)).Q
    for _ in range(power_iterations):
        basis = torch.linalg.qr(a.mT @ basis).Q
        basis = torch.linalg.qr(a @ basis).Q
    _, values, vh = torch.linalg.svd(basis.mT @ a, full_matrices=False)
    values = values[..., :k]
    energy = (a * a).sum(dim=(-2, -1))
    gram = a.mT @ a
    fourth = (gram * gram).sum(dim=(-2, -1))
    top = _power_iteration(gram, vh[..., 0, :])
    eps = torch.finfo(a.dtype).eps
    results = []
    for i in range(a.shape[0]):
        found = values[i].to("cpu", torch.float64)
        total = float(energy[i])
        residual = max(total - float((found**2).sum()), 0.0)
        floor = 1e3 * eps * total  # the rounding of the two sums: a residual below it is no evidence of a miss
        last = float(found[-1]) ** 2 if found.numel() else 0.0
        results.append(
            TruncatedSpectrum(
                values=found,
                energy=total,
                fourth_moment=float(fourth[i]),
                sigma_max=max(float(top[i]), float(found[0]) if found.numel() else 0.0),
                residual=residual,
                certified=residual < last or residual <= floor,
                k=k,
                oversampling=oversampling,
                power_iterations=power_iterations,
                seed=seed,
            )
        )
    return results


def _power_iteration(gram: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """√λ_max of each symmetric positive semi-definite Gram matrix, by power iteration until the Rayleigh quotient
    stops moving (relative change below a few ulps)."""
    vector = start / start.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(start.dtype).tiny)
    previous = torch.zeros(gram.shape[0], dtype=gram.dtype, device=gram.device)
    tolerance = 4 * torch.finfo(gram.dtype).eps
    quotient = previous
    for _ in range(_POWER_STEPS):
        product = (gram @ vector.unsqueeze(-1)).squeeze(-1)
        quotient = (vector * product).sum(dim=-1)
        norms = product.norm(dim=-1, keepdim=True)
        if bool((norms == 0).all()):
            break
        vector = product / norms.clamp_min(torch.finfo(gram.dtype).tiny)
        if bool(((quotient - previous).abs() <= tolerance * quotient.abs()).all()):
            break
        previous = quotient
    return quotient.clamp_min(0).sqrt()


def _not_finite(k: int) -> TruncatedSpectrum:
    nan = float("nan")
    return TruncatedSpectrum(torch.full((k,), nan, dtype=torch.float64), nan, nan, nan, nan, False, k)


def truncated_singular_values(
    updates: Sequence[Update],
    k: int,
    *,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
    memory_budget: int,
    progress: Callable[[int], None] | None = None,
    seed: int = SEED,
) -> list[TruncatedSpectrum]:
    """:func:`randomized_top_k` of each update, materialised on ``device`` and batched by shape within
    ``memory_budget`` bytes (the matrix, its Gram matrix and the sketches: about (m·n + min(m, n)² + 3·max(m, n)·q)
    items each)."""
    results: list[TruncatedSpectrum | None] = [None] * len(updates)
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for index, update in enumerate(updates):
        groups[update.shape].append(index)
    itemsize = torch.finfo(dtype).bits // 8
    for (m, n), indices in groups.items():
        q = k + OVERSAMPLING
        per_item = itemsize * (m * n + min(m, n) ** 2 + 3 * max(m, n) * q)
        size = max(1, memory_budget // per_item)
        for start in range(0, len(indices), size):
            chunk = indices[start : start + size]
            batch = torch.stack([updates[i].materialize(dtype, device) for i in chunk])
            finite = torch.isfinite(batch).flatten(1).all(1).tolist()
            kept = [i for i, ok in zip(chunk, finite, strict=True) if ok]
            if kept:
                spectra = randomized_top_k(batch[torch.tensor(finite, device=batch.device)], k, seed=seed)
                for i, spectrum in zip(kept, spectra, strict=True):
                    results[i] = spectrum
            for i in set(chunk) - set(kept):  # NaN/Inf entries: NaN values, which the analysis reports invalid
                results[i] = _not_finite(k)
            del batch
            if progress:
                progress(len(chunk))
    return results  # type: ignore[return-value]


__all__ = ["OVERSAMPLING", "POWER_ITERATIONS", "TruncatedSpectrum", "randomized_top_k", "truncated_singular_values"]
