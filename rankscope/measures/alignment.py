"""Alignment between two updates: principal angles, projection overlap, φ grid, exact update cosine.

Pure functions of tensors (orthonormal bases, factors). docs/architecture.md: with k = min of the two ranks, principal
angles between the top-k singular subspaces (cos θ_i = σ_i(U1ᵀU2)); projection overlap ‖U1ᵀU2‖_F²/k against its
random baseline k/dim; the LoRA paper's φ(i, j); and ⟨ΔW1, ΔW2⟩_F/(‖ΔW1‖‖ΔW2‖) from factors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..core.factored import update_r_factors
from ..core.update import FactoredUpdate, KroneckerUpdate, Update, upcast
from .metrics import Spectra, batch_numerical_rank


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
    """⟨L1S1C1R1, L2S2C2R2⟩_F = Σ (C1ᵀS1(L1ᵀL2)S2C2) ⊙ (R1R2ᵀ): K1×K2 work, neither matrix formed (the scales act
    on the K×K level, so no factor is rescaled)."""
    gram_left = _scaled_core(a).mT @ (upcast(a.left).mT @ upcast(b.left)) @ _scaled_core(b)
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


# -- every pair of factored updates of one layer, from cross-Grams ----------------------------------------------
# For ΔW = L·S·C·R with R factors R_L, R_R (the spectrum path's, kept in ``core.factored``'s cache), the core
# R_L·S·C·R_Rᵀ = U_c·Σ·V_cᵀ gives U = L·R_L⁻¹·U_c and V = Rᵀ·R_R⁻¹·V_c: each basis is a factor times a small matrix,
# so U_aᵀU_b = X_aᵀ·(L_aᵀL_b)·X_b and ⟨ΔW_a, ΔW_b⟩ = Σ (C_aᵀS_a·L_aᵀL_b·S_bC_b) ⊙ (R_aR_bᵀ) need only the
# cross-Grams. Where R is not well conditioned (it came from Householder QR, not an accepted CholeskyQR), that
# side uses the explicit Q of a Householder QR instead (F = Q, factor = Q·T), so no R⁻¹ amplifies rounding.
@dataclass
class _Side:
    factor: torch.Tensor  # F (d × K'), float64: the factor itself, or an orthonormal Q
    to_factor: torch.Tensor | None  # T with the factor = F·T (None: T = I)
    basis: torch.Tensor | None = None  # X (K' × rank): the singular basis U = F·X


def _side(factor: torch.Tensor, r: torch.Tensor, method: str) -> tuple[_Side, torch.Tensor]:
    if method == "cholesky":
        return _Side(factor, None), r
    q, r = torch.linalg.qr(factor)
    return _Side(q, r), r


def _cross(a: _Side, b: _Side) -> tuple[torch.Tensor, torch.Tensor]:
    """(X_aᵀ·F_aᵀF_b·X_b, factor_aᵀ·factor_b)."""
    gram = a.factor.mT @ b.factor
    factors = gram if a.to_factor is None else a.to_factor.mT @ gram
    if b.to_factor is not None:
        factors = factors @ b.to_factor
    return a.basis.mT @ gram @ b.basis, factors


def _scaled_core(update: FactoredUpdate) -> torch.Tensor:
    """diag(scale)·C (K × K, float64)."""
    core = upcast(update.core) if update.core is not None else torch.eye(update.inner_dim, dtype=torch.float64)
    scale = update.scale
    return core * (upcast(scale.reshape(-1, 1)) if isinstance(scale, torch.Tensor) else float(scale))


ALIGNMENT_KEYS = ("cosine", "left_overlap", "left_baseline", "left_min_angle", "left_mean_angle",
                  "right_overlap", "right_baseline", "right_min_angle", "right_mean_angle")  # fmt: skip


def factored_pairwise_alignment(updates: Sequence[FactoredUpdate]) -> dict:
    """The k×k alignment matrices of ``measures.components.pairwise_alignment`` — exact update cosine; per side,
    with k_ij the smaller numerical rank, projection overlap, its baseline, smallest and mean principal angle in
    degrees — for factored updates of one shape, from the R factors the spectra computed and the cross-Grams
    (each factor upcast once). A zero update's entries are None."""
    n = len(updates)
    r_left, r_right, how_left, how_right = update_r_factors(updates)
    sides, sigmas, cores = [], [], []
    for i, update in enumerate(updates):
        left, rl = _side(upcast(update.left), r_left[i], how_left[i])
        right, rr = _side(upcast(update.right).mT, r_right[i], how_right[i])
        scaled = _scaled_core(update)
        u_core, sigma, vh_core = torch.linalg.svd(rl @ scaled @ rr.mT, full_matrices=False)
        sides.append((left, right, u_core, vh_core.mT, rl, rr))
        sigmas.append(sigma)
        cores.append(scaled)
    lengths = {len(s) for s in sigmas}
    dims = torch.tensor([float(max(u.shape)) for u in updates], dtype=torch.float64)
    if len(lengths) == 1:
        ranks = batch_numerical_rank(Spectra(sigmas), dims).tolist()
    else:
        ranks = [int(batch_numerical_rank(Spectra([s]), dims[i : i + 1])[0]) for i, s in enumerate(sigmas)]
    for (left, right, u_core, v_core, rl, rr), rank in zip(sides, ranks, strict=True):
        for side, vectors, r in ((left, u_core, rl), (right, v_core, rr)):
            chosen = vectors[:, :rank]
            implicit = side.to_factor is None
            side.basis = torch.linalg.solve_triangular(r, chosen, upper=True) if implicit and rank else chosen
    energies = [float((s * s).sum()) for s in sigmas]
    out: dict[str, list[list[float | None]]] = {key: [[None] * n for _ in range(n)] for key in ALIGNMENT_KEYS}
    shape = updates[0].shape
    for i in range(n):
        if energies[i] > 0:  # UᵀU = I: overlap 1, every angle 0
            out["cosine"][i][i] = 1.0
            for name, dim in (("left", shape[0]), ("right", shape[1])):
                values = {"overlap": 1.0, "baseline": overlap_baseline(ranks[i], ranks[i], dim), "min_angle": 0.0,
                          "mean_angle": 0.0}  # fmt: skip
                for key, value in values.items():
                    out[f"{name}_{key}"][i][i] = value
        for j in range(i + 1, n):
            left_bases, left_factors = _cross(sides[i][0], sides[j][0])
            right_bases, right_factors = _cross(sides[i][1], sides[j][1])
            if energies[i] > 0 and energies[j] > 0:
                inner = float(((cores[i].mT @ left_factors @ cores[j]) * right_factors).sum())
                cosine = max(-1.0, min(1.0, inner / math.sqrt(energies[i] * energies[j])))
                out["cosine"][i][j] = out["cosine"][j][i] = cosine
            k = min(ranks[i], ranks[j])
            if k == 0:
                continue
            for name, cross, dim in (("left", left_bases, shape[0]), ("right", right_bases, shape[1])):
                block = cross[:k, :k]
                degrees = torch.rad2deg(torch.arccos(torch.linalg.svdvals(block).clamp(0.0, 1.0))).tolist()
                values = {
                    "overlap": float(block.pow(2).sum()) / k,
                    "baseline": overlap_baseline(k, k, dim),
                    "min_angle": min(degrees),
                    "mean_angle": sum(degrees) / len(degrees),
                }
                for key, value in values.items():
                    out[f"{name}_{key}"][i][j] = out[f"{name}_{key}"][j][i] = value
    return out
