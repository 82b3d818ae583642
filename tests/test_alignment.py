"""Alignment functions against scipy's principal angles and dense float64 computations done here."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from rankscope.core.spectrum import singular_vectors
from rankscope.core.update import DenseUpdate, FactoredUpdate, KroneckerUpdate
from rankscope.measures import alignment
from rankscope.measures.components import pairwise_alignment


def orthonormal(rows: int, cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(rows, cols, generator=g, dtype=torch.float64)).Q


def dense(update) -> torch.Tensor:
    """ΔW formed here from the fields, independently of rankscope's materialise."""
    if isinstance(update, KroneckerUpdate):
        return update.scale * torch.kron(dense(update.first), dense(update.second))
    if isinstance(update, DenseUpdate):
        return update.build(torch.float64, "cpu")
    scale = torch.as_tensor(update.scale, dtype=torch.float64)
    left = update.left.double() * (scale if scale.ndim == 0 else scale[None, :])
    if update.core is not None:
        left = left @ update.core.double()
    return left @ update.right.double()


def test_principal_angles_match_scipy():
    a, b = orthonormal(30, 5, 1), orthonormal(30, 3, 2)
    ours = alignment.principal_angles(a, b).numpy()
    theirs = np.sort(scipy.linalg.subspace_angles(a.numpy(), b.numpy()))
    assert ours == pytest.approx(theirs, abs=1e-10)


def test_projection_overlap_extremes_and_baseline():
    basis = orthonormal(40, 8, 3)
    assert alignment.projection_overlap(basis, basis) == pytest.approx(1.0)
    assert alignment.projection_overlap(basis[:, :3], basis) == pytest.approx(1.0)  # nested
    assert alignment.projection_overlap(basis[:, :4], basis[:, 4:]) == pytest.approx(0.0, abs=1e-12)
    # random 4-dimensional subspaces of R^64 overlap k/m = 1/16 on average
    samples = [alignment.projection_overlap(orthonormal(64, 4, s), orthonormal(64, 4, 1000 + s)) for s in range(400)]
    assert np.mean(samples) == pytest.approx(4 / 64, rel=0.1)
    assert alignment.overlap_baseline(4, 4, 64) == 4 / 64


def test_phi_grid_entries():
    a, b = orthonormal(20, 6, 4), orthonormal(20, 4, 5)
    grid = alignment.subspace_similarity(a, b)
    assert grid.shape == (6, 4)
    for i, j in [(1, 1), (3, 2), (6, 4), (2, 4)]:
        expected = np.linalg.norm(a[:, :i].numpy().T @ b[:, :j].numpy()) ** 2 / min(i, j)
        assert grid[i - 1, j - 1].item() == pytest.approx(expected)
    assert grid[3, 3].item() == pytest.approx(alignment.projection_overlap(a[:, :4], b))


def factored(seed: int, m=24, n=18, k=3, core=False, vector_scale=False) -> FactoredUpdate:
    g = torch.Generator().manual_seed(seed)
    return FactoredUpdate(
        torch.randn(m, k, generator=g),
        torch.randn(k, n, generator=g),
        core=torch.randn(k, k, generator=g) if core else None,
        scale=torch.rand(k, generator=g) + 0.5 if vector_scale else 0.7,
    )


@pytest.mark.parametrize("kinds", [(False, False), (True, False), (False, True), (True, True)])
def test_inner_product_from_factors(kinds):
    a = factored(1, core=kinds[0], vector_scale=kinds[1])
    b = factored(2, k=5, core=kinds[1], vector_scale=kinds[0])
    assert alignment.inner_product(a, b) == pytest.approx(float((dense(a) * dense(b)).sum()), rel=1e-10)
    cos = float((dense(a) * dense(b)).sum() / (dense(a).norm() * dense(b).norm()))
    assert alignment.update_cosine(a, b) == pytest.approx(cos, rel=1e-10)
    assert alignment.update_cosine(a, a) == pytest.approx(1.0)


def test_kronecker_inner_product_and_zero_cosine():
    k1 = KroneckerUpdate(factored(1, 4, 3, 2), factored(2, 5, 6, 2), scale=1.5)
    k2 = KroneckerUpdate(factored(3, 4, 3, 2), factored(4, 5, 6, 1), scale=-0.5)
    assert alignment.inner_product(k1, k2) == pytest.approx(float((dense(k1) * dense(k2)).sum()), rel=1e-10)
    zero = FactoredUpdate(torch.zeros(24, 2), torch.randn(2, 18))
    assert alignment.update_cosine(zero, factored(1)) is None


@pytest.mark.parametrize(
    "update",
    [
        factored(7, core=True, vector_scale=True),
        factored(8, m=5, n=40, k=9),
        KroneckerUpdate(factored(1, 4, 3, 2), factored(2, 5, 6, 2), scale=-2.0),
        DenseUpdate(shape=(6, 9), build=lambda dtype, device: torch.arange(54.0, dtype=dtype).reshape(6, 9).sin()),
    ],
)
def test_singular_vectors_reconstruct_the_update(update):
    u, sigma, v = singular_vectors(update)
    expected = dense(update)
    assert torch.allclose(u @ torch.diag(sigma) @ v.T, expected, atol=1e-10 * expected.norm().item())
    eye = torch.eye(u.shape[1], dtype=torch.float64)
    assert torch.allclose(u.T @ u, eye, atol=1e-10) and torch.allclose(v.T @ v, eye, atol=1e-10)
    assert torch.allclose(sigma, torch.linalg.svdvals(expected)[: len(sigma)], rtol=1e-10, atol=1e-12)


