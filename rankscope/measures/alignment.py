"""Alignment between two updates: principal angles, projection overlap, φ grid, exact update cosine.

Pure functions of tensors (orthonormal bases, factors). docs/architecture.md: with k = min of the two ranks, principal
angles between the top-k singular subspaces (cos θ_i = σ_i(U1ᵀU2)); projection overlap ‖U1ᵀU2‖_F²/k against its
random baseline k/dim; the LoRA paper's φ(i, j); and ⟨ΔW1, ΔW2⟩_F/(‖ΔW1‖‖ΔW2‖) from factors.
"""

from __future__ import annotations

import math

import torch

from ..core.update import FactoredUpdate, KroneckerUpdate, Update, upcast


def principal_cosines(basis_a: torch.Tensor, basis_b: torch.Tensor) -> torch.Tensor:
    """cos θ_i = σ_i(AᵀB), descending (so θ ascending), for orthonormal columns A (d×k_a), B (d×k_b)."""
    return torch.linalg.svdvals(basis_a.mT.double() @ basis_b.double()).clamp(0.0, 1.0)


def principal_angles(basis_a: torch.Tensor, basis_b: torch.Tensor) -> torch.Tensor:
    """θ_i in radians, ascending: arccos of :func:`principal_cosines`."""
    return torch.arccos(principal_cosines(basis_a, basis_b))


def projection_overlap(basis_a: torch.Tensor, basis_b: torch.Tensor) -> float:
    """‖AᵀB‖_F² / min(k_a, k_b) = mean cos²θ_i ∈ [0, 1]: 1 for nested subspaces, 0 for orthogonal ones."""
    k = min(basis_a.shape[1], basis_b.shape[1])
    if k == 0:
        return 0.0
    return float((basis_a.mT.double() @ basis_b.double()).pow(2).sum()) / k


def overlap_baseline(k_a: int, k_b: int, dim: int) -> float:
    """Expected projection overlap of random subspaces of dimensions k_a, k_b in R^dim: max(k_a, k_b)/dim.

    E‖AᵀB‖_F² = k_a·k_b/dim, divided by min(k_a, k_b); k/dim when both are k-dimensional.
    """
    return max(k_a, k_b) / dim if dim and min(k_a, k_b) else 0.0


def subspace_similarity(basis_a: torch.Tensor, basis_b: torch.Tensor) -> torch.Tensor:
    """The LoRA paper's φ grid: φ(i, j) = ‖A_iᵀB_j‖_F² / min(i, j) over the top-i and top-j columns (1-based)."""
    squares = (basis_a.mT.double() @ basis_b.double()).pow(2)
    cumulative = squares.cumsum(0).cumsum(1)
    i = torch.arange(1, squares.shape[0] + 1, dtype=torch.float64)[:, None]
    j = torch.arange(1, squares.shape[1] + 1, dtype=torch.float64)[None, :]
    return cumulative / torch.minimum(i, j)


def _factored_inner(a: FactoredUpdate, b: FactoredUpdate) -> float:
    """⟨L1C1R1, L2C2R2⟩_F = Σ (C1ᵀ(L1ᵀL2)C2) ⊙ (R1R2ᵀ): K1×K2 work, neither matrix formed."""
    gram_left = a.scaled_left().mT @ b.scaled_left()
    if a.core is not None:
        gram_left = upcast(a.core).mT @ gram_left
    if b.core is not None:
        gram_left = gram_left @ upcast(b.core)
    gram_right = upcast(a.right) @ upcast(b.right).mT
    return float((gram_left * gram_right).sum())


def inner_product(a: Update, b: Update) -> float:
    """⟨ΔW_a, ΔW_b⟩_F, from factors where both are factored, ⟨F1,F2⟩·⟨G1,G2⟩ for matching Kronecker ones."""
    if a.shape != b.shape:
        raise ValueError(f"updates of different shapes {a.shape} and {b.shape} have no inner product")
    if isinstance(a, FactoredUpdate) and isinstance(b, FactoredUpdate):
        return _factored_inner(a, b)
    if (
        isinstance(a, KroneckerUpdate)
        and isinstance(b, KroneckerUpdate)
        and a.first.shape == b.first.shape
        and a.second.shape == b.second.shape
    ):
        return a.scale * b.scale * inner_product(a.first, b.first) * inner_product(a.second, b.second)
    return float((a.materialize() * b.materialize()).sum())


def update_cosine(a: Update, b: Update) -> float | None:
    """⟨ΔW_a, ΔW_b⟩_F / (‖ΔW_a‖_F‖ΔW_b‖_F); None when either update is zero."""
    norm = math.sqrt(max(inner_product(a, a), 0.0) * max(inner_product(b, b), 0.0))
    if norm == 0.0:
        return None
    return max(-1.0, min(1.0, inner_product(a, b) / norm))
