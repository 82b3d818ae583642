"""Pairwise alignment of many layers' factored components at once, from their own factors (no composite).

``alignment.factored_pairwise_alignments`` aligns a composition's components in its composite's coordinates; the
other layers — HydraLoRA's heads s·B_i·A sharing one A under a mean-head composite, any components whose composite
is not their concatenation — come here, in batches of one shape and one component layout. Per batch and side:

- the distinct stored factors (a factor several components share, HydraLoRA's A, is upcast once), each upcast
  once into one N × d × ΣK' float64 stack, and every cross-Gram F_iᵀF_j as a block of one batched Gram;
- each component's R factor from ``core.factored`` (the spectra's, cached); where it came from Householder QR,
  the side uses the explicit Q (F = Q, factor = Q·T with T = R) so no R⁻¹ amplifies rounding, as in
  ``alignment._from_factors``;
- per component the batched SVD of the K×K core R_L·S·C·R_Rᵀ = U_c·Σ·V_cᵀ, the bases U = F·X with
  X = R⁻¹·U_c (CholeskyQR) or X = U_c (explicit Q), so U_iᵀU_j = X_iᵀ·(F_iᵀF_j)·X_j;
- ⟨ΔW_i, ΔW_j⟩_F = Σ (C_iᵀS_i·(T_iᵀF_iᵀF_jT_j)·S_jC_j) ⊙ (right side's T_iᵀF_iᵀF_jT_j);
- the principal angles of each pair's k×k block (k the smaller numerical rank) by batched ``svdvals`` per k.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..core.buffers import ReusedBuffers
from ..core.factored import update_r_factors
from ..core.update import FactoredUpdate
from .metrics import Spectra, batch_numerical_rank

# a batch's float64 factor stack holds at most this many numbers (8 MiB: measured faster than 32 MiB, whose
# stacks fall out of the caches between the upcast and the Gram): bounded memory, still few large ops
_STACK_NUMBERS = 1 << 20


def same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two factors are the same stored values (the same tensor, or a view of the same memory and layout)."""
    if a is b:
        return True
    return (a.device == b.device and a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
            and a.data_ptr() == b.data_ptr() and a.storage_offset() == b.storage_offset())  # fmt: skip


def overlaps_and_angles(cross: torch.Tensor, ranks: Sequence[int]) -> list[tuple[float, list[float]] | None]:
    """Per layer n of N × a × b ``cross`` (U_iᵀU_j of one pair), with k = ranks[n]: ‖B‖_F²/k and the principal
    angles in degrees of its k×k block B (None where k = 0) — the layers of one k in one batched ``svdvals``."""
    out: list[tuple[float, list[float]] | None] = [None] * len(ranks)
    for rank in sorted(set(ranks) - {0}):
        chosen = [n for n, k in enumerate(ranks) if k == rank]
        blocks = cross[chosen, :rank, :rank]
        degrees = torch.rad2deg(torch.arccos(torch.linalg.svdvals(blocks).clamp(0.0, 1.0))).tolist()
        overlaps = (blocks.pow(2).sum(dim=(1, 2)) / rank).tolist()
        for n, overlap, angles in zip(chosen, overlaps, degrees, strict=True):
            out[n] = (overlap, angles)
    return out


def pair_sides(left: torch.Tensor, right: torch.Tensor, ranks: Sequence[int]) -> list[dict | None]:
    """Per layer {"left"/"right": (overlap, degrees)} of one pair from its two sides' cross matrices, None where
    the pair's smaller rank is 0."""
    lefts, rights = overlaps_and_angles(left, ranks), overlaps_and_angles(right, ranks)
    return [None if a is None else {"left": a, "right": b} for a, b in zip(lefts, rights, strict=True)]


def _pattern(factors: Sequence[torch.Tensor]) -> tuple[int, ...]:
    """For each component, the first component holding the same stored factor (itself where none before does)."""
    return tuple(next(j for j in range(i + 1) if same_tensor(factors[j], f)) for i, f in enumerate(factors))


