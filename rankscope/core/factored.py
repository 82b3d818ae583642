"""The exact factored path: singular values of ΔW = L·C·R from the R factors of L and Rᵀ.

For ΔW = L·C·R (L m×K, R K×n) take thin QR factors L = Q_L·R_L and Rᵀ = Q_R·R_R; then
ΔW = Q_L·(R_L·C·R_Rᵀ)·Q_Rᵀ and the nonzero singular values of ΔW are those of the small core
R_L·C·R_Rᵀ. Cost O((m+n)K² + K³) instead of O(mn·min(m, n)). All of it in float64. Only the R factors are
needed: they come from CholeskyQR where that is provably accurate (see ``r_factors``), else Householder QR.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Sequence

import numpy
import torch

from .dense import DEFAULT_MEMORY_BUDGET, Progress, svdvals_or_nan
from .factor_cache import FACTOR_CACHE
from .factor_sides import Side, derivations, sides_of
from .formed import FormedFactor
from .threads import inside_single_threaded, thread_budget, worker_pool
from .update import BlockDiagonalUpdate, FactoredUpdate, upcast

# -- triangular factors of tall-skinny factors ---------------------------------------------------------------
# Every factor F (rows × K, K ≤ rows) needs only an R with RᵀR = FᵀF: then F = Q·R for an orthonormal Q, and the
# core built from the R factors has the singular values of ΔW. CholeskyQR (R = chol(FᵀF)) takes one BLAS-3 pass
# over F, about half the work of Householder QR, but it loses accuracy as κ(F)² does; so each R is checked:
#
#   with D = diag(‖f_j‖) and ε(rows, K) = K·(rows + K + 1)·u (u = 2⁻⁵³), the computed Gram and its Cholesky factor
#   satisfy R̂ᵀR̂ = FᵀF + E with ‖D⁻¹ E D⁻¹‖₂ ≤ ε (Higham, Accuracy and Stability, thms 3.5 and 10.3: γ_rows for
#   the dot products, γ_{K+1} for Cholesky). Hence R̂ = O·(I + H)·R with O orthogonal, H symmetric and
#   ‖H‖ ≤ ε·κ²/2, κ = κ(F·D⁻¹) the condition number of the column-equilibrated factor: a multiplicative
#   perturbation, so every singular value of the core — the small ones included — moves by at most ε·κ²/2
#   relative per factor (Eisenstat & Ipsen 1995).
#
# R̂ is accepted when ε·κ̂² ≤ CHOLESKY_QR_TOLERANCE, κ̂ measured on R̂·D⁻¹ itself (an upper bound first, an SVD
# of the K×K matrix where the bound is not enough); otherwise, and wherever the Cholesky factorisation does not
# complete, the factor takes Householder QR, which is backward stable for any κ. The threshold is a worst-case
# bound (typical rounding is √rows smaller): κ ≲ 63 for a 14336×16 factor, 117 for 4096×16. Random and
# freshly trained A factors sit near κ = 1; a trained B may not, and pays for Householder QR (about twice the
# Gram's cost). CholeskyQR2 (a second pass over F) would reach κ ≈ 10⁷, at about Householder's cost here.
UNIT_ROUNDOFF = torch.finfo(torch.float64).eps / 2
CHOLESKY_QR_TOLERANCE = 1e-7


def cholesky_qr_limit(rows: int, cols: int) -> float:
    """The largest κ(F·D⁻¹) at which CholeskyQR's R of a rows×cols factor F is accepted: √(tolerance / ε)."""
    return math.sqrt(CHOLESKY_QR_TOLERANCE / (cols * (rows + cols + 1) * UNIT_ROUNDOFF))


def _stored(factor: torch.Tensor | FormedFactor) -> tuple[torch.Tensor | FormedFactor, bool]:
    """The factor as laid out in memory, and whether that is its transpose (LoRA's A is stored K×n); a recipe is
    formed row-major."""
    if isinstance(factor, FormedFactor):
        return factor, False
    if not factor.is_contiguous() and factor.mT.is_contiguous():
        return factor.mT, True
    return factor, False


