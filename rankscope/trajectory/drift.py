"""How far a layer moved between two checkpoints: relative change and subspace overlap, both exact.

The change ΔW_t − ΔW_{t−1} of factored updates is itself factored — left [L_t, L_{t−1}], core
blockdiag(C_t, −C_{t−1}), right [R_t; R_{t−1}], inner dimension r_t + r_{t−1} (``core.formed.weighted_sum`` with
weights 1, −1) — so its Frobenius norm comes from its exact singular values, ‖D‖_F = (Σσ_i(D)²)^½, never from
‖a‖² + ‖b‖² − 2⟨a, b⟩, which cancels when the two are close. The subspace overlap is
``measures.alignment.projection_overlap`` of the top-k left (right) singular vectors: ‖U_aᵀU_b‖_F²/k ∈ [0, 1].
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..core.formed import weighted_sum
from ..core.spectrum import singular_values, singular_vectors
from ..core.update import FactoredUpdate, Update
from ..measures import metrics as M
from ..measures.alignment import projection_overlap


@dataclass(frozen=True)
class Basis:
    """A layer's top singular vectors at one step: ``left`` (m×k), ``right`` (n×k), k its numerical rank."""

    left: torch.Tensor
    right: torch.Tensor

    @property
    def rank(self) -> int:
        return int(self.left.shape[1])


def basis(update: Update) -> Basis:
    """The left and right singular vectors of ``update`` for its numerical rank (σ_i > max(m, n)·eps·σ₁)."""
    u, sigma, v = singular_vectors(update)
    rank = M.numerical_rank(sigma, update.shape) if sigma.numel() else 0
    return Basis(u[:, :rank], v[:, :rank])


def subspace_overlaps(a: Basis, b: Basis, k: int | None = None) -> dict[str, float | int | None]:
    """Projection overlaps of the top-k left and right subspaces of two steps; k = the smaller numerical rank (or
    ``k``, capped by both ranks). None (and k 0) where either update is zero."""
    top = min(a.rank, b.rank) if k is None else min(k, a.rank, b.rank)
    if top == 0:
        return {"k": 0, "left": None, "right": None}
    return {
        "k": top,
        "left": projection_overlap(a.left[:, :top], b.left[:, :top]),
        "right": projection_overlap(a.right[:, :top], b.right[:, :top]),
    }


def change_norms(pairs: Sequence[tuple[Update, Update]]) -> list[float]:
    """‖ΔW_t − ΔW_{t−1}‖_F for each (ΔW_t, ΔW_{t−1}), from the exact singular values of the stacked difference
    (batched by shape: ``core.spectrum.singular_values``). A layer whose stored factors did not change (a frozen
    or resumed layer) is 0 exactly, not the rounding of the stacked product (~1e-16·‖ΔW_t‖)."""
    moved = [i for i, (current, previous) in enumerate(pairs) if not _same(current, previous)]
    differences = [weighted_sum([pairs[i][0], pairs[i][1]], [1.0, -1.0]) for i in moved]
    sigmas, _ = singular_values(differences)
    norms = [0.0] * len(pairs)
    for i, sigma in zip(moved, sigmas, strict=True):
        norms[i] = math.sqrt(float((sigma.double() ** 2).sum()))
    return norms


def _same(a: Update, b: Update) -> bool:
    """The same stored factored update (left, right, core and scale equal), so ΔW_t − ΔW_{t−1} = 0."""
    if not (isinstance(a, FactoredUpdate) and isinstance(b, FactoredUpdate)) or type(a) is not type(b):
        return False
    if type(a) is not FactoredUpdate:  # BoRA and relatives keep other stored fields: compare nothing
        return False
    tensors = [(a.left, b.left), (a.right, b.right)]
    if (a.core is None) != (b.core is None):
        return False
    if a.core is not None:
        tensors.append((a.core, b.core))
    if isinstance(a.scale, torch.Tensor) or isinstance(b.scale, torch.Tensor):
        tensors.append((torch.as_tensor(a.scale), torch.as_tensor(b.scale)))
    elif a.scale != b.scale:
        return False
    return all(x.shape == y.shape and x.dtype == y.dtype and torch.equal(x, y) for x, y in tensors)


def relative_change(change: float, current_norm: float) -> float | None:
    """‖ΔW_t − ΔW_{t−1}‖_F / ‖ΔW_t‖_F; None where ΔW_t is zero."""
    return change / current_norm if current_norm > 0 else None


def subspace_drift(overlaps: dict) -> float | None:
    """1 − the mean of the left and right overlaps: 0 for the same subspaces, 1 for orthogonal ones."""
    if overlaps["left"] is None:
        return None
    return min(1.0, max(0.0, 1.0 - (overlaps["left"] + overlaps["right"]) / 2))  # an overlap can round past 1
