"""Triangular factors of tall-skinny factors: for each factor F an R with RᵀR = FᵀF, from CholeskyQR where that is
provably accurate (the test below), else Householder QR — all in float64, each factor upcast once through a reused
workspace, large sets spread over the thread budget. ``core.factored`` builds the K × K cores from them.
"""

from __future__ import annotations

import functools
import math
from collections import defaultdict
from collections.abc import Callable, Sequence

import numpy
import torch

from .buffers import ReusedBuffers
from .formed import FaceSplit, FormedFactor, Joined
from .threads import inside_single_threaded, thread_budget, worker_pool

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
        self._scratch = ReusedBuffers()

    def scratch(self, name: str, shape: tuple[int, int]) -> torch.Tensor:
        """A float64 matrix of ``shape`` in a buffer of its own, kept (and grown) for the next factor."""
        return self._scratch.take(name, shape, self.buffer.device)

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


def _joined_gram(factor: Joined, workspace: _Workspace) -> torch.Tensor:
    """The Gram of [F_1 … F_N], each F_i upcast once into the workspace as the joined factor's part: stored
    transposed (a composition's R_i, K_i × n) its rows stacked — contiguous copies, then one product, as fast as
    a stored concatenation (measured) — else into its columns (measured at 1024–14336 rows × 3·8: within ±15 % of
    per-block products, faster on the shorter factors); parts in both layouts block by block."""
    stored = [_stored(part) for part in factor.factors]
    rows, columns = factor.shape
    if all(flipped for _, flipped in stored):
        x = workspace.buffer[: rows * columns].view(columns, rows)
        for (part, _), (a, b) in zip(stored, factor.spans, strict=True):
            x[a:b].copy_(part)
        return x @ x.mT
    if not any(flipped for _, flipped in stored):
        x = workspace.buffer[: rows * columns].view(rows, columns)
        for (part, _), (a, b) in zip(stored, factor.spans, strict=True):
            x[:, a:b].copy_(part)
        return x.mT @ x
    parts, start = [], 0
    for part, flipped in stored:
        size = part.numel()
        converted = workspace.buffer[start : start + size].view(part.shape).copy_(part)
        parts.append(converted.mT if flipped else converted)
        start += size
    gram = torch.empty(columns, columns, dtype=torch.float64, device=workspace.buffer.device)
    spans = factor.spans
    for i, (a, b) in enumerate(spans):
        for j in range(i, len(spans)):
            c, d = spans[j]
            gram[a:b, c:d] = parts[i].mT @ parts[j]
            if j > i:
                gram[c:d, a:b] = gram[a:b, c:d].mT
    return gram


