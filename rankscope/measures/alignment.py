"""Alignment between two updates: principal angles, projection overlap, φ grid, exact update cosine.

Pure functions of tensors (orthonormal bases, factors). docs/architecture.md: with k = min of the two ranks, principal
angles between the top-k singular subspaces (cos θ_i = σ_i(U1ᵀU2)); projection overlap ‖U1ᵀU2‖_F²/k against its
random baseline k/dim; the LoRA paper's φ(i, j); and ⟨ΔW1, ΔW2⟩_F/(‖ΔW1‖‖ΔW2‖) from factors.
"""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..core.buffers import ReusedBuffers
from ..core.factored import joined_r_factors, update_r_factors
from ..core.formed import FormedUpdate, Joined, Summed
from ..core.update import FactoredUpdate, KroneckerUpdate, Update, as_bits, upcast
from . import alignment_batched
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


def inner_product(a: Update, b: Update, dense: Callable[[Update], torch.Tensor] | None = None) -> float:
    """⟨ΔW_a, ΔW_b⟩_F, from factors where both are factored, ⟨F1,F2⟩·⟨G1,G2⟩ for matching Kronecker ones, else
    from the matrices (``dense(update)``: where they come from; default each one's ``materialize()``)."""
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
    form = dense or (lambda update: update.materialize())
    return float((form(a) * form(b)).sum())


def _cosine(ab: float, aa: float, bb: float) -> float | None:
    norm = math.sqrt(max(aa, 0.0) * max(bb, 0.0))
    if norm == 0.0:
        return None
    return max(-1.0, min(1.0, ab / norm))


def update_cosine(a: Update, b: Update) -> float | None:
    """⟨ΔW_a, ΔW_b⟩_F / (‖ΔW_a‖_F‖ΔW_b‖_F); None when either update is zero."""
    return _cosine(inner_product(a, b), inner_product(a, a), inner_product(b, b))


_HELD_NUMBERS = 1 << 26  # matrices kept formed while one layer's pairs are taken (512 MiB of float64 at most)