class _Workspace:
    """One float64 buffer reused for every factor: converting in place avoids an allocation per factor (which
    glibc tends to keep, fragmented, after it is freed)."""

    def __init__(self, numel: int, device: torch.device | str) -> None:
        self.buffer = torch.empty(numel, dtype=torch.float64, device=device)

    def float64(self, tensor: torch.Tensor | FormedFactor) -> torch.Tensor:
        if isinstance(tensor, FormedFactor):
            return tensor.form(self.buffer[: tensor.numel()].view(tensor.shape))
        if tensor.dtype == torch.float64 and tensor.device == self.buffer.device:
            return tensor
        out = self.buffer[: tensor.numel()].view(tensor.shape)
        out.copy_(tensor)
        return out


# numpy's ``dot(x.T, x)`` calls BLAS ``syrk``: one triangle, half the flops of torch's general product (measured
# 1.7–2.2× faster on LoRA-shaped factors). numpy's OpenBLAS runs syrk of ≤ 16 columns on one thread but wider ones
# on its own threads, which stall on a busy machine like torch's and serialise concurrent calls: wider factors
# take torch's product — except very wide ones while the BLAS pools are at one thread (``single_threaded``), where
# syrk's half of the flops wins again (measured, one thread: 4096 × 256 15.7 against 24.2 ms, 14336 × 256 55 against
# 92 ms; at 64–128 columns the two are even; VeRA's r = 256).
NUMPY_GRAM_MAX_COLUMNS = 16
NUMPY_GRAM_MIN_COLUMNS_SINGLE_THREADED = 192


def _gram(factor: torch.Tensor, workspace: _Workspace) -> torch.Tensor:
    """FᵀF in float64 (K × K), upcast through the workspace, from whichever orientation F is stored in: the one
    pass over every element of the factored path."""
    stored, flipped = _stored(factor)
    x = workspace.float64(stored)
    columns = factor.shape[1]
    wide = columns >= NUMPY_GRAM_MIN_COLUMNS_SINGLE_THREADED and inside_single_threaded()
    if x.device.type == "cpu" and x.is_contiguous() and (columns <= NUMPY_GRAM_MAX_COLUMNS or wide):
        array = x.numpy()
        return torch.from_numpy(numpy.dot(array, array.T) if flipped else numpy.dot(array.T, array))
    return x @ x.mT if flipped else x.mT @ x


def _householder_r(factor: torch.Tensor, workspace: _Workspace) -> torch.Tensor:
    """R (min(rows, K) × K) of a Householder QR of F, in float64."""
    stored, flipped = _stored(factor)
    x = workspace.float64(stored)
    return torch.linalg.qr(x.mT if flipped else x, mode="r").R


