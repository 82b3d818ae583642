"""How the components of a composed update relate: pairwise alignment matrices (HydraLoRA heads, compositions).

Pure: takes updates and returns numbers. Each k×k matrix is indexed by component; a pair involving a zero
component has null entries (alignment with a zero update is undefined, never NaN).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from . import alignment
from .metrics import numerical_rank
from .spectrum import singular_vectors
from .update import Update


def _degrees(radians: torch.Tensor) -> list[float]:
    return [math.degrees(float(v)) for v in radians]


def pairwise_alignment(updates: Sequence[Update]) -> dict:
    """k×k matrices over the components: exact update cosine, and for the left (output) and right (input)
    singular subspaces of each pair, with k_ij = min of the two numerical ranks: projection overlap, its random
    baseline, and the smallest and mean principal angle in degrees."""
    bases = []
    for update in updates:
        u, sigma, v = singular_vectors(update)
        rank = numerical_rank(sigma, update.shape)
        bases.append((u[:, :rank], v[:, :rank]) if rank else None)
    n = len(updates)
    out: dict[str, list[list[float | None]]] = {
        key: [[None] * n for _ in range(n)]
        for key in (
            "cosine",
            "left_overlap",
            "left_baseline",
            "left_min_angle",
            "left_mean_angle",
            "right_overlap",
            "right_baseline",
            "right_min_angle",
            "right_mean_angle",
        )
    }
    for i in range(n):
        for j in range(n):
            out["cosine"][i][j] = alignment.update_cosine(updates[i], updates[j]) if j >= i else out["cosine"][j][i]
            if bases[i] is None or bases[j] is None:
                continue
            for side, index in (("left", 0), ("right", 1)):
                a, b = bases[i][index], bases[j][index]
                k = min(a.shape[1], b.shape[1])
                angles = alignment.principal_angles(a[:, :k], b[:, :k])
                degrees = _degrees(angles)
                out[f"{side}_overlap"][i][j] = alignment.projection_overlap(a[:, :k], b[:, :k])
                out[f"{side}_baseline"][i][j] = alignment.overlap_baseline(k, k, a.shape[0])
                out[f"{side}_min_angle"][i][j] = min(degrees)
                out[f"{side}_mean_angle"][i][j] = sum(degrees) / len(degrees)
    return out


def off_diagonal_mean(matrix: list[list[float | None]]) -> float | None:
    """Mean of the defined off-diagonal entries of a k×k matrix (None when there are none)."""
    values = [v for i, row in enumerate(matrix) for j, v in enumerate(row) if i != j and v is not None]
    return sum(values) / len(values) if values else None
