"""The top k singular triplets of a dense float64 matrix without a full SVD: from its smaller Gram.

For M (m×n, s = min(m, n)) the Gram G = M·Mᵀ (m ≤ n) or MᵀM (m > n) is s×s, its eigenvalues λ_i = σ_i² and its
eigenvectors M's left (right) singular vectors. One GEMM (2·m·n·s flops, BLAS-3) and a symmetric
eigensolver that stops at the top k (``scipy.linalg.eigh(subset_by_index=…)``, LAPACK ``dsyevr``: a
tridiagonalisation and k eigenvectors) cost a fraction of one ``svdvals`` of M, while a full SVD with vectors
costs several. The other side's vectors are Mᵀu_i / σ_i (M·v_i / σ_i).

Accuracy (why it is enough, and when it is not). The computed Gram is G + E with ‖E‖₂ ≲ η = ε·max(m, n)·σ₁²
(rounding in the product; ``eigh`` is backward stable and adds ε·s·σ₁²), so by Davis–Kahan a top-k eigenvector
block is within sin θ ≤ η / (λ_k − λ_{k+1}) of the true one, and a single eigenvector u_i within
η / min(λ_{i−1} − λ_i, λ_i − λ_{i+1}). A backward-stable SVD of M itself is within ε·max(m, n)·σ₁ / gap_σ, and
λ-gaps are σ-gaps times (σ_i + σ_{i+1}): the Gram's bound is the SVD's times σ₁ / (σ_i + σ_{i+1}). So where the
top k are not much smaller than σ₁ the Gram route is as accurate as the dense SVD, a near-degenerate pair
included (both resolve it equally badly: a subspace measure only needs the span when the gap at k is open, a
per-vector one is then ill-posed for either). Where σ_k ≪ σ₁ and the gap is small, squaring loses digits the SVD
keeps: :func:`top_singular_triplets` then takes the dense SVD (``method == "svd"``), as it does where σ_k is at
the Gram's rounding floor.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .threads import all_threads, import_limited

EPS = float(torch.finfo(torch.float64).eps)
# accept the Gram's vectors where its error bound is this small outright, …
GRAM_TOLERANCE = 1e-10
# … or where it is at most this many times the dense SVD's own bound (σ₁ ≤ RATIO · (σ_k + σ_{k+1}))
GRAM_RATIO = 10.0


@dataclass(frozen=True)
class TopTriplets:
    """U_k (m×k), σ_k (k), V_k (n×k), float64 on the CPU; ``method`` "gram" or "svd" (the dense fallback)."""

    left: torch.Tensor
    sigma: torch.Tensor
    right: torch.Tensor
    method: str


def gram_error_bound(lam: np.ndarray, k: int, shape: tuple[int, int], *, per_vector: bool) -> float:
    """η / gap for the top ``k`` of descending eigenvalues ``lam`` (at least k of them; λ_{k+1} = lam[k] where
    given, else 0): of the k-block (``per_vector`` False) or the worst single vector (True); inf where a gap is 0."""
    eta = EPS * max(shape) * float(lam[0])
    below = float(lam[k]) if len(lam) > k else 0.0
    padded = np.concatenate(([np.inf], lam[:k], [below]))
    if per_vector:
        gaps = np.minimum(padded[:-2] - padded[1:-1], padded[1:-1] - padded[2:])
        gap = float(gaps.min())
    else:
        gap = float(lam[k - 1]) - below
    return eta / gap if gap > 0 else float("inf")


def gram_acceptable(lam: np.ndarray, k: int, shape: tuple[int, int], *, per_vector: bool) -> bool:
    """Whether the Gram's top-k vectors are as good as the dense SVD's (module docstring): the error bound below
    :data:`GRAM_TOLERANCE`, or σ₁ ≤ :data:`GRAM_RATIO`·(σ_k + σ_{k+1}) with σ_k² well above the rounding level."""
    if k == 0 or float(lam[0]) <= 0:
        return False
    eta = EPS * max(shape) * float(lam[0])
    if float(lam[k - 1]) <= 1e3 * eta:  # σ_k² at the Gram's rounding floor: not even σ_k is known
        return False
    if gram_error_bound(lam, k, shape, per_vector=per_vector) <= GRAM_TOLERANCE:
        return True
    sigma = np.sqrt(np.maximum(lam[: k + 1], 0.0))
    below = float(sigma[k]) if len(sigma) > k else 0.0
    return float(sigma[0]) <= GRAM_RATIO * (float(sigma[k - 1]) + below)


LARGE_GRAM = 256  # a Gram this wide or wider takes the BLAS pools' threads for its eigh (all_threads)


def gram_top_eigen(
    matrix: torch.Tensor, count: int, *, full: bool | None = None
) -> tuple[np.ndarray, np.ndarray, bool]:
    """(λ descending, their eigenvectors as columns, left) of the smaller Gram of ``matrix``: M·Mᵀ (left = True,
    eigenvectors are left singular vectors) or MᵀM; the top ``count`` only. ``full``: torch's full ``eigh``
    (the default on a GPU) instead of scipy's, which stops at the top ``count`` (the default on the CPU)."""
    eigh = import_limited("scipy.linalg").eigh  # its OpenBLAS at one thread inside single_threaded too

    m, n = matrix.shape
    left = m <= n
    with all_threads(matrix.numel()):
        gram = matrix @ matrix.mT if left else matrix.mT @ matrix
    s = gram.shape[0]
    count = min(count, s)
    if full or (full is None and gram.device.type != "cpu"):  # on a GPU the full s×s eigh is the fast one
        lam_all, vectors_all = torch.linalg.eigh(gram)
        lam_top, vectors_top = lam_all[s - count :].flip(0), vectors_all[:, s - count :].flip(1)
        return lam_top.cpu().numpy(), vectors_top.cpu().numpy(), left
    with all_threads(s * s, blas=s >= LARGE_GRAM):
        lam, vectors = eigh(gram.numpy(), subset_by_index=[s - count, s - 1], overwrite_a=True, check_finite=False)
    return lam[::-1].copy(), vectors[:, ::-1].copy(), left


