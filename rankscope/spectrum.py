"""Exact singular values of updates, batched by shape.

Factored path: for ΔW = L·C·R (L m×K, R K×n) take thin QR factors L = Q_L·R_L and Rᵀ = Q_R·R_R; then
ΔW = Q_L·(R_L·C·R_Rᵀ)·Q_Rᵀ and the nonzero singular values of ΔW are those of the small core
R_L·C·R_Rᵀ. Cost O((m+n)K² + K³) instead of O(mn·min(m, n)). All of it in float64.

Dense path: materialise ΔW (batched by shape within a memory budget) and ``torch.linalg.svdvals``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence

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


def _group_key(update: FactoredUpdate) -> tuple:
    vector_scale = isinstance(update.scale, torch.Tensor)
    return (*update.shape, update.inner_dim, update.core is not None, vector_scale)


def _chunks(indices: list[int], per_item_bytes: int, budget: int) -> list[list[int]]:
    size = max(1, budget // max(per_item_bytes, 1))
    return [indices[i : i + size] for i in range(0, len(indices), size)]


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


def factored_cores(updates: Sequence[FactoredUpdate], device: torch.device | str = "cpu") -> torch.Tensor:
    """The stacked float64 cores R_L·diag(scale)·C·R_Rᵀ of same-shaped updates (B × min(m,K) × min(n,K))."""
    left = torch.stack([upcast(u.left, device=device) for u in updates])
    right_t = torch.stack([upcast(u.right, device=device).mT for u in updates])
    first = updates[0]
    if isinstance(first.scale, torch.Tensor):
        scales = torch.stack([upcast(u.scale.reshape(-1), device=device) for u in updates])
        left = left * scales[:, None, :]
    else:
        left = left * torch.tensor([float(u.scale) for u in updates], dtype=torch.float64, device=device)[:, None, None]
    r_left = torch.linalg.qr(left, mode="r").R
    r_right = torch.linalg.qr(right_t, mode="r").R
    if first.core is not None:
        r_left = r_left @ torch.stack([upcast(u.core, device=device) for u in updates])
    return r_left @ r_right.mT


def factored_singular_values(
    updates: Sequence[FactoredUpdate],
    *,
    device: torch.device | str = "cpu",
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    progress: Progress | None = None,
) -> list[torch.Tensor]:
    """Exact singular values (descending, float64, ``rank_bound`` of them) of each factored update."""
    results: list[torch.Tensor | None] = [None] * len(updates)
    groups: dict[tuple, list[int]] = defaultdict(list)
    for index, update in enumerate(updates):
        groups[_group_key(update)].append(index)
    for (m, n, inner, _, _), indices in groups.items():
        if inner == 0 or m == 0 or n == 0:
            for i in indices:
                results[i] = torch.zeros(0, dtype=torch.float64)
            continue
        for chunk in _chunks(indices, 8 * (m + n + inner) * inner * 3, memory_budget):
            cores = factored_cores([updates[i] for i in chunk], device=device)
            values = svdvals_or_nan(cores).cpu()
            for row, i in enumerate(chunk):
                results[i] = values[row]
            if progress:
                progress(len(chunk))
    return results  # type: ignore[return-value]


def dense_singular_values(
    updates: Sequence[Update],
    *,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    progress: Progress | None = None,
) -> list[torch.Tensor]:
    """Singular values (descending, all min(m, n) of them) of each update, materialised in batches."""
    results: list[torch.Tensor | None] = [None] * len(updates)
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for index, update in enumerate(updates):
        groups[update.shape].append(index)
    itemsize = torch.finfo(dtype).bits // 8
    for (m, n), indices in groups.items():
        # svdvals needs about twice the matrix in workspace
        for chunk in _chunks(indices, 3 * itemsize * m * n, memory_budget):
            batch = torch.stack([updates[i].materialize(dtype, device) for i in chunk])
            values = svdvals_or_nan(batch).to("cpu", torch.float64)
            for row, i in enumerate(chunk):
                results[i] = values[row]
            if progress:
                progress(len(chunk))
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
    computed = factored_singular_values([updates[i] for i in factored], memory_budget=memory_budget, progress=progress)
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
    "resolve_device",
    "singular_values",
    "singular_vectors",
]