def _cholesky_r(grams: torch.Tensor, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched CholeskyQR R factors of N Gram matrices (N × K × K), and which ones are accurate enough.

    A zero factor has R = 0 exactly (accepted); a factor with a zero column, a non-finite Gram, a Cholesky that
    does not complete or ε·κ̂² above the tolerance is refused (its R must come from Householder QR).
    """
    k = grams.shape[-1]
    norms = torch.diagonal(grams, dim1=-2, dim2=-1).sqrt()
    zero = (norms == 0).all(dim=-1)
    usable = (norms > 0).all(dim=-1) & torch.isfinite(grams).flatten(1).all(dim=-1)
    safe = torch.where(usable[:, None], norms, torch.ones_like(norms))
    scaled = grams / (safe[:, :, None] * safe[:, None, :])
    scaled = torch.where(usable[:, None, None], scaled, torch.eye(k, dtype=grams.dtype, device=grams.device))
    lower, info = torch.linalg.cholesky_ex(scaled)
    equilibrated = lower.mT
    limits = torch.tensor([cholesky_qr_limit(r, k) for r in rows], dtype=grams.dtype, device=grams.device)
    # κ ≤ ‖R‖_F·‖R⁻¹‖_F (at most K times too big) settles most factors for one triangular inverse; the exact κ —
    # an SVD of R — only where that bound exceeds the limit
    identity = torch.eye(k, dtype=grams.dtype, device=grams.device).expand_as(equilibrated)
    inverse = torch.linalg.solve_triangular(equilibrated, identity, upper=True)
    condition = torch.linalg.matrix_norm(equilibrated) * torch.linalg.matrix_norm(inverse)
    doubtful = usable & (info == 0) & ~(condition <= limits)
    if bool(doubtful.any()):
        settled = doubtful.nonzero().squeeze(1)
        settled = settled[_shifted_cholesky_test(scaled[settled], limits[settled])]
        condition[settled], doubtful[settled] = limits[settled], False  # κ ≤ the limit, proven
    if bool(doubtful.any()):
        sigma = torch.linalg.svdvals(equilibrated[doubtful])
        condition[doubtful] = sigma[:, 0] / sigma[:, -1]
    accepted = usable & (info == 0) & torch.isfinite(condition) & (condition <= limits)
    r_factors = torch.where(zero[:, None, None], torch.zeros_like(equilibrated), equilibrated * safe[:, None, :])
    return r_factors, accepted | zero


def _shifted_cholesky_test(scaled: torch.Tensor, limits: torch.Tensor) -> torch.Tensor:
    """Which of N equilibrated Grams S (N × K × K) provably have κ(S) ≤ limit², by one Cholesky each of S − t·I.

    λ_max(S) ≤ λ̄ = min(‖S‖_∞, ‖S‖_F). A Cholesky factorisation that completes in floating point is exact for a
    matrix within ‖E‖₂ ≤ δ = γ_{K+1}·K (Demmel: |E| ≤ γ_{K+1}·|L||Lᵀ|, a PSD matrix whose trace is ≤ K here, the
    diagonal of S being ≤ 1). So where the Cholesky of S − t·I completes, λ_min(S) > t − δ; and the R̂ computed
    from S (R̂ᵀR̂ = S + E', ‖E'‖₂ ≤ δ alike) has κ(R̂)² ≤ (λ̄ + δ)/(t − 2δ), below limit² for
    t = (λ̄ + δ)/limit² + 2δ. A third of an SVD's work (K³/3 flops); for wide factors (K ≳ 100, where
    ‖R‖_F·‖R⁻¹‖_F overstates κ up to K-fold) it settles the well-conditioned ones. A refusal proves nothing: the
    SVD decides those.
    """
    k = scaled.shape[-1]
    delta = (k + 1) * UNIT_ROUNDOFF / (1 - (k + 1) * UNIT_ROUNDOFF) * k
    infinity = scaled.abs().sum(dim=-1).amax(dim=-1)
    upper = torch.minimum(infinity, torch.linalg.matrix_norm(scaled))
    shift = (upper + delta) / limits**2 + 2 * delta
    identity = torch.eye(k, dtype=scaled.dtype, device=scaled.device)
    _, info = torch.linalg.cholesky_ex(scaled - shift[:, None, None] * identity)
    return info == 0


PARALLEL_MIN_ELEMENTS = 1 << 20  # below this a factor set is done on the calling thread


def _balanced(indices: list[int], sizes: list[int], parts: int) -> list[list[int]]:
    """``indices`` split into ``parts`` lists of about equal total size (largest first, onto the lightest)."""
    bins: list[list[int]] = [[] for _ in range(parts)]
    loads = [0] * parts
    for i in sorted(indices, key=lambda i: -sizes[i]):
        lightest = loads.index(min(loads))
        bins[lightest].append(i)
        loads[lightest] += sizes[i]
    return [b for b in bins if b]


def _map_factors(
    function: Callable[[torch.Tensor, _Workspace], torch.Tensor],
    factors: Sequence[torch.Tensor],
    device: torch.device | str,
) -> list[torch.Tensor]:
    """``function(factor, workspace)`` for every factor: on the CPU, for large sets, spread over the threads of
    :func:`~rankscope.core.threads.thread_budget` (inside ``single_threaded``; else on the calling thread)."""
    if not factors:
        return []
    sizes = [f.numel() for f in factors]
    on_cpu = torch.device(device).type == "cpu"
    workers = min(thread_budget(), len(factors)) if on_cpu and sum(sizes) >= PARALLEL_MIN_ELEMENTS else 1

    def run(part: list[int]) -> list[tuple[int, torch.Tensor]]:
        workspace = _Workspace(max(sizes[i] for i in part), device)
        return [(i, function(factors[i], workspace)) for i in part]

    first, *others = _balanced(list(range(len(factors))), sizes, workers)
    if not others:
        pairs = run(first)
    else:
        futures = [worker_pool().submit(run, part) for part in others]
        pairs = run(first)  # the calling thread takes a share too
        for future in futures:
            pairs += future.result()
    results: list[torch.Tensor | None] = [None] * len(factors)
    for i, value in pairs:
        results[i] = value
    return results  # type: ignore[return-value]


def _r_from_grams(grams: Sequence[torch.Tensor], rows: Sequence[int]) -> list[torch.Tensor | None]:
    """CholeskyQR's R of each Gram matrix (batched by width), None where ``_cholesky_r`` refuses it."""
    results: list[torch.Tensor | None] = [None] * len(grams)
    by_width: dict[int, list[int]] = defaultdict(list)
    for position, gram in enumerate(grams):
        by_width[gram.shape[-1]].append(position)
    for positions in by_width.values():
        cholesky, accepted = _cholesky_r(torch.stack([grams[p] for p in positions]), [rows[p] for p in positions])
        for row, (p, ok) in enumerate(zip(positions, accepted.tolist(), strict=True)):
            if ok:
                results[p] = cholesky[row]
    return results


