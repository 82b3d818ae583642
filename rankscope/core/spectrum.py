"""Exact singular values (and vectors) of updates, batched by shape: the one entry point for spectra.

Factored updates take the exact QR-core path (``core.factored``), Kronecker updates the product of their factors'
spectra, dense updates (and every update under ``dense=True``) a dense SVD (``core.dense``). None of it changes a
thread setting; ``core.threads`` is the policy a caller opts into.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .dense import DEFAULT_MEMORY_BUDGET, Progress, dense_singular_values, resolve_device
from .errors import RankscopeError
from .factored import factored_singular_values
from .update import DiagonalUpdate, FactoredUpdate, KroneckerUpdate, Update, upcast

DENSE_DTYPES = {"float64": torch.float64, "float32": torch.float32}


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

    Factored updates take the exact QR-core path (on the CPU: the cores are tiny), Kronecker updates the
    product of their factors' spectra and diagonal ones their sorted |values|, unless ``dense`` is set; dense
    updates, and all updates under ``dense``, are materialised and decomposed on ``device``.
    Exact means factored, or dense in float64; dense float32 is labelled approximate.
    """
    if dense_dtype not in DENSE_DTYPES:
        raise RankscopeError(
            f"dense_dtype {dense_dtype!r} is not one of {', '.join(DENSE_DTYPES)}", argument="dense_dtype"
        )
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
    diagonal = [i for i, u in enumerate(updates) if isinstance(u, DiagonalUpdate) and not dense]
    for i in diagonal:  # σ(diag(v)) = |v|, sorted: no SVD
        values[i] = torch.sort(upcast(updates[i].values.reshape(-1)).abs(), descending=True).values
    if progress and diagonal:
        progress(len(diagonal))
    handled = set(factored) | set(kronecker) | set(diagonal)
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
        # torch.kron views its inputs: it refuses the sliced bases the factored branch returns, and a one-column
        # basis (a 2×1 LoKr factor) whose stride .contiguous() leaves as it is (size-1 dimensions count as
        # contiguous whatever their stride): a copy with standard strides
        u_f, s_f, v_f = (x.clone(memory_format=torch.contiguous_format) for x in singular_vectors(update.first))
        u_g, s_g, v_g = (x.clone(memory_format=torch.contiguous_format) for x in singular_vectors(update.second))
        order = torch.argsort(torch.outer(s_f, s_g).reshape(-1), descending=True)[:k]
        sigma = torch.outer(s_f, s_g).reshape(-1)[order] * abs(update.scale)
        sign = -1.0 if update.scale < 0 else 1.0
        return torch.kron(u_f, u_g)[:, order] * sign, sigma, torch.kron(v_f, v_g)[:, order]
    u, sigma, vh = torch.linalg.svd(update.materialize(), full_matrices=False)
    return u[:, :k], sigma[:k], vh.mT[:, :k]


__all__ = ["DENSE_DTYPES", "singular_values", "singular_vectors"]
