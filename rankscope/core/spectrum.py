"""Exact singular values of updates, batched by shape.

Factored path: for ΔW = L·C·R (L m×K, R K×n) take thin QR factors L = Q_L·R_L and Rᵀ = Q_R·R_R; then
ΔW = Q_L·(R_L·C·R_Rᵀ)·Q_Rᵀ and the nonzero singular values of ΔW are those of the small core
R_L·C·R_Rᵀ. Cost O((m+n)K² + K³) instead of O(mn·min(m, n)). All of it in float64. Only the R factors are
needed: they come from CholeskyQR where that is provably accurate (see ``r_factors``), else Householder QR.

Dense path: materialise ΔW and ``torch.linalg.svdvals``, grouped by shape within a memory budget: small matrices
in batches, large ones one at a time (several at once on threads where the budget allows).

Threads: see ``single_threaded_ops``.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import math
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextvars import ContextVar

import numpy
import torch

from .errors import RankscopeError
from .update import FactoredUpdate, KroneckerUpdate, Update, upcast

DENSE_DTYPES = {"float64": torch.float64, "float32": torch.float32}
DEFAULT_MEMORY_BUDGET = 1 << 30  # bytes of float64 work per batch
Progress = Callable[[int], None]


def resolve_device(name: str) -> torch.device:
    """``auto`` means CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RankscopeError(f"--device {name}: CUDA is not available on this machine (try --device cpu)")
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise RankscopeError(f"--device {name}: not a device torch knows ({exc})") from exc


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