def r_factors(
    factors: Sequence[torch.Tensor], *, device: torch.device | str = "cpu"
) -> tuple[list[torch.Tensor], list[str]]:
    """For each factor F (rows × K, any float dtype, either memory layout) a float64 R with RᵀR = FᵀF up to the
    error bound above — K × K, or min(rows, K) × K — and the method that produced it ("cholesky", "householder",
    "empty").

    Factors are streamed one at a time through a reused float64 buffer per thread (one upcast per element, no
    copy of the whole set); the K × K work is batched.
    """
    results, methods, _ = _r_factors_and_grams(factors, device)
    return results, methods


def _r_factors_and_grams(
    factors: Sequence[torch.Tensor], device: torch.device | str
) -> tuple[list[torch.Tensor], list[str], list[torch.Tensor | None]]:
    """:func:`r_factors`, and the float64 Gram FᵀF of every tall factor (None for the others)."""
    results: list[torch.Tensor | None] = [None] * len(factors)
    methods = ["householder"] * len(factors)
    tall: list[int] = []
    householder: list[int] = []
    for i, factor in enumerate(factors):
        rows, cols = factor.shape
        if rows == 0 or cols == 0:
            results[i] = torch.zeros(min(rows, cols), cols, dtype=torch.float64, device=device)
            methods[i] = "empty"
        elif rows >= cols:
            tall.append(i)
        else:
            householder.append(i)  # wide: FᵀF is singular, CholeskyQR does not apply
    grams = _map_factors(_gram, [factors[i] for i in tall], device)
    for i, r in zip(tall, _r_from_grams(grams, [factors[i].shape[0] for i in tall]), strict=True):
        if r is None:
            householder.append(i)
        else:
            results[i], methods[i] = r, "cholesky"
    computed = _map_factors(_householder_r, [factors[i] for i in householder], device)
    for i, r in zip(householder, computed, strict=True):
        results[i] = r
    all_grams: list[torch.Tensor | None] = [None] * len(factors)
    for i, gram in zip(tall, grams, strict=True):
        all_grams[i] = gram
    return results, methods, all_grams  # type: ignore[return-value]


def _block_grams(factor: torch.Tensor, blocks: int, workspace: _Workspace) -> torch.Tensor:
    """F_iᵀF_i of each of ``blocks`` row blocks of F (blocks × K × K), in float64, one upcast of F."""
    stored, flipped = _stored(factor)
    x = workspace.float64(stored)
    if flipped:  # stored Fᵀ (K × rows): the blocks are column blocks
        y = x.reshape(x.shape[0], blocks, -1).transpose(0, 1)
        return y @ y.mT
    y = x.reshape(blocks, -1, x.shape[1])
    return y.mT @ y