def test_pairwise_alignment_known_cases():
    m, n, r = 32, 24, 3
    left, right = orthonormal(m, 2 * r, 11), orthonormal(n, 2 * r, 12)
    first = FactoredUpdate(left[:, :r], right[:, :r].T)
    orthogonal = FactoredUpdate(left[:, r:], right[:, r:].T)
    result = pairwise_alignment([first, orthogonal, first])
    assert result["cosine"][0][1] == pytest.approx(0.0, abs=1e-12)
    assert result["cosine"][0][2] == pytest.approx(1.0)
    assert result["left_overlap"][0][1] == pytest.approx(0.0, abs=1e-12)
    assert result["right_overlap"][0][2] == pytest.approx(1.0)
    assert result["left_min_angle"][0][1] == pytest.approx(90.0)
    assert result["left_mean_angle"][0][2] == pytest.approx(0.0, abs=1e-5)
    assert result["left_baseline"][0][1] == pytest.approx(r / m) and result["right_baseline"][0][1] == r / n
    zero = FactoredUpdate(torch.zeros(m, r), right[:, :r].T)
    with_zero = pairwise_alignment([first, zero])
    assert with_zero["cosine"][0][1] is None and with_zero["left_overlap"][0][1] is None
    assert not any(isinstance(v, float) and math.isnan(v) for row in with_zero["cosine"] for v in row if v is not None)


def _dense_update(matrix: torch.Tensor, built: list | None = None) -> DenseUpdate:
    def build(dtype, device):
        if built is not None:
            built.append(1)
        return matrix.to(dtype)

    return DenseUpdate(shape=tuple(matrix.shape), build=build)


def _low_rank(m: int, n: int, rank: int, seed: int) -> torch.Tensor:
    """An m×n matrix of exactly ``rank`` with singular values 1 … 0.5 (an unambiguous numerical rank)."""
    sigma = torch.linspace(1.0, 0.5, rank, dtype=torch.float64)
    return orthonormal(m, rank, seed) @ torch.diag(sigma) @ orthonormal(n, rank, seed + 50).T


@pytest.mark.parametrize("batch_numbers", [None, 1])
def test_pairwise_alignment_of_dense_and_kronecker_updates_against_scipy(batch_numbers, monkeypatch):
    """The singular-vector path (dense, Kronecker, a zero update): every pair's principal angles against scipy's
    subspace_angles of the dense float64 SVD's top-k bases, overlaps and cosines against dense float64 here; in
    one batched svdvals per k, or one pair per batch (``batch_numbers`` 1) — the same numbers."""
    from rankscope.measures import components

    if batch_numbers is not None:
        monkeypatch.setattr(components, "_BATCH_NUMBERS", batch_numbers)
    m, n = 12, 20
    shared = _low_rank(m, n, 3, 1)
    built = []
    updates = [
        _dense_update(shared, built),
        _dense_update(_low_rank(m, n, 5, 2), built),
        _dense_update(0.5 * shared + 0.1 * _low_rank(m, n, 2, 3), built),
        KroneckerUpdate(
            FactoredUpdate(
                orthonormal(3, 2, 4) * torch.tensor([1.0, 0.6], dtype=torch.float64), orthonormal(4, 2, 5).T
            ),
            _dense_update(_low_rank(4, 5, 2, 6)),
        ),
        _dense_update(torch.zeros(m, n, dtype=torch.float64), built),
    ]
    result = pairwise_alignment(updates)
    # each dense update formed once for its singular vectors and once for all of its inner products
    assert len(built) == 2 * 4
    matrices = [dense(u) for u in updates]
    svds = [np.linalg.svd(w.numpy()) for w in matrices]
    ranks = [int((s > 1e-9).sum()) for _, s, _ in svds]
    for i in range(len(updates)):
        for j in range(len(updates)):
            a, b = matrices[i], matrices[j]
            norm = float(a.norm() * b.norm())
            want = None if norm == 0 else float((a * b).sum()) / norm
            got = result["cosine"][i][j]
            assert (got is None) if want is None else got == pytest.approx(want, rel=1e-9, abs=1e-12)
            k = min(ranks[i], ranks[j])
            if k == 0:
                assert result["left_overlap"][i][j] is None and result["right_min_angle"][i][j] is None
                continue
            for side, (basis_i, basis_j) in (
                ("left", (svds[i][0], svds[j][0])),
                ("right", (svds[i][2].T, svds[j][2].T)),
            ):
                x, y = basis_i[:, :k], basis_j[:, :k]
                angles = np.degrees(scipy.linalg.subspace_angles(x, y))
                assert result[f"{side}_min_angle"][i][j] == pytest.approx(angles.min(), abs=1e-5)
                assert result[f"{side}_mean_angle"][i][j] == pytest.approx(angles.mean(), abs=1e-5)
                assert result[f"{side}_overlap"][i][j] == pytest.approx(float(np.sum((x.T @ y) ** 2)) / k, abs=1e-9)
                assert result[f"{side}_baseline"][i][j] == pytest.approx(k / x.shape[0])
