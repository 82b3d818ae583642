"""The dense path: materialise ΔW and ``torch.linalg.svdvals``, grouped by shape within a memory budget: small
matrices in batches, large ones one at a time (several at once on threads where the thread policy and the budget
allow: ``core.threads``)."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed

import torch

from .errors import RankscopeError, UsageProblem
from .threads import all_threads, thread_budget
from .update import Update

DEFAULT_MEMORY_BUDGET = 1 << 30  # bytes of float64 work per batch
Progress = Callable[[int], None]


def resolve_device(name: str) -> torch.device:
    """``auto`` means CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RankscopeError(f"device {name!r}: CUDA is not available on this machine (use cpu)", argument="device")
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise UsageProblem(f"device {name!r} is not a device torch knows ({exc})", argument="device") from exc


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
    and decomposed by one batched call. On the CPU, large ones are decomposed one at a time: inside
    ``single_threaded``, as many at once on threads running torch single-threaded as the thread budget and the
    memory budget allow (each needs about three times its matrix), or one at a time with all of torch's threads
    where only one fits; outside it, one at a time with torch's threads as they are.
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
            with all_threads():
                for i in indices:
                    results[i] = _svdvals_one(updates[i], dtype, device)
                    if progress:
                        progress(1)
            continue
        with ThreadPoolExecutor(concurrent) as pool:
            futures = {pool.submit(_svdvals_one, updates[i], dtype, device): i for i in indices}
            try:
                for future in as_completed(futures):
                    results[futures[future]] = future.result()
                    if progress:
                        progress(1)
            except BaseException:  # an error or Ctrl-C: start none of the queued SVDs (the running ones finish)
                pool.shutdown(cancel_futures=True)
                raise
    return results  # type: ignore[return-value]


__all__ = ["DEFAULT_MEMORY_BUDGET", "dense_singular_values", "resolve_device", "svdvals_or_nan"]