def _cache_key(side: Side, device) -> tuple:
    return (side.tag, side.blocks, str(device), CHOLESKY_QR_TOLERANCE)


def _side_r_factors(sides: Sequence[Side], device) -> list[tuple[torch.Tensor, str]]:
    """(R, method) of every side: whole factors through :func:`r_factors`, a composite's parts from blocks of its
    Gram, block-diagonal ones block by block (method "cholesky" only where every block took CholeskyQR); from the
    cache where it holds them."""
    results: list[tuple[torch.Tensor, str] | None] = [FACTOR_CACHE.get(s.stored, _cache_key(s, device)) for s in sides]
    missing = [i for i, side in enumerate(sides) if results[i] is None and side.blocks == 1]
    derived = derivations(sides, missing)
    whole, repeats, first_of = [], {}, {}  # a factor several updates share (VeRA's A): computed once
    for i in missing:
        if i not in derived:
            first = first_of.setdefault(sides[i].key, i) if not sides[i].parts else i
            if first == i:
                whole.append(i)
            else:
                repeats[i] = first
    split = [i for i, side in enumerate(sides) if results[i] is None and side.blocks > 1]
    computed, methods, grams = _r_factors_and_grams([sides[i].factor for i in whole], device)
    hosts = {host for host, _, _ in derived.values()}  # only a host's Gram is needed again: the others go now
    gram_of = {i: gram for i, gram in zip(whole, grams, strict=True) if i in hosts}
    del grams
    for i, r, method in zip(whole, computed, methods, strict=True):
        results[i] = (r, method)
    for i, first in repeats.items():
        results[i] = results[first]
    inside = list(derived)  # a composite's parts: CholeskyQR from a block of its Gram, under the same test
    blocks = [gram_of[host][a:b, a:b] for host, a, b in (derived[i] for i in inside)]  # type: ignore[index]
    fallback = []
    for i, r in zip(inside, _r_from_grams(blocks, [sides[i].factor.shape[0] for i in inside]), strict=True):
        if r is None:
            fallback.append(i)
        else:
            results[i] = (r, "cholesky")
    for i, r in zip(fallback, _map_factors(_householder_r, [sides[i].factor for i in fallback], device), strict=True):
        results[i] = (r, "householder")
    if split:
        blocks_of = {id(sides[i].factor): sides[i].blocks for i in split}
        grams = _map_factors(
            lambda factor, workspace: _block_grams(factor, blocks_of[id(factor)], workspace),
            [sides[i].factor for i in split],
            device,
        )
        flat = [g for gram in grams for g in gram]
        rows = [sides[i].factor.shape[0] // sides[i].blocks for i in split for _ in range(sides[i].blocks)]
        accepted = _r_from_grams(flat, rows)
        position = 0
        for i in split:
            side, parts, refused = sides[i], [], False
            for index in range(side.blocks):
                r = accepted[position]
                position += 1
                if r is None:  # this block takes Householder QR (or is wide: rows/b < K)
                    refused = True
                    (r,) = _map_factors(_householder_r, [side.block(index)], device)
                parts.append(r)
            results[i] = (torch.block_diag(*parts), "householder" if refused else "cholesky")
    for i in (*missing, *split):  # what was computed here; the cache's own entries stay as they are
        r, method = results[i]  # type: ignore[misc]
        FACTOR_CACHE.put(sides[i].stored, _cache_key(sides[i], device), r, method)
    return results  # type: ignore[return-value]


def update_r_factors(
    updates: Sequence[FactoredUpdate], device: torch.device | str = "cpu"
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[str], list[str]]:
    """R_L and R_R (R factors of ``left`` and ``right``ᵀ: block by block for a :class:`BlockDiagonalUpdate`) of
    every update, and the method of each ("cholesky": R is well conditioned, ε·κ² ≤ the tolerance)."""
    sides = [side for update in updates for side in sides_of(update)]
    both = _side_r_factors(sides, device)
    left, right = both[0::2], both[1::2]
    return [r for r, _ in left], [r for r, _ in right], [m for _, m in left], [m for _, m in right]


# -- factored updates: cores and their singular values ---------------------------------------------------------
def _scale_vector(update: FactoredUpdate, device: torch.device | str) -> torch.Tensor:
    if isinstance(update.scale, torch.Tensor):
        return upcast(update.scale.reshape(-1), device=device)
    return torch.full((update.inner_dim,), float(update.scale), dtype=torch.float64, device=device)


def _cores(
    updates: Sequence[FactoredUpdate], r_left: Sequence[torch.Tensor], r_right: Sequence[torch.Tensor], device
) -> torch.Tensor:
    """R_L·diag(scale)·C·R_Rᵀ for updates whose R factors share their shapes, stacked (B × a × b).

    The scale acts on the K×K level: L·diag(s) = Q_L·(R_L·diag(s)), so the factors themselves are never rescaled.
    """
    if any(isinstance(u.scale, torch.Tensor) for u in updates):
        scales = torch.stack([_scale_vector(u, device) for u in updates])[:, None, :]
    else:
        scales = torch.tensor([float(u.scale) for u in updates], dtype=torch.float64, device=device)[:, None, None]
    left = torch.stack(list(r_left)) * scales
    blocks = _blocks(updates[0])
    if blocks > 1 and left.shape[-1] == left.shape[-2] == r_right[0].shape[0]:
        return _block_diagonal_cores(left, torch.stack([upcast(u.core, device=device) for u in updates]),
                                     torch.stack(list(r_right)), blocks)  # fmt: skip
    if updates[0].core is not None:
        left = left @ torch.stack([upcast(u.core, device=device) for u in updates])
    return left @ torch.stack(list(r_right)).mT


def _diagonal_blocks(matrices: torch.Tensor, blocks: int) -> torch.Tensor:
    """The ``blocks`` diagonal blocks (N × b × r × r) of block-diagonal N × K × K matrices, K = b·r."""
    n, k, _ = matrices.shape
    rank = k // blocks
    return torch.diagonal(matrices.reshape(n, blocks, rank, blocks, rank), dim1=1, dim2=3).permute(0, 3, 1, 2)


def _block_diagonal_cores(left: torch.Tensor, core: torch.Tensor, right: torch.Tensor, blocks: int) -> torch.Tensor:
    """left·C·rightᵀ where left and right are block-diagonal (b blocks of r × r; BoRA's R factors): block row i of
    left·C is L_i·C_i,: and block column j of (·)·rightᵀ is (·)_:,j·R_jᵀ — b·r²·K work per product instead of K³."""
    n, k, _ = core.shape
    rank = k // blocks
    product = (_diagonal_blocks(left, blocks) @ core.reshape(n, blocks, rank, k)).reshape(n, k, k)
    columns = product.reshape(n, k, blocks, rank).permute(0, 2, 1, 3)  # N × b × K × r
    return (columns @ _diagonal_blocks(right, blocks).mT).permute(0, 2, 1, 3).reshape(n, k, k)


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
    for chunk in _chunks([i for i, u in enumerate(updates) if u.rank_bound > 0], updates):
        computed = _chunk_singular_values([updates[i] for i in chunk], device, progress)
        for i, values in zip(chunk, computed, strict=True):
            results[i] = values
    return results  # type: ignore[return-value]


# the K × K intermediates (Grams, R factors, cores) of this many elements at most are alive at once: an 8B-shaped
# LoRA (K = 16) is one chunk; VeRA's K = 256 takes 32 layers at a time, not 224 (≈ 0.7 GB of them)
SPECTRUM_CHUNK_ELEMENTS = 1 << 22


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
    updates: Sequence[FactoredUpdate], device: torch.device | str, progress: Progress | None
) -> list[torch.Tensor]:
    """σ of each update (rank_bound > 0): R factors of every side, then the cores batched by shape."""
    results: list[torch.Tensor | None] = [None] * len(updates)
    r_left, r_right, _, _ = update_r_factors(updates, device)
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
    "r_factors",
    "update_r_factors",
]