def _stored(factor: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """The factor as laid out in memory, and whether that is its transpose (LoRA's A is stored K×n)."""
    if not factor.is_contiguous() and factor.mT.is_contiguous():
        return factor.mT, True
    return factor, False


class _Workspace:
    """One float64 buffer reused for every factor: converting in place avoids an allocation per factor (which
    glibc tends to keep, fragmented, after it is freed)."""

    def __init__(self, numel: int, device: torch.device | str) -> None:
        self.buffer = torch.empty(numel, dtype=torch.float64, device=device)

    def float64(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.dtype == torch.float64 and tensor.device == self.buffer.device:
            return tensor
        out = self.buffer[: tensor.numel()].view(tensor.shape)
        out.copy_(tensor)
        return out


# numpy's ``dot(x.T, x)`` calls BLAS ``syrk``: one triangle, half the flops of torch's general product (measured
# 1.7–2.2× faster on LoRA-shaped factors). numpy's OpenBLAS runs syrk of ≤ 16 columns on one thread but wider ones
# on its own threads, which rankscope cannot limit (and which stall on a busy machine, like torch's): wider factors
# take torch's product, which runs under rankscope's thread control.
NUMPY_GRAM_MAX_COLUMNS = 16


def _gram(factor: torch.Tensor, workspace: _Workspace) -> torch.Tensor:
    """FᵀF in float64 (K × K), upcast through the workspace, from whichever orientation F is stored in: the one
    pass over every element of the factored path."""
    stored, flipped = _stored(factor)
    x = workspace.float64(stored)
    if x.device.type == "cpu" and x.is_contiguous() and factor.shape[1] <= NUMPY_GRAM_MAX_COLUMNS:
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
        sigma = torch.linalg.svdvals(equilibrated[doubtful])
        condition[doubtful] = sigma[:, 0] / sigma[:, -1]
    accepted = usable & (info == 0) & torch.isfinite(condition) & (condition <= limits)
    r_factors = torch.where(zero[:, None, None], torch.zeros_like(equilibrated), equilibrated * safe[:, None, :])
    return r_factors, accepted | zero


# -- threads ------------------------------------------------------------------------------------------------
# Reading and the factored path are many small tensor ops. torch runs each op above ~32k elements as an OpenMP
# fork-join over all its threads; on a machine whose cores are busy with other work every join waits for a
# descheduled thread — measured here: reading an 8B-shaped LoRA took 3 s on 2 threads against 0.02 s on one.
# So rankscope runs its own work with torch single-threaded and parallelises where the work is large and
# independent — the factors — over Python threads (ATen releases the GIL), with no join per op. Dense SVDs,
# large enough to amortise the joins, get torch's threads back.
# numpy's BLAS (OpenBLAS, which the Gram's syrk uses) has its own threads: with more than one, concurrent calls of
# one routine from two Python threads run one after the other (measured: no speed-up at all); at one, they scale.
# So it is held at one thread too, through OpenBLAS's own openblas_set_num_threads, found among the loaded
# libraries (Linux; elsewhere nothing is changed and only the speed-up is lost).
_THREAD_BUDGET: ContextVar[int | None] = ContextVar("rankscope_thread_budget", default=None)
PARALLEL_MIN_ELEMENTS = 1 << 20  # below this a factor set is done on the calling thread
_OPENBLAS_NAMES = [f"{prefix}openblas_{{}}_num_threads{suffix}" for prefix in ("", "scipy_") for suffix in ("", "64_")]


@functools.cache
def _openblas_thread_controls() -> tuple[tuple[Callable[[], int], Callable[[int], None]], ...]:
    """(get, set) thread-count functions of each OpenBLAS loaded in this process (numpy's, scipy's …)."""
    try:
        with open("/proc/self/maps", encoding="utf-8") as maps:
            paths = sorted({line.split()[-1] for line in maps if "openblas" in line.lower() and "/" in line})
    except OSError:
        return ()
    controls = []
    for path in paths:
        try:
            library = ctypes.CDLL(path)
        except OSError:
            continue
        for name in _OPENBLAS_NAMES:
            get, set_ = getattr(library, name.format("get"), None), getattr(library, name.format("set"), None)
            if get is not None and set_ is not None:
                get.restype, set_.argtypes, set_.restype = ctypes.c_int, [ctypes.c_int], None
                controls.append((get, set_))
                break
    return tuple(controls)


def thread_budget() -> int:
    """Threads rankscope's own loops may use: torch's thread count when ``single_threaded_ops`` was entered."""
    budget = _THREAD_BUDGET.get()
    return budget if budget is not None else torch.get_num_threads()


@contextlib.contextmanager
def single_threaded_ops() -> Iterator[None]:
    """torch's intra-op threads, and numpy's OpenBLAS threads, at 1 for the duration, restored after (nested uses
    are no-ops).

    It changes process-wide settings: torch and numpy work in other threads meanwhile runs single-threaded too.
    """
    if _THREAD_BUDGET.get() is not None:
        yield
        return
    before = torch.get_num_threads()
    token = _THREAD_BUDGET.set(before)
    torch.set_num_threads(1)
    blas = [(get(), set_) for get, set_ in _openblas_thread_controls()]
    for _, set_ in blas:
        set_(1)
    try:
        yield
    finally:
        for count, set_ in blas:
            set_(count)
        torch.set_num_threads(before)
        _THREAD_BUDGET.reset(token)


@contextlib.contextmanager
def _all_threads() -> Iterator[None]:
    """Inside ``single_threaded_ops``: torch's threads back, for ops big enough to use them (dense SVDs)."""
    budget = _THREAD_BUDGET.get()
    if budget is None or budget == torch.get_num_threads():
        yield
        return
    torch.set_num_threads(budget)
    try:
        yield
    finally:
        torch.set_num_threads(1)


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
    """``function(factor, workspace)`` for every factor, on as many threads as torch would use (CPU, large sets)."""
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
        with single_threaded_ops(), ThreadPoolExecutor(len(others)) as pool:
            futures = [pool.submit(run, part) for part in others]
            pairs = run(first)  # the calling thread takes a share too
            for future in futures:
                pairs += future.result()
    results: list[torch.Tensor | None] = [None] * len(factors)
    for i, value in pairs:
        results[i] = value
    return results  # type: ignore[return-value]


def r_factors(
    factors: Sequence[torch.Tensor], *, device: torch.device | str = "cpu"
) -> tuple[list[torch.Tensor], list[str]]:
    """For each factor F (rows × K, any float dtype, either memory layout) a float64 R with RᵀR = FᵀF up to the
    error bound above — K × K, or min(rows, K) × K — and the method that produced it ("cholesky", "householder",
    "empty").

    Factors are streamed one at a time through a reused float64 buffer per thread (one upcast per element, no
    copy of the whole set); the K × K work is batched.
    """
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
    by_width: dict[int, list[int]] = defaultdict(list)
    for position, i in enumerate(tall):
        by_width[factors[i].shape[1]].append(position)
    for positions in by_width.values():
        stacked = torch.stack([grams[p] for p in positions])
        cholesky, accepted = _cholesky_r(stacked, [factors[tall[p]].shape[0] for p in positions])
        for row, (p, ok) in enumerate(zip(positions, accepted.tolist(), strict=True)):
            if ok:
                results[tall[p]], methods[tall[p]] = cholesky[row], "cholesky"
            else:
                householder.append(tall[p])
    computed = _map_factors(_householder_r, [factors[i] for i in householder], device)
    for i, r in zip(householder, computed, strict=True):
        results[i] = r
    return results, methods  # type: ignore[return-value]


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
    if updates[0].core is not None:
        left = left @ torch.stack([upcast(u.core, device=device) for u in updates])
    return left @ torch.stack(list(r_right)).mT


def _core_key(update: FactoredUpdate, r_left: torch.Tensor, r_right: torch.Tensor) -> tuple:
    return (tuple(r_left.shape), tuple(r_right.shape), update.core is not None)


def factored_cores(updates: Sequence[FactoredUpdate], device: torch.device | str = "cpu") -> torch.Tensor:
    """The stacked float64 cores R_L·diag(scale)·C·R_Rᵀ of same-shaped updates (B × min(m,K) × min(n,K))."""
    r_left, _ = r_factors([u.left for u in updates], device=device)
    r_right, _ = r_factors([u.right.mT for u in updates], device=device)
    return _cores(updates, r_left, r_right, device)


def factored_singular_values(
    updates: Sequence[FactoredUpdate],
    *,
    device: torch.device | str = "cpu",
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    progress: Progress | None = None,
) -> list[torch.Tensor]:
    """Exact singular values (descending, float64, ``rank_bound`` of them) of each factored update.

    The factors stream through one float64 buffer of the largest factor's size (``memory_budget`` bounds only
    the dense path); the K×K cores are batched by shape.
    """
    results: list[torch.Tensor | None] = [None] * len(updates)
    live = [i for i, u in enumerate(updates) if u.rank_bound > 0]
    for i, update in enumerate(updates):
        if update.rank_bound == 0:
            results[i] = torch.zeros(0, dtype=torch.float64)
    both, _ = r_factors([updates[i].left for i in live] + [updates[i].right.mT for i in live], device=device)
    r_left, r_right = both[: len(live)], both[len(live) :]
    groups: dict[tuple, list[int]] = defaultdict(list)
    for position, i in enumerate(live):
        groups[_core_key(updates[i], r_left[position], r_right[position])].append(position)
    for positions in groups.values():
        chosen = [updates[live[p]] for p in positions]
        cores = _cores(chosen, [r_left[p] for p in positions], [r_right[p] for p in positions], device)
        values = svdvals_or_nan(cores).cpu()
        for row, p in enumerate(positions):
            results[live[p]] = values[row]
        if progress:
            progress(len(positions))
    return results  # type: ignore[return-value]


def svdvals_or_nan(batch: torch.Tensor) -> torch.Tensor:
    """Batched singular values; NaN rows where a matrix is not finite (α/r or factors that overflow), so one
    broken layer is reported invalid instead of failing the whole batch."""
    finite = torch.isfinite(batch).flatten(1).all(1)
    if bool(finite.all()):
        return torch.linalg.svdvals(batch)
    values = torch.full((batch.shape[0], min(batch.shape[-2:])), float("nan"), dtype=batch.dtype, device=batch.device)
    if bool(finite.any()):
        values[finite] = torch.linalg.svdvals(batch[finite])
    return values


def _chunks(indices: list[int], per_item_bytes: int, budget: int) -> list[list[int]]:
    size = max(1, budget // max(per_item_bytes, 1))
    return [indices[i : i + size] for i in range(0, len(indices), size)]


# Matrices at least this big are decomposed one at a time: torch's batched CPU svdvals was measured 4× slower
# than the 2-D call on one 4096×4096 matrix (a batch of one); smaller ones gain from batching.
DENSE_BATCH_MAX_ELEMENTS = 256 * 256


def _svdvals_one(update: Update, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """All singular values of one materialised update (NaN where it is not finite), float64 on the CPU."""
    matrix = update.materialize(dtype, device)
    if not bool(torch.isfinite(matrix).all()):
        return torch.full((min(matrix.shape),), math.nan, dtype=torch.float64)
    return torch.linalg.svdvals(matrix).to("cpu", torch.float64)


def dense_singular_values(
    updates: Sequence[Update],
    *,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    progress: Progress | None = None,
) -> list[torch.Tensor]:
    """Singular values (descending, all min(m, n) of them) of each update, materialised within ``memory_budget``.

    Grouped by shape. Small matrices, and every matrix on a GPU, are stacked into batches of at most the budget
    and decomposed by one batched call. On the CPU, large ones are decomposed one at a time: as many at once, on
    threads running torch single-threaded, as the thread budget and the memory budget allow (each needs about
    three times its matrix), or one at a time with all of torch's threads where only one fits.
    """
    results: list[torch.Tensor | None] = [None] * len(updates)
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for index, update in enumerate(updates):
        groups[update.shape].append(index)
    itemsize = torch.finfo(dtype).bits // 8
    on_cpu = torch.device(device).type == "cpu"
    for (m, n), indices in groups.items():
        per_item = 3 * itemsize * m * n  # the matrix and svdvals' workspace (about twice the matrix)
        if not on_cpu or m * n <= DENSE_BATCH_MAX_ELEMENTS:
            for chunk in _chunks(indices, per_item, memory_budget):
                batch = torch.stack([updates[i].materialize(dtype, device) for i in chunk])
                values = svdvals_or_nan(batch).to("cpu", torch.float64)
                for row, i in enumerate(chunk):
                    results[i] = values[row]
                if progress:
                    progress(len(chunk))
            continue
        concurrent = max(1, min(thread_budget(), memory_budget // per_item, len(indices)))
        if concurrent == 1:
            with _all_threads():
                for i in indices:
                    results[i] = _svdvals_one(updates[i], dtype, device)
                    if progress:
                        progress(1)
            continue
        with single_threaded_ops(), ThreadPoolExecutor(concurrent) as pool:
            futures = {pool.submit(_svdvals_one, updates[i], dtype, device): i for i in indices}
            for future in as_completed(futures):
                results[futures[future]] = future.result()
                if progress:
                    progress(1)
    return results  # type: ignore[return-value]


def _kronecker_singular_values(updates: Sequence[KroneckerUpdate], **kwargs) -> tuple[list[torch.Tensor], list[bool]]:
    """σ(scale·(F ⊗ G)) = scale·{σ_i(F)·σ_j(G)}: the factors' spectra, multiplied out and sorted."""
    parts = [part for u in updates for part in (u.first, u.second)]
    values, exact = singular_values(parts, **kwargs)
    results = []
    for i, update in enumerate(updates):
        products = torch.outer(values[2 * i], values[2 * i + 1]).reshape(-1) * abs(update.scale)
        results.append(torch.sort(products, descending=True).values[: update.rank_bound])
    return results, [exact[2 * i] and exact[2 * i + 1] for i in range(len(updates))]


def singular_values(
    updates: Sequence[Update],
    *,
    dense: bool = False,
    dense_dtype: str = "float64",
    device: str = "auto",
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    progress: Progress | None = None,
) -> tuple[list[torch.Tensor], list[bool]]:
    """Singular values of every update and, per update, whether they are exact.

    Factored updates take the exact QR-core path (on the CPU: the cores are tiny) and Kronecker updates the
    product of their factors' spectra, unless ``dense`` is set; dense updates, and all updates under
    ``dense``, are materialised and decomposed on ``device``.
    Exact means factored, or dense in float64; dense float32 is labelled approximate.
    """
    if dense_dtype not in DENSE_DTYPES:
        raise RankscopeError(f"dense dtype {dense_dtype!r} is not one of {', '.join(DENSE_DTYPES)}")
    values: list[torch.Tensor | None] = [None] * len(updates)
    exact = [True] * len(updates)
    factored = [i for i, u in enumerate(updates) if isinstance(u, FactoredUpdate) and not dense]
    kronecker = [i for i, u in enumerate(updates) if isinstance(u, KroneckerUpdate) and not dense]
    with single_threaded_ops():
        computed = factored_singular_values(
            [updates[i] for i in factored], memory_budget=memory_budget, progress=progress
        )
        for i, sigma in zip(factored, computed, strict=True):
            values[i] = sigma
        if kronecker:
            kron_values, kron_exact = _kronecker_singular_values(
                [updates[i] for i in kronecker],
                dense_dtype=dense_dtype,
                device=device,
                memory_budget=memory_budget,
            )
            for i, sigma, is_exact in zip(kronecker, kron_values, kron_exact, strict=True):
                values[i], exact[i] = sigma, is_exact
            if progress:
                progress(len(kronecker))
    handled = set(factored) | set(kronecker)
    dense_ids = [i for i in range(len(updates)) if i not in handled]
    if dense_ids:
        dtype = DENSE_DTYPES[dense_dtype]
        computed = dense_singular_values(
            [updates[i] for i in dense_ids],
            dtype=dtype,
            device=resolve_device(device),
            memory_budget=memory_budget,
            progress=progress,
        )
        for i, sigma in zip(dense_ids, computed, strict=True):
            values[i] = sigma
            exact[i] = dtype == torch.float64
    return values, exact  # type: ignore[return-value]


def singular_vectors(update: Update) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U, σ, V) of an update, float64, ``rank_bound`` columns: ΔW ≈ U·diag(σ)·Vᵀ, exact for factored ones.

    Factored: U = Q_L·U_core and V = Q_R·V_core from the core's SVD; Kronecker: U = U_F ⊗ U_G, V = V_F ⊗ V_G
    ordered by σ_F·σ_G; dense: a float64 SVD of the materialised matrix.
    """
    k = update.rank_bound
    if isinstance(update, FactoredUpdate):
        q_left, r_left = torch.linalg.qr(update.scaled_left())
        q_right, r_right = torch.linalg.qr(upcast(update.right).mT)
        if update.core is not None:
            r_left = r_left @ upcast(update.core)
        u_core, sigma, vh_core = torch.linalg.svd(r_left @ r_right.mT, full_matrices=False)
        return (q_left @ u_core)[:, :k], sigma[:k], (q_right @ vh_core.mT)[:, :k]
    if isinstance(update, KroneckerUpdate):
        u_f, s_f, v_f = singular_vectors(update.first)
        u_g, s_g, v_g = singular_vectors(update.second)
        order = torch.argsort(torch.outer(s_f, s_g).reshape(-1), descending=True)[:k]
        sigma = torch.outer(s_f, s_g).reshape(-1)[order] * abs(update.scale)
        sign = -1.0 if update.scale < 0 else 1.0
        return torch.kron(u_f, u_g)[:, order] * sign, sigma, torch.kron(v_f, v_g)[:, order]
    u, sigma, vh = torch.linalg.svd(update.materialize(), full_matrices=False)
    return u[:, :k], sigma[:k], vh.mT[:, :k]


__all__ = [
    "DENSE_DTYPES",
    "dense_singular_values",
    "factored_cores",
    "factored_singular_values",
    "r_factors",
    "resolve_device",
    "single_threaded_ops",
    "singular_values",
    "singular_vectors",
    "thread_budget",
]