def update_cosines(updates: Sequence[Update]) -> list[list[float | None]]:
    """:func:`update_cosine` of every pair of ``updates`` (a symmetric k×k matrix, None where either is zero): each
    inner product taken once, each ‖ΔW‖² once, and an update without a factored inner product formed once (while
    they fit in :data:`_HELD_NUMBERS`) instead of once per pair."""
    held: dict[int, torch.Tensor] = {}
    room = [_HELD_NUMBERS]

    def dense(update: Update) -> torch.Tensor:
        found = held.get(id(update))
        if found is None:
            found = update.materialize()
            if found.numel() <= room[0]:
                held[id(update)], room[0] = found, room[0] - found.numel()
        return found

    n = len(updates)
    inner = [[0.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(i, n):
            inner[i][j] = inner[j][i] = inner_product(updates[i], updates[j], dense)
    return [[_cosine(inner[i][j], inner[i][i], inner[j][j]) for j in range(n)] for i in range(n)]


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

# a pair of components: ⟨ΔW_i, ΔW_j⟩_F and, where both have rank, per side (projection overlap, angles in degrees)
PairValues = tuple[float, dict[str, tuple[float, list[float]]] | None]


@dataclass
class _Aligned:
    """Each component's numerical rank and energy ‖ΔW_i‖_F² = Σσ², and the values of each pair (i < j)."""

    ranks: list[int]
    energies: list[float]
    pair: Callable[[int, int], PairValues]


def factored_pairwise_alignment(updates: Sequence[FactoredUpdate], composite: FactoredUpdate | None = None) -> dict:
    """The k×k alignment matrices of ``measures.components.pairwise_alignment`` — exact update cosine; per side,
    with k_ij the smaller numerical rank, projection overlap, its baseline, smallest and mean principal angle in
    degrees — for factored updates of one shape, from the R factors the spectra computed and the cross-Grams
    (each factor upcast once). A zero update's entries are None.

    ``composite``: the components' weighted sum as ``core.formed.weighted_sum`` builds it, with factors
    [L_1 … L_k] and [R_1; …; R_k] joined from the very tensors (or a plain update whose factors are checked equal
    to the components' in stored precision). Its R factors — the
    spectrum's, from the cache — then hold every cross-Gram (L_iᵀL_j = R_L[:, I_i]ᵀ·R_L[:, I_j]), so the
    components are aligned in those K = ΣK_i coordinates with no pass over their m- and n-row factors."""
    return factored_pairwise_alignments([(updates, composite)])[0]


def factored_pairwise_alignments(
    layers: Sequence[tuple[Sequence[FactoredUpdate], FactoredUpdate | None]],
) -> list[dict]:
    """:func:`factored_pairwise_alignment` of many layers' (components, composite): those whose composite is the
    concatenation of their components' factors in batches of one shape (a handful of batched QRs and SVDs for a
    whole model instead of a dozen small ops per layer); the others of plain factored components (HydraLoRA's
    heads) batched from their own factors by ``alignment_batched``, any left one by one from their factors."""
    results: list[dict | None] = [None] * len(layers)
    coordinates = _coordinates(layers)
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, found in coordinates.items():
        r_left, r_right, left_spans, right_spans = found
        key = (layers[i][0][0].shape, tuple(r_left.shape), tuple(r_right.shape), left_spans, right_spans)
        groups[key].append(i)
    for (shape, _, _, left_spans, right_spans), members in groups.items():
        lefts = [torch.stack([coordinates[i][0][:, a:b] for i in members]) for a, b in left_spans]
        rights = [torch.stack([coordinates[i][1][:, a:b] for i in members]) for a, b in right_spans]
        aligned = _in_coordinates([layers[i][0] for i in members], lefts, rights)
        for i, one in zip(members, aligned, strict=True):
            results[i] = _matrices(one, shape)
    batches: dict[tuple, list[int]] = defaultdict(list)  # the others, batched by shape and component layout
    for i, (updates, _) in enumerate(layers):
        if results[i] is None and (key := alignment_batched.batch_key(updates)) is not None:
            batches[key].append(i)
    buffers = ReusedBuffers()  # the factor stacks' memory, from batch to batch
    for members in batches.values():
        for part in alignment_batched.chunks(members, layers[members[0]][0]):
            batch = alignment_batched.aligned_batch([layers[i][0] for i in part], _scaled_core, buffers)
            for i, (ranks, energies, values) in zip(part, batch, strict=True):
                aligned = _Aligned(ranks, energies, lambda a, b, v=values: v[(a, b)])
                results[i] = _matrices(aligned, layers[i][0][0].shape)
    for i, (updates, _) in enumerate(layers):
        if results[i] is None:
            results[i] = _matrices(_from_factors(updates), updates[0].shape)
    return results  # type: ignore[return-value]


def _ranks(sigmas: list[torch.Tensor], updates: Sequence[FactoredUpdate]) -> list[int]:
    """numpy's matrix_rank rule per component (batched where the spectra have one length)."""
    dims = torch.tensor([float(max(u.shape)) for u in updates], dtype=torch.float64)
    if len({len(s) for s in sigmas}) == 1:
        return batch_numerical_rank(Spectra(sigmas), dims).tolist()
    return [int(batch_numerical_rank(Spectra([s]), dims[i : i + 1])[0]) for i, s in enumerate(sigmas)]


def _from_factors(updates: Sequence[FactoredUpdate]) -> _Aligned:
    """U = L·R_L⁻¹·U_core (or Q·U_core), V likewise, each factor upcast once; a pair costs its cross-Grams."""
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
    ranks = _ranks(sigmas, updates)
    for (left, right, u_core, v_core, rl, rr), rank in zip(sides, ranks, strict=True):
        for side, vectors, r in ((left, u_core, rl), (right, v_core, rr)):
            chosen = vectors[:, :rank]
            implicit = side.to_factor is None
            side.basis = torch.linalg.solve_triangular(r, chosen, upper=True) if implicit and rank else chosen

    def pair(i: int, j: int) -> PairValues:
        left_bases, left_factors = _cross(sides[i][0], sides[j][0])
        right_bases, right_factors = _cross(sides[i][1], sides[j][1])
        inner = float(((cores[i].mT @ left_factors @ cores[j]) * right_factors).sum())
        (sides_of_pair,) = alignment_batched.pair_sides(left_bases[None], right_bases[None], [min(ranks[i], ranks[j])])
        return inner, sides_of_pair

    return _Aligned(ranks, [float((s * s).sum()) for s in sigmas], pair)


Spans = tuple[tuple[int, int], ...]


def _coordinates(
    layers: Sequence[tuple[Sequence[FactoredUpdate], FactoredUpdate | None]],
) -> dict[int, tuple[torch.Tensor, torch.Tensor, Spans, Spans]]:
    """Layer → (R_L, R_R, each component's columns of R_L, of R_R) where shared factors L = Q_L·R_L, Rᵀ = Q_R·R_R
    hold every component (ΔW_c = Q_L·R_L[:, I_c]·S_cC_c·R_R[:, J_c]ᵀ·Q_Rᵀ): a composite that concatenates its
    components' factors (I_c = J_c), or HydraLoRA's heads s·B_c·A under their mean, whose sum's host [B_1 … B_N]
    the spectrum factored (I_c its columns of B_c, J_c all of A). R factors are the spectra's, from the cache."""
    found: dict[int, tuple[torch.Tensor, torch.Tensor, Spans, Spans]] = {}
    spans = {i: s for i, (updates, composite) in enumerate(layers) if (s := _spans(updates, composite)) is not None}
    chosen = list(spans)
    r_left, r_right, _, _ = update_r_factors([layers[i][1] for i in chosen])
    for position, i in enumerate(chosen):
        found[i] = (r_left[position], r_right[position], tuple(spans[i]), tuple(spans[i]))
    heads = {i: host for i, (updates, composite) in enumerate(layers) if i not in spans
             and (host := _heads_host(updates, composite)) is not None}  # fmt: skip
    members = list(heads)
    hosts = joined_r_factors([heads[i] for i in members])
    shared = update_r_factors([layers[i][0][0] for i in members])[1]  # every head's R_R is A's
    for i, r_host, r_shared in zip(members, hosts, shared, strict=True):
        whole = ((0, layers[i][0][0].inner_dim),) * len(layers[i][0])
        found[i] = (r_host, r_shared, heads[i].spans, whole)
    return found


def _heads_host(updates: Sequence[FactoredUpdate], composite: FactoredUpdate | None) -> Joined | None:
    """The host [B_1 … B_N] of a mean (1/N)·Σ B_i·A (``FormedUpdate`` of a ``Summed``) whose components are plain
    updates B_i·A of those very tensors, in order; None otherwise."""
    if type(composite) is not FormedUpdate or not isinstance(composite.left_factor, Summed):
        return None
    summed = composite.left_factor
    if any(type(u) is not FactoredUpdate or u.core is not None for u in updates) or len(updates) != len(summed.factors):
        return None
    shared = composite.right_factor
    if not isinstance(shared, torch.Tensor) or summed.shape[0] < summed.shape[1] * len(updates):
        return None
    for update, factor in zip(updates, summed.factors, strict=True):
        if update.left is not factor or not alignment_batched.same_tensor(update.right, shared.mT):
            return None
    return summed.joined


def _spans(updates: Sequence[FactoredUpdate], composite: FactoredUpdate | None) -> list[tuple[int, int]] | None:
    """The columns I_i = [a, b) of each component in the composite's inner dimension, or None where the
    composite is not the concatenation of the components' factors (plain factored updates only: a block-diagonal
    one's ``left`` is materialised on every access)."""
    if composite is None or any(type(u) is not FactoredUpdate for u in updates):
        return None
    widths = [u.inner_dim for u in updates]
    if composite.shape != updates[0].shape or composite.inner_dim != sum(widths):
        return None
    if type(composite) is FormedUpdate:  # weighted_sum's: joined the very tensors (by identity, no comparison)
        left, right = composite.left_factor, composite.right_factor
        if not (isinstance(left, Joined) and isinstance(right, Joined) and left.spans == right.spans):
            return None
        mine = zip(updates, left.stored, right.stored, strict=False)
        same = len(left.stored) == len(updates) and all(u.left is a and u.right is b for u, a, b in mine)
        return list(left.spans) if same else None
    if type(composite) is not FactoredUpdate:
        return None
    spans = list(itertools.pairwise([sum(widths[:i]) for i in range(len(widths) + 1)]))
    for (a, b), update in zip(spans, updates, strict=True):
        if not (_same(composite.left[:, a:b], update.left) and _same(composite.right[a:b], update.right)):
            return None
    return spans


def _same(part: torch.Tensor, factor: torch.Tensor) -> bool:
    """Whether ``part`` of the composite's factor holds ``factor``'s values: bit for bit where the dtypes agree
    (an integer view: ~2× faster than comparing floats; a −0 that became +0 only sends the layer to the other
    path), else by value after weighted_sum's promotion (exact for floats)."""
    if part.shape != factor.shape or part.device != factor.device:
        return False
    if part.dtype != factor.dtype:
        return torch.equal(part, factor.to(part.dtype))
    bits, other = as_bits(part), as_bits(factor)
    if bits is None or other is None:
        return torch.equal(part, factor)
    return torch.equal(bits, other)


def _in_coordinates(
    layers: Sequence[Sequence[FactoredUpdate]], lefts: list[torch.Tensor], rights: list[torch.Tensor]
) -> list[_Aligned]:
    """N layers of k components each, ``lefts[c]``/``rights[c]`` the N × d × K_c stacks of component c's columns
    of the composites' R factors. With L = Q_L·R_L and Rᵀ = Q_R·R_R (Q orthonormal, never formed), component c is
    ΔW_c = Q_L·(P_c·S_cC_c·P'_cᵀ)·Q_Rᵀ with P_c = R_L[:, I_c], P'_c = R_R[:, I_c]: its singular bases are Q_L·X_c
    and Q_R·Y_c with X_c, Y_c those of the small M_c = P_c·S_cC_c·P'_cᵀ (thin QRs of P_c and P'_c, the SVD of the
    K_c×K_c core), so U_iᵀU_j = X_iᵀX_j and ⟨ΔW_i, ΔW_j⟩_F = ⟨M_i, M_j⟩_F."""
    count, k = len(layers), len(lefts)
    sigmas, bases, products = [], [], []
    for c in range(k):
        scaled = torch.stack([_scaled_core(updates[c]) for updates in layers])
        q_left, r_left = torch.linalg.qr(lefts[c])
        q_right, r_right = torch.linalg.qr(rights[c])
        u_core, sigma, vh_core = torch.linalg.svd(r_left @ scaled @ r_right.mT, full_matrices=False)
        sigmas.append(sigma)
        bases.append((q_left @ u_core, q_right @ vh_core.mT))
        products.append(lefts[c] @ scaled @ rights[c].mT)
    dims = torch.tensor([float(max(updates[0].shape)) for updates in layers], dtype=torch.float64)
    ranks = [batch_numerical_rank(Spectra(list(sigma)), dims).tolist() for sigma in sigmas]  # [c][layer]
    energies = [(sigma * sigma).sum(dim=1).tolist() for sigma in sigmas]
    pairs: dict[tuple[int, int], list[PairValues]] = {}
    for i in range(k):
        for j in range(i + 1, k):
            inner = (products[i] * products[j]).sum(dim=(1, 2)).tolist()
            smaller = [min(a, b) for a, b in zip(ranks[i], ranks[j], strict=True)]
            crosses = [bases[i][side].mT @ bases[j][side] for side in (0, 1)]  # N × K_i' × K_j' each
            sides = alignment_batched.pair_sides(*crosses, smaller)
            pairs[(i, j)] = [(inner[n], sides[n]) for n in range(count)]
    out = []
    for n in range(count):
        values = {pair: per_layer[n] for pair, per_layer in pairs.items()}
        out.append(_Aligned([r[n] for r in ranks], [e[n] for e in energies], lambda i, j, v=values: v[(i, j)]))
    return out


def _matrices(aligned: _Aligned, shape: tuple[int, int]) -> dict:
    """The k×k matrices from each component's rank and energy and each pair's values; the diagonal exact."""
    ranks, energies = aligned.ranks, aligned.energies
    n = len(ranks)
    out: dict[str, list[list[float | None]]] = {key: [[None] * n for _ in range(n)] for key in ALIGNMENT_KEYS}
    for i in range(n):
        if energies[i] > 0:  # UᵀU = I: overlap 1, every angle 0
            out["cosine"][i][i] = 1.0
            for name, dim in (("left", shape[0]), ("right", shape[1])):
                values = {"overlap": 1.0, "baseline": overlap_baseline(ranks[i], ranks[i], dim), "min_angle": 0.0,
                          "mean_angle": 0.0}  # fmt: skip
                for key, value in values.items():
                    out[f"{name}_{key}"][i][i] = value
        for j in range(i + 1, n):
            inner, sides = aligned.pair(i, j)
            if energies[i] > 0 and energies[j] > 0:
                cosine = max(-1.0, min(1.0, inner / math.sqrt(energies[i] * energies[j])))
                out["cosine"][i][j] = out["cosine"][j][i] = cosine
            if sides is None:
                continue
            k = min(ranks[i], ranks[j])
            for name, dim in (("left", shape[0]), ("right", shape[1])):
                overlap, degrees = sides[name]
                values = {
                    "overlap": overlap,
                    "baseline": overlap_baseline(k, k, dim),
                    "min_angle": min(degrees),
                    "mean_angle": sum(degrees) / len(degrees),
                }
                for key, value in values.items():
                    out[f"{name}_{key}"][i][j] = out[f"{name}_{key}"][j][i] = value
    return out
