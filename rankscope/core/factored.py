"""The exact factored path: singular values of ΔW = L·C·R from the R factors of L and Rᵀ.

For ΔW = L·C·R (L m×K, R K×n) take thin QR factors L = Q_L·R_L and Rᵀ = Q_R·R_R; then
ΔW = Q_L·(R_L·C·R_Rᵀ)·Q_Rᵀ and the nonzero singular values of ΔW are those of the small core
R_L·C·R_Rᵀ. Cost O((m+n)K² + K³) instead of O(mn·min(m, n)). All of it in float64. Only the R factors are
needed: they come from CholeskyQR where that is provably accurate, else Householder QR (``core.triangular``).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch

from . import triangular
from .block_diagonal import assemble, block_diagonals, cores_from_blocks, diagonal_blocks
from .dense import DEFAULT_MEMORY_BUDGET, Progress, svdvals_or_nan
from .factor_cache import FACTOR_CACHE
from .factor_sides import Side, derivations, host_side, sides_of
from .formed import Joined
from .threads import thread_budget, worker_pool
from .triangular import (
    block_grams,
    cholesky_qr_limit,
    householder_r,
    map_factors,
    r_factors,
    r_factors_and_grams,
    r_from_gram_batches,
    r_from_grams,
)
from .update import BlockDiagonalUpdate, FactoredUpdate, upcast


def _cache_key(side: Side, device) -> tuple:
    return (side.tag, side.blocks, str(device), triangular.CHOLESKY_QR_TOLERANCE)  # read now: tests change it


def _side_r_factors(sides: Sequence[Side], device, keep: bool = True) -> list[tuple[torch.Tensor, str]]:
    """(R, method) of every side: whole factors through :func:`r_factors`, a composite's parts from blocks of its
    Gram, block-diagonal ones block by block (method "cholesky" only where every block took CholeskyQR); from the
    cache where it holds them (and into it, with ``keep``)."""
    count, sides = len(sides), list(sides)  # hosts of sums join after the callers' sides
    results: list[tuple[torch.Tensor, str] | None] = [FACTOR_CACHE.get(s.stored, _cache_key(s, device)) for s in sides]
    missing = [i for i, side in enumerate(sides) if results[i] is None and side.blocks == 1]
    summed = _add_hosts(sides, results, missing)
    derived = derivations(sides, missing)
    whole, repeats, first_of = [], {}, {}  # a factor several updates share (VeRA's A, HydraLoRA's): computed once
    for i in missing:
        if i not in derived and i not in summed:
            first = first_of.setdefault(sides[i].values, i) if not sides[i].parts else i
            if first == i:
                whole.append(i)
            else:
                repeats[i] = first
    split = [i for i, side in enumerate(sides) if results[i] is None and side.blocks > 1]
    computed, methods, grams = r_factors_and_grams([sides[i].factor for i in whole], device)
    hosts = {host for host, _, _ in derived.values()} | set(summed.values())  # the others' Grams go now
    gram_of = {i: gram for i, gram in zip(whole, grams, strict=True) if i in hosts}
    del grams
    for i, r, method in zip(whole, computed, methods, strict=True):
        results[i] = (r, method)
    for i, first in repeats.items():
        results[i] = results[first]
    inside = list(derived)  # a composite's parts: CholeskyQR from a block of its Gram, under the same test
    blocks = [gram_of[host][a:b, a:b] for host, a, b in (derived[i] for i in inside)]  # type: ignore[index]
    fallback = []
    for i, r in zip(inside, r_from_grams(blocks, [sides[i].factor.shape[0] for i in inside]), strict=True):
        if r is None:
            fallback.append(i)
        else:
            results[i] = (r, "cholesky")
    fallback += _sum_r_factors(sides, summed, gram_of, results)
    for i, r in zip(fallback, map_factors(householder_r, [sides[i].factor for i in fallback], device), strict=True):
        results[i] = (r, "householder")
    if split:
        _block_r_factors(sides, split, results, device)
    for i in (*missing, *split) if keep else ():  # what was computed here; the cache's entries stay as they are
        r, method = results[i]  # type: ignore[misc]
        FACTOR_CACHE.put(sides[i].stored, _cache_key(sides[i], device), r, method)
    return results[:count]  # type: ignore[return-value]


# a sum whose columns cancel by more than this is formed and factored by Householder QR without a test: the
# derived Gram's ε grows as ρ², so the CholeskyQR test would refuse it anyway
_MAX_CANCELLATION = 1e4


def _add_hosts(sides: list[Side], results: list, missing: list[int]) -> dict[int, int]:
    """For each missing sum of parts (``Side.combination``), its host [F_1 … F_N] appended to ``sides`` (and to
    ``missing``, once per host) where the host is tall: sum's index → host's index."""
    summed: dict[int, int] = {}
    index_of: dict[int, int] = {}
    for i in list(missing):
        combination = sides[i].combination
        if combination is None or not sides[i].tall:
            continue
        host = combination[0]
        if host.shape[0] < host.shape[1]:
            continue
        if id(host) not in index_of:
            index_of[id(host)] = len(sides)
            sides.append(host_side(host, sides[i].tag))
            results.append(None)
            missing.append(index_of[id(host)])
        summed[i] = index_of[id(host)]
    return summed


def _sum_r_factors(sides: Sequence[Side], summed: dict[int, int], gram_of: dict, results: list) -> list[int]:
    """R of each sum F = H·J from its host's computed Gram Ĝ: CholeskyQR of JᵀĜJ under the test with ε(rows + N²,
    K)·ρ_max² (``core.factor_sides``); the sums it refuses (their indices returned) take Householder QR. The sums
    of one layout (N parts of K columns) are derived in one batched product."""
    refused: list[int] = []
    layouts: dict[tuple, list[int]] = defaultdict(list)
    for i, host in summed.items():
        gram = gram_of.get(host)
        n, k = len(sides[i].combination[1]), sides[i].factor.shape[1]  # type: ignore[index]
        if gram is None or gram.shape != (n * k, n * k):
            refused.append(i)
        else:
            layouts[(n, k, gram.device)].append(i)
    chosen, grams, rows, inflation = [], [], [], []
    for (n, k, device), members in layouts.items():
        blocks = torch.stack([gram_of[summed[i]] for i in members]).view(-1, n, k, n, k)
        weights = torch.tensor([sides[i].combination[1] for i in members], dtype=torch.float64)  # type: ignore[index]
        on_device = weights.to(device)
        derived = torch.einsum("ci,cj,ciajb->cab", on_device, on_device, blocks)
        part_norms = torch.diagonal(blocks.view(-1, n * k, n * k), dim1=1, dim2=2).clamp_min(0).sqrt()
        spread = (weights.abs()[:, :, None] * part_norms.cpu().view(-1, n, k)).sum(dim=1)  # s_c
        norms = torch.diagonal(derived, dim1=1, dim2=2).clamp_min(0).sqrt().cpu()
        ratio = torch.where(spread > 0, spread / norms, torch.ones_like(spread))  # ρ_c (inf: a column summing to 0)
        worst = ratio.amax(dim=1).tolist() if k else [1.0] * len(members)
        for position, i in enumerate(members):
            if not worst[position] <= _MAX_CANCELLATION:
                refused.append(i)
                continue
            chosen.append(i)
            grams.append(derived[position])
            rows.append(sides[i].factor.shape[0] + n * n)
            inflation.append(max(worst[position], 1.0) ** 2)
    for i, r in zip(chosen, r_from_grams(grams, rows, inflation), strict=True):
        if r is None:
            refused.append(i)
        else:
            results[i] = (r, "cholesky")
    return refused


def _block_r_factors(sides: Sequence[Side], split: list[int], results: list, device) -> None:
    """(R, method) of each block-diagonal side into ``results``: R = blockdiag(R_1..R_b) from the Grams of its row
    blocks (one upcast of the factor), every block's CholeskyQR batched and tested as a whole factor's is; a block
    it refuses (or a wide one: rows/b < K) takes Householder QR, and the side's method is then "householder"."""
    blocks_of = {id(sides[i].factor): sides[i].blocks for i in split}
    grams = map_factors(
        lambda factor, workspace: block_grams(factor, blocks_of[id(factor)], workspace),
        [sides[i].factor for i in split],
        device,
    )
    rows = [sides[i].factor.shape[0] // sides[i].blocks for i in split]
    for i, (mine, taken) in zip(split, r_from_gram_batches(grams, rows), strict=True):
        if all(taken):
            results[i] = (assemble(mine), "cholesky")
            continue
        parts = [mine[b] if ok else map_factors(householder_r, [sides[i].block(b)], device)[0]
                 for b, ok in enumerate(taken)]  # fmt: skip
        results[i] = (torch.block_diag(*parts), "householder")


def update_r_factors(
    updates: Sequence[FactoredUpdate], device: torch.device | str = "cpu", *, keep: bool = True
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[str], list[str]]:
    """R_L and R_R (R factors of ``left`` and ``right``ᵀ: block by block for a :class:`BlockDiagonalUpdate`) of
    every update, and the method of each ("cholesky": R is well conditioned, ε·κ² ≤ the tolerance); ``keep``:
    the ones computed go into ``FACTOR_CACHE`` for a later alignment."""
    sides = [side for update in updates for side in sides_of(update)]
    both = _side_r_factors(sides, device, keep)
    left, right = both[0::2], both[1::2]
    return [r for r, _ in left], [r for r, _ in right], [m for _, m in left], [m for _, m in right]


def joined_r_factors(hosts: Sequence[Joined], device: torch.device | str = "cpu") -> list[torch.Tensor]:
    """The R factor of each joined factor [F_1 … F_N] (a sum's host, ``Side.combination``): the spectra's, from the
    cache, else computed (one pass over its parts)."""
    sides = [host_side(host, "left") for host in hosts]
    return [r for r, _ in _side_r_factors(sides, device)]


# -- factored updates: cores and their singular values ---------------------------------------------------------
def _scale_vector(update: FactoredUpdate, device: torch.device | str) -> torch.Tensor:
    if isinstance(update.scale, torch.Tensor):
        return upcast(update.scale.reshape(-1), device=device)
    return torch.full((update.inner_dim,), float(update.scale), dtype=torch.float64, device=device)


def _scales(updates: Sequence[FactoredUpdate], device) -> torch.Tensor:
    """Every update's scale, stacked: N × 1 × K where one is a vector (per inner column), else N × 1 × 1."""
    if any(isinstance(u.scale, torch.Tensor) for u in updates):
        return torch.stack([_scale_vector(u, device) for u in updates])[:, None, :]
    return torch.tensor([float(u.scale) for u in updates], dtype=torch.float64, device=device)[:, None, None]


def _cores(
    updates: Sequence[FactoredUpdate], r_left: Sequence[torch.Tensor], r_right: Sequence[torch.Tensor], device
) -> torch.Tensor:
    """R_L·diag(scale)·C·R_Rᵀ for updates whose R factors share their shapes, stacked (B × a × b).

    The scale acts on the K×K level: L·diag(s) = Q_L·(R_L·diag(s)), so the factors themselves are never rescaled.
    """
    scales = _scales(updates, device)
    blocks = _blocks(updates[0])
    if blocks > 1 and r_left[0].shape[-1] == r_left[0].shape[-2] == r_right[0].shape[0] == r_right[0].shape[1]:
        return _block_diagonal_cores(updates, r_left, r_right, scales, blocks, device)
    left = torch.stack(list(r_left)) * scales
    if updates[0].core is not None:
        left = left @ torch.stack([upcast(u.core, device=device) for u in updates])
    return left @ torch.stack(list(r_right)).mT


def _block_diagonal_cores(updates, r_left, r_right, scales: torch.Tensor, blocks: int, device) -> torch.Tensor:
    """The cores of block-diagonal updates (BoRA) from the blocks of their R factors (``core.block_diagonal``)."""
    left = torch.stack([diagonal_blocks(r, blocks) for r in r_left])  # N × b × r × r
    rank = left.shape[-1]
    left = left * (scales.reshape(len(updates), blocks, 1, rank) if scales.shape[-1] > 1 else scales[..., None])
    right = torch.stack([diagonal_blocks(r, blocks) for r in r_right])
    cores = [upcast(u.core, device=device) for u in updates]
    found = [block_diagonals(core, blocks) for core in cores]
    if all(d is not None for d in found):
        return cores_from_blocks(left, right, None, torch.stack(found))  # type: ignore[arg-type]
    return cores_from_blocks(left, right, torch.stack(cores), None)


def _blocks(update: FactoredUpdate) -> int:
    return update.blocks if isinstance(update, BlockDiagonalUpdate) else 1


def _core_key(update: FactoredUpdate, r_left: torch.Tensor, r_right: torch.Tensor) -> tuple:
    return (tuple(r_left.shape), tuple(r_right.shape), update.core is not None, _blocks(update))


def factored_cores(updates: Sequence[FactoredUpdate], device: torch.device | str = "cpu") -> torch.Tensor:
    """The stacked float64 cores R_L·diag(scale)·C·R_Rᵀ of same-shaped updates (B × min(m,K) × min(n,K))."""
    r_left, r_right, _, _ = update_r_factors(updates, device)
    return _cores(updates, r_left, r_right, device)


PARALLEL_MIN_CORE_FLOPS = 1 << 26  # a batch of cores worth splitting over the thread budget (BoRA's (b·r)² ones)


def _batched_svdvals(cores: torch.Tensor) -> torch.Tensor:
    """``svdvals_or_nan`` of a batch of cores; large CPU batches in parts over the threads of ``thread_budget``
    (inside ``single_threaded``; LAPACK releases the GIL, and no op waits on a fork-join)."""
    n, a, b = cores.shape
    workers = min(thread_budget(), n) if cores.device.type == "cpu" else 1
    if workers < 2 or n * a * b * min(a, b) < PARALLEL_MIN_CORE_FLOPS:
        return svdvals_or_nan(cores)
    parts = torch.chunk(cores, workers)
    futures = [worker_pool().submit(svdvals_or_nan, part) for part in parts[1:]]
    first = svdvals_or_nan(parts[0])
    return torch.cat([first, *(future.result() for future in futures)])


def factored_singular_values(
    updates: Sequence[FactoredUpdate],
    *,
    device: torch.device | str = "cpu",
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    progress: Progress | None = None,
) -> list[torch.Tensor]:
    """Exact singular values (descending, float64, ``rank_bound`` of them) of each factored update.

    The factors stream through one float64 buffer of the largest factor's size (``memory_budget`` bounds only
    the dense path); the K×K cores are batched by shape, in chunks of updates that bound the K × K intermediates.
    """
    results: list[torch.Tensor | None] = [None] * len(updates)
    for i, update in enumerate(updates):
        if update.rank_bound == 0:
            results[i] = torch.zeros(0, dtype=torch.float64)
    live = [i for i, u in enumerate(updates) if u.rank_bound > 0]
    # R factors that together overflow the cache would only push each other out (VeRA's 224 of 256² each, 0.2 GB,
    # against its 128 MB): then none is kept
    keep = sum(2 * 8 * updates[i].inner_dim ** 2 for i in live) <= FACTOR_CACHE.budget
    for chunk in _chunks(live, updates):
        computed = _chunk_singular_values([updates[i] for i in chunk], device, progress, keep)
        for i, values in zip(chunk, computed, strict=True):
            results[i] = values
    return results  # type: ignore[return-value]


# the K × K intermediates (Grams, R factors, cores) of this many elements at most are alive at once: an 8B-shaped
# LoRA (K = 16) is one chunk; VeRA's K = 256 takes 8 layers at a time, BoRA's K = 128 32 (measured at the 8B
# shape, against 1 << 22: peak RSS over torch's VeRA 414 → 315 MB, BoRA 199 → 169 MB, the same time)
SPECTRUM_CHUNK_ELEMENTS = 1 << 20


def _chunks(live: list[int], updates: Sequence[FactoredUpdate]) -> list[list[int]]:
    """``live`` in consecutive runs whose updates' 2·K² elements sum to at most SPECTRUM_CHUNK_ELEMENTS."""
    chunks: list[list[int]] = [[]]
    size = 0
    for i in live:
        cost = 2 * updates[i].inner_dim ** 2
        if chunks[-1] and size + cost > SPECTRUM_CHUNK_ELEMENTS:
            chunks.append([])
            size = 0
        chunks[-1].append(i)
        size += cost
    return [chunk for chunk in chunks if chunk]


def _chunk_singular_values(
    updates: Sequence[FactoredUpdate], device: torch.device | str, progress: Progress | None, keep: bool
) -> list[torch.Tensor]:
    """σ of each update (rank_bound > 0): R factors of every side, then the cores batched by shape."""
    results: list[torch.Tensor | None] = [None] * len(updates)
    r_left, r_right, _, _ = update_r_factors(updates, device, keep=keep)
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, update in enumerate(updates):
        groups[_core_key(update, r_left[i], r_right[i])].append(i)
    for positions in groups.values():
        chosen = [updates[i] for i in positions]
        cores = _cores(chosen, [r_left[i] for i in positions], [r_right[i] for i in positions], device)
        values = _batched_svdvals(cores).cpu()
        for row, i in enumerate(positions):
            results[i] = values[row]
        if progress:
            progress(len(positions))
    return results  # type: ignore[return-value]


__all__ = [
    "FACTOR_CACHE",
    "cholesky_qr_limit",
    "factored_cores",
    "factored_singular_values",
    "joined_r_factors",
    "r_factors",
    "update_r_factors",
]