def batch_key(updates: Sequence[FactoredUpdate]) -> tuple | None:
    """The layout that layers must share to be aligned in one batch, or None for the one-by-one path (a subclass
    whose factors are formed on access, components of different shapes, a factor wider than it is tall)."""
    if len(updates) < 2 or any(type(u) is not FactoredUpdate for u in updates):
        return None
    shape = updates[0].shape
    if any(u.shape != shape or u.inner_dim > min(shape) for u in updates):
        return None
    lefts, rights = [u.left for u in updates], [u.right for u in updates]
    stored = tuple((t.dtype, str(t.device)) for t in (*lefts, *rights))  # stacked across layers: one dtype each
    return (shape, tuple(u.inner_dim for u in updates), _pattern(lefts), _pattern(rights), stored)


def chunks(positions: list[int], updates: Sequence[FactoredUpdate]) -> list[list[int]]:
    """``positions`` (layers of one batch key) in runs whose float64 stack stays within :data:`_STACK_NUMBERS`."""
    per_layer = max(updates[0].shape) * sum(u.inner_dim for u in updates)
    size = max(1, _STACK_NUMBERS // max(per_layer, 1))
    return [positions[i : i + size] for i in range(0, len(positions), size)]


class _SideStack:
    """One side of N layers (left: F = L; right: F = Rᵀ, held as the stored K × n rows) and per component its R
    (N×K×K), T (I, or R where Householder), whether each layer took the Q, and the cross-Grams F_pᵀF_q of the
    distinct factors: of different factors by one batched product each (each factor upcast once, contiguously),
    of a factor with itself RᵀR (CholeskyQR: F = Q·R) or I (F = Q) — a factor all components share (HydraLoRA's
    A) is never read here."""

    def __init__(
        self, layers: Sequence[Sequence[FactoredUpdate]], side: int, rs: list, hows: list[str], buffers: ReusedBuffers
    ) -> None:
        count, k = len(layers), len(layers[0])
        pattern = _pattern([u.left if side == 0 else u.right for u in layers[0]])
        distinct = sorted(set(pattern))
        device = rs[0].device
        stacks: dict[int, torch.Tensor] = {}
        self.pattern = pattern
        self.r, self.t, self.house = [], [], []
        owned: dict[int, tuple] = {}
        for c in distinct:
            r = torch.stack([rs[n * k + c] for n in range(count)])
            house = torch.tensor([hows[n * k + c] != "cholesky" for n in range(count)], device=device)
            t = torch.eye(r.shape[-1], dtype=torch.float64, device=device).expand(count, -1, -1)
            if len(distinct) > 1:  # this factor meets another: its values are needed, upcast once
                stored = [u[c].left if side == 0 else u[c].right for u in layers]
                stacks[c] = buffers.take(c, (count, *stored[0].shape), device)  # one side's: used up here
                for n, factor in enumerate(stored):  # converted straight into the stack (~2× a stack, then .to)
                    stacks[c][n].copy_(factor)
            t = torch.where(house[:, None, None], r, t)
            if c in stacks and bool(house.any()):  # the explicit Q of a Householder QR, with its own R
                which = house.nonzero().flatten()
                factor = stacks[c][which] if side == 0 else stacks[c][which].mT
                q, r_own = torch.linalg.qr(factor)
                stacks[c][which] = q if side == 0 else q.mT
                r[which] = r_own
                t[which] = r_own
            owned[c] = (r, t, house)
        for c in range(k):
            r, t, house = owned[pattern[c]]  # a shared factor: the same R and T
            self.r.append(r)
            self.t.append(t)
            self.house.append(house)
        self.grams: dict[tuple[int, int], torch.Tensor] = {}
        for p in distinct:
            r, _, house = owned[p]
            identity = torch.eye(r.shape[-1], dtype=torch.float64, device=device)
            self.grams[(p, p)] = torch.where(house[:, None, None], identity, r.mT @ r)
            for q in distinct:
                if q > p:
                    a, b = stacks[p], stacks[q]
                    self.grams[(p, q)] = a.mT @ b if side == 0 else a @ b.mT
        self.bases: list[torch.Tensor] = []

    def set_basis(self, c: int, vectors: torch.Tensor) -> None:
        """X_c = R⁻¹·vectors where R is a CholeskyQR factor (F the factor itself), the vectors where F is Q."""
        eye = torch.eye(vectors.shape[-1], dtype=torch.float64, device=vectors.device)
        # a Householder R (maybe singular) is replaced by I, never inverted: X = I⁻¹·vectors
        solvable = torch.where(self.house[c][:, None, None], eye, self.r[c])
        self.bases.append(torch.linalg.solve_triangular(solvable, vectors, upper=True))

    def cross(self, i: int, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(X_iᵀ·F_iᵀF_j·X_j, factor_iᵀ·factor_j), N × K_i × K_j each."""
        p, q = self.pattern[i], self.pattern[j]
        gram = self.grams[(p, q)] if p <= q else self.grams[(q, p)].mT
        return self.bases[i].mT @ gram @ self.bases[j], self.t[i].mT @ gram @ self.t[j]


def aligned_batch(
    layers: Sequence[Sequence[FactoredUpdate]], scaled_core, buffers: ReusedBuffers | None = None
) -> list[tuple]:
    """Per layer (ranks, energies, {(i, j): (⟨ΔW_i, ΔW_j⟩, {"left"/"right": (overlap, degrees)} or None)}) for
    N layers of one :func:`batch_key`; ``scaled_core(update)`` is diag(scale)·C (K × K, float64); ``buffers``:
    the factor stacks' memory, shared by the batches of one call (a fresh N × d × K stack per batch pays its page
    faults again: measured at the 8B shape, 0.1 s of compare's 0.4 s)."""
    buffers = buffers or ReusedBuffers()
    count, k = len(layers), len(layers[0])
    flat = [u for updates in layers for u in updates]
    r_left, r_right, how_left, how_right = update_r_factors(flat)  # the spectra's, from the cache
    left = _SideStack(layers, 0, r_left, how_left, buffers)
    right = _SideStack(layers, 1, r_right, how_right, buffers)
    cores, sigmas = [], []
    for c in range(k):
        device = left.r[0].device
        core = torch.stack([scaled_core(updates[c]).to(device) for updates in layers])
        u_core, sigma, vh_core = torch.linalg.svd(left.r[c] @ core @ right.r[c].mT, full_matrices=False)
        left.set_basis(c, u_core)
        right.set_basis(c, vh_core.mT)
        cores.append(core)
        sigmas.append(sigma)
    dims = torch.tensor([float(max(layers[0][0].shape))] * count, dtype=torch.float64)
    ranks = [batch_numerical_rank(Spectra(list(sigma.cpu())), dims).tolist() for sigma in sigmas]  # [c][layer]
    energies = [(sigma * sigma).sum(dim=1).tolist() for sigma in sigmas]
    pairs: dict[tuple[int, int], list] = {}
    for i in range(k):
        for j in range(i + 1, k):
            left_bases, left_factors = left.cross(i, j)
            right_bases, right_factors = right.cross(i, j)
            inner = ((cores[i].mT @ left_factors @ cores[j]) * right_factors).sum(dim=(1, 2)).tolist()
            smaller = [min(a, b) for a, b in zip(ranks[i], ranks[j], strict=True)]
            sides = pair_sides(left_bases, right_bases, smaller)
            pairs[(i, j)] = [(inner[n], sides[n]) for n in range(count)]
    return [
        ([r[n] for r in ranks], [e[n] for e in energies], {pair: values[n] for pair, values in pairs.items()})
        for n in range(count)
    ]