def top_singular_triplets(
    matrix: torch.Tensor,
    k: int,
    *,
    per_vector: bool = False,
    spectrum: torch.Tensor | None = None,
    exact: bool = False,
) -> TopTriplets:
    """The top ``k`` singular triplets of a float64 ``matrix`` from its Gram where that is as accurate as the
    dense SVD (``per_vector``: each vector on its own, as the intruder test uses them; else the k-block's span,
    as the amplification factor does), else from ``torch.linalg.svd``. ``spectrum``: the matrix's exact σ where
    known already (the gaps are then taken from it, not from the Gram's λ). ``exact``: the dense SVD outright."""
    m, n = matrix.shape
    k = min(k, m, n)
    if k == 0:
        empty = matrix.new_zeros
        return TopTriplets(empty((m, 0)).cpu(), empty((0,)).cpu(), empty((n, 0)).cpu(), "gram")
    if not exact:
        lam, vectors, left = gram_top_eigen(matrix, k + 1)
        known = spectrum.double().cpu().numpy() ** 2 if spectrum is not None else lam
        exact = not gram_acceptable(known, k, (m, n), per_vector=per_vector)
    if not exact:
        sigma = torch.from_numpy(np.sqrt(lam[:k]))
        side = torch.from_numpy(vectors[:, :k]).to(matrix.device)
        with all_threads(matrix.numel()):
            other = (matrix.mT @ side if left else matrix @ side) / sigma.to(matrix.device)
        # normalise the derived side: its columns are unit to within the Gram's error, this makes them exactly so
        other = other / torch.linalg.vector_norm(other, dim=0)
        u, v = (side, other) if left else (other, side)
        return TopTriplets(u.cpu(), sigma, v.cpu(), "gram")
    with all_threads(matrix.numel()):
        u, sigma, vh = torch.linalg.svd(matrix, full_matrices=False)
    return TopTriplets(u[:, :k].cpu(), sigma[:k].cpu(), vh[:k].mT.cpu(), "svd")


__all__ = ["TopTriplets", "gram_acceptable", "gram_error_bound", "gram_top_eigen", "top_singular_triplets"]