def _pair_products(factor: torch.Tensor, workspace: _Workspace, slot: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(products, index): the r(r+1)/2 products p_a ∘ p_c (a ≤ c, in ``triu_indices`` order) of a rows × r
    factor's columns as the rows of an r(r+1)/2 × rows float64 matrix (each exact for a bf16/fp16/float32 factor;
    row by row, ~20× faster than gathering columns), and the r × r symmetric map {a, c} → its row."""
    stored, flipped = _stored(factor)
    r, rows, device = factor.shape[1], factor.shape[0], workspace.buffer.device
    columns = workspace.scratch("columns", (r, rows))
    columns.copy_(stored if flipped else stored.mT)
    products = workspace.scratch(slot, (r * (r + 1) // 2, rows))
    start = 0
    for a in range(r):
        torch.mul(columns[a : a + 1], columns[a:], out=products[start : start + r - a])
        start += r - a
    return products, _pair_index(r, device)


@functools.lru_cache(maxsize=64)
def _pair_index(r: int, device: torch.device) -> torch.Tensor:
    """The r × r symmetric map {a, c} → the row of p_a ∘ p_c among the ``triu_indices`` pairs (once per r)."""
    upper, lower = torch.triu_indices(r, r, device=device)
    index = torch.empty(r, r, dtype=torch.long, device=device)
    index[upper, lower] = index[lower, upper] = torch.arange(upper.numel(), device=device)
    return index


def _face_split_gram(factor: FaceSplit, workspace: _Workspace) -> torch.Tensor:
    """FᵀF of F = P ⊙ᵣ Q (row i = p_i ⊗ q_i) without forming F: entry ((a, b), (c, d)) is
    Σ_i P_ia·P_ic·Q_ib·Q_id = (WᵀZ)[{a, c}, {b, d}], W and Z the column-pair products of P and Q — a
    rows × r₁(r₁+1)/2 by rows × r₂(r₂+1)/2 product, ~3× fewer multiply-adds than F's own Gram at r₁ = r₂ = 8 (LoHa).
    Each entry is still one sum over the rows of products (the stored values' products exact in float64), so the
    CholeskyQR test's bound holds as for F's Gram."""
    w, first = _pair_products(factor.first, workspace, "first")
    z, second = _pair_products(factor.second, workspace, "second")
    pairs = w @ z.mT
    r1, r2 = factor.first.shape[1], factor.second.shape[1]
    gram = pairs[first.view(r1, 1, r1, 1), second.view(1, r2, 1, r2)]
    return gram.reshape(r1 * r2, r1 * r2)


def _gram(factor: torch.Tensor, workspace: _Workspace) -> torch.Tensor:
    """FᵀF in float64 (K × K), upcast through the workspace, from whichever orientation F is stored in: the one
    pass over every element of the factored path."""
    if isinstance(factor, Joined):
        return _joined_gram(factor, workspace)
    if isinstance(factor, FaceSplit):
        return _face_split_gram(factor, workspace)
    stored, flipped = _stored(factor)
    x = workspace.float64(stored)
    columns = factor.shape[1]
    wide = columns >= NUMPY_GRAM_MIN_COLUMNS_SINGLE_THREADED and inside_single_threaded()
    if x.device.type == "cpu" and x.is_contiguous() and (columns <= NUMPY_GRAM_MAX_COLUMNS or wide):
        array = x.numpy()
        return torch.from_numpy(numpy.dot(array, array.T) if flipped else numpy.dot(array.T, array))
    return x @ x.mT if flipped else x.mT @ x


def householder_r(factor: torch.Tensor, workspace: _Workspace) -> torch.Tensor:
    """R (min(rows, K) × K) of a Householder QR of F, in float64."""
    stored, flipped = _stored(factor)
    x = workspace.float64(stored)
    return torch.linalg.qr(x.mT if flipped else x, mode="r").R


def cholesky_r(
    grams: torch.Tensor, rows: list[int], inflation: Sequence[float] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched CholeskyQR R factors of N Gram matrices (N × K × K), and which ones are accurate enough.

    A zero factor has R = 0 exactly (accepted); a factor with a zero column, a non-finite Gram, a Cholesky that
    does not complete or ε·κ̂² above the tolerance is refused (its R must come from Householder QR).
    ``inflation``: per Gram, a factor ≥ 1 on ε (a Gram derived from another's, ``core.factor_sides``).
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
    limit_of = {r: cholesky_qr_limit(r, k) for r in set(rows)}  # BoRA: thousands of blocks, a few shapes
    limits = torch.tensor([limit_of[r] for r in rows], dtype=grams.dtype, device=grams.device)
    if inflation is not None:
        limits = limits / torch.tensor(inflation, dtype=grams.dtype, device=grams.device).sqrt()
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


def map_factors(
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


def r_from_gram_batches(
    batches: Sequence[torch.Tensor], rows: Sequence[int], inflation: Sequence[float] | None = None
) -> list[tuple[torch.Tensor, list[bool]]]:
    """CholeskyQR's R factors of batches of Gram matrices (each n_i × K_i × K_i; ``rows[i]``: the rows of every
    factor of batch i, ``inflation[i]`` its factor on ε), all batches of one width in one :func:`cholesky_r`: per
    batch, (its R factors, which of them it accepts)."""
    results: list[tuple[torch.Tensor, list[bool]] | None] = [None] * len(batches)
    by_width: dict[int, list[int]] = defaultdict(list)
    for position, batch in enumerate(batches):
        by_width[batch.shape[-1]].append(position)
    for positions in by_width.values():
        counts = [batches[p].shape[0] for p in positions]
        factor_rows = [rows[p] for p, count in zip(positions, counts, strict=True) for _ in range(count)]
        inflated = None if inflation is None else [inflation[p] for p, n in zip(positions, counts, strict=True)
                                                   for _ in range(n)]  # fmt: skip
        cholesky, accepted = cholesky_r(torch.cat([batches[p] for p in positions]), factor_rows, inflated)
        taken, start = accepted.tolist(), 0
        for p, count in zip(positions, counts, strict=True):
            results[p] = (cholesky[start : start + count], taken[start : start + count])
            start += count
    return results  # type: ignore[return-value]


def r_from_grams(
    grams: Sequence[torch.Tensor], rows: Sequence[int], inflation: Sequence[float] | None = None
) -> list[torch.Tensor | None]:
    """CholeskyQR's R of each Gram matrix (batched by width), None where ``cholesky_r`` refuses it."""
    batches = r_from_gram_batches([gram[None] for gram in grams], rows, inflation)
    return [r[0] if ok[0] else None for r, ok in batches]


def r_factors(
    factors: Sequence[torch.Tensor], *, device: torch.device | str = "cpu"
) -> tuple[list[torch.Tensor], list[str]]:
    """For each factor F (rows × K, any float dtype, either memory layout) a float64 R with RᵀR = FᵀF up to the
    error bound above — K × K, or min(rows, K) × K — and the method that produced it ("cholesky", "householder",
    "empty").

    Factors are streamed one at a time through a reused float64 buffer per thread (one upcast per element, no
    copy of the whole set); the K × K work is batched.
    """
    results, methods, _ = r_factors_and_grams(factors, device)
    return results, methods


def r_factors_and_grams(
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
    grams = map_factors(_gram, [factors[i] for i in tall], device)
    for i, r in zip(tall, r_from_grams(grams, [factors[i].shape[0] for i in tall]), strict=True):
        if r is None:
            householder.append(i)
        else:
            results[i], methods[i] = r, "cholesky"
    computed = map_factors(householder_r, [factors[i] for i in householder], device)
    for i, r in zip(householder, computed, strict=True):
        results[i] = r
    all_grams: list[torch.Tensor | None] = [None] * len(factors)
    for i, gram in zip(tall, grams, strict=True):
        all_grams[i] = gram
    return results, methods, all_grams  # type: ignore[return-value]


def block_grams(factor: torch.Tensor, blocks: int, workspace: _Workspace) -> torch.Tensor:
    """F_iᵀF_i of each of ``blocks`` row blocks of F (blocks × K × K), in float64, one upcast of F."""
    stored, flipped = _stored(factor)
    x = workspace.float64(stored)
    if flipped:  # stored Fᵀ (K × rows): the blocks are column blocks
        y = x.reshape(x.shape[0], blocks, -1).transpose(0, 1)
        return y @ y.mT
    y = x.reshape(blocks, -1, x.shape[1])
    return y.mT @ y


__all__ = ["CHOLESKY_QR_TOLERANCE", "UNIT_ROUNDOFF", "cholesky_qr_limit", "r_factors"]
