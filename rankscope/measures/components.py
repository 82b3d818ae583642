"""How the components of a composed update relate: pairwise alignment matrices (HydraLoRA heads, compositions).

Pure: takes updates and returns numbers. Each k×k matrix is indexed by component; a pair involving a zero
component has null entries (alignment with a zero update is undefined, never NaN).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from ..core.spectrum import singular_vectors
from ..core.update import FactoredUpdate, Update
from . import alignment
from .alignment_batched import overlaps_and_angles
from .concentration import concentration
from .metrics import numerical_rank


def pairwise_alignment(updates: Sequence[Update], composite: Update | None = None) -> dict:
    """k×k matrices over the components: exact update cosine, and for the left (output) and right (input)
    singular subspaces of each pair, with k_ij = min of the two numerical ranks: projection overlap, its random
    baseline, and the smallest and mean principal angle in degrees.

    ``composite``: the layer's update built from these components (a composition's weighted sum), whose cached
    R factors hold the cross-Grams of concatenated components (``alignment.factored_pairwise_alignment``)."""
    return pairwise_alignments([(updates, composite)])[0]


def pairwise_alignments(layers: Sequence[tuple[Sequence[Update], Update | None]]) -> list[dict]:
    """:func:`pairwise_alignment` of many layers' (components, composite) at once: factored ones batched from the
    R factors the spectra computed (``alignment.factored_pairwise_alignments``), the others one by one from their
    singular vectors."""
    results: list[dict | None] = [None] * len(layers)
    factored = [i for i, (updates, _) in enumerate(layers) if all(isinstance(u, FactoredUpdate) for u in updates)]
    found = alignment.factored_pairwise_alignments(
        [(layers[i][0], c if isinstance(c := layers[i][1], FactoredUpdate) else None) for i in factored]
    )
    for i, matrices in zip(factored, found, strict=True):
        results[i] = matrices
    for i, (updates, _) in enumerate(layers):
        if results[i] is None:
            results[i] = _from_singular_vectors(updates)
    return results  # type: ignore[return-value]


_MEASURES = ("overlap", "baseline", "min_angle", "mean_angle")  # per side, of each pair's top-k subspaces
_KEYS = tuple(f"{side}_{what}" for side in ("left", "right") for what in _MEASURES)


_BATCH_NUMBERS = 1 << 22  # the k×k blocks of one batched svdvals hold at most this many numbers (32 MiB)


def _from_singular_vectors(updates: Sequence[Update]) -> dict:
    """Any kind of update (dense, Kronecker): each one's singular vectors, then the pairs i ≤ j (the matrices are
    symmetric), each pair's top-k block U_iᵀU_j, and the principal angles of blocks of one k by batched
    ``svdvals`` (``alignment_batched.overlaps_and_angles``), in batches of bounded size."""
    bases = []
    for update in updates:
        u, sigma, v = singular_vectors(update)
        rank = numerical_rank(sigma, update.shape)
        bases.append((u[:, :rank].double(), v[:, :rank].double()) if rank else None)
    n = len(updates)
    out: dict[str, list[list[float | None]]] = {"cosine": alignment.update_cosines(updates)}
    out.update({key: [[None] * n for _ in range(n)] for key in _KEYS})
    by_rank: dict[int, list[tuple[int, int]]] = {}
    for i in range(n):
        for j in range(i, n):
            if bases[i] is not None and bases[j] is not None:
                by_rank.setdefault(min(bases[i][0].shape[1], bases[j][0].shape[1]), []).append((i, j))
    for k, pairs in by_rank.items():
        size = max(1, _BATCH_NUMBERS // (k * k))
        for chunk in (pairs[p : p + size] for p in range(0, len(pairs), size)):
            for side, index in (("left", 0), ("right", 1)):
                cross = torch.stack([bases[i][index][:, :k].mT @ bases[j][index][:, :k] for i, j in chunk])
                baseline = alignment.overlap_baseline(k, k, updates[0].shape[index])
                for (i, j), (overlap, degrees) in zip(chunk, overlaps_and_angles(cross, [k] * len(chunk)), strict=True):
                    values = (overlap, baseline, min(degrees), sum(degrees) / len(degrees))
                    for what, value in zip(_MEASURES, values, strict=True):
                        out[f"{side}_{what}"][i][j] = out[f"{side}_{what}"][j][i] = value
    return out


SIDES = ("left", "right")


def subspace_similarity_grid(a: Update, b: Update, side: str = "right") -> torch.Tensor:
    """The LoRA paper's φ(i, j) grid between two updates of one layer (e.g. r=8 against r=64, or two seeds).

    With U_a, U_b the top-k singular vectors of each update on ``side`` ("right": the input space, the
    right-singular vectors the LoRA paper compares; "left": the output space), k = each update's numerical rank:
    φ(i, j) = ‖U_a[:, :i]ᵀ U_b[:, :j]‖_F² / min(i, j), a k_a × k_b float64 tensor with entries in [0, 1];
    φ(k, k) is the projection overlap. A zero update has k = 0 and gives an empty grid.
    """
    if side not in SIDES:
        raise ValueError(f"side must be one of {', '.join(SIDES)}, got {side!r}")
    axis = 0 if side == "left" else 1
    if a.shape[axis] != b.shape[axis]:
        raise ValueError(f"the {side} spaces differ in dimension: updates of shape {a.shape} and {b.shape}")
    bases = []
    for update in (a, b):
        u, sigma, v = singular_vectors(update)
        rank = numerical_rank(sigma, update.shape)
        bases.append((u if side == "left" else v)[:, :rank])
    return alignment.subspace_similarity(*bases)


def off_diagonal_mean(matrix: list[list[float | None]]) -> float | None:
    """Mean of the defined off-diagonal entries of a k×k matrix (None when there are none)."""
    values = [v for i, row in enumerate(matrix) for j, v in enumerate(row) if i != j and v is not None]
    return sum(values) / len(values) if values else None


def composition_fields(
    composite: dict, components: Sequence[dict], weights: Sequence[float], *, collapse_threshold: float = 0.9
) -> dict:
    """What the weights do: energy shares, interference, collapse, rank expansion and gain.

    ``composite`` and ``components`` are metric dicts (``spectrum_metrics``) of Σ w_iΔW_i and of each ΔW_i, with
    their ``rank_bound`` added. Energy shares ‖w_iΔW_i‖²/Σ_j‖w_jΔW_j‖² (what the weights do in fact, since
    components differ in norm); interference (‖Σ w_iΔW_i‖² − Σ‖w_iΔW_i‖²)/Σ‖w_iΔW_i‖²; collapsed when one
    component carries more than ``collapse_threshold`` of the energy; rank gain erank(composite)/max_i erank_i.
    """
    energies = [float(w) ** 2 * c["energy"] for c, w in zip(components, weights, strict=True)]
    total = sum(energies)
    energy_shares = [e / total for e in energies] if total > 0 else None
    best_component = max((c["erank"] for c in components), default=0.0)
    return {
        "energy_shares": {
            "values": energy_shares,
            "concentration": concentration(energies) if total > 0 else concentration([0.0]),
        },
        "interference": (composite["energy"] - total) / total if total > 0 else None,
        # one component always carries everything: collapse is a property of k ≥ 2 components
        "collapsed": bool(len(components) > 1 and energy_shares and max(energy_shares) > collapse_threshold),
        "rank_gain": composite["erank"] / best_component if best_component > 0 else None,
        "rank_expansion": {
            "numerical_rank": composite["numerical_rank"],
            "component_numerical_rank_sum": sum(c["numerical_rank"] for c in components),
            "erank": composite["erank"],
            "component_erank_sum": sum(c["erank"] for c in components),
            "rank_bound": composite["rank_bound"],
            "component_rank_bound_sum": sum(c["rank_bound"] for c in components),
            "utilization": composite["utilization"],
        },
    }


def weight_fields(raw: Sequence[float], applied: Sequence[float], *, normalize: str, mode: str) -> dict:
    """The composition weights as stored and as applied, their signs, and the concentration of |applied|."""
    return {
        "raw": [float(w) for w in raw],
        "normalized": [float(w) for w in applied],
        "signs": [1 if w > 0 else -1 if w < 0 else 0 for w in applied],
        "normalize": normalize,
        "mode": mode,
        "concentration": dict(_weight_concentration(tuple(float(w) for w in applied))),
    }


@functools.lru_cache(maxsize=64)
def _weight_concentration(applied: tuple[float, ...]) -> dict:
    """``concentration`` of the applied weights: the same for every layer of a composition, so computed once."""
    return concentration(applied)
