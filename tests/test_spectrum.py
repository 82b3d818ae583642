"""The factored and dense paths against a float64 SVD of the matrix the test materialises itself."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rankscope.core import dense, triangular
from rankscope.core.dense import dense_singular_values
from rankscope.core.factored import cholesky_qr_limit, factored_singular_values, r_factors
from rankscope.core.spectrum import singular_values
from rankscope.core.threads import single_threaded, thread_budget
from rankscope.core.triangular import CHOLESKY_QR_TOLERANCE
from rankscope.core.update import DenseUpdate, FactoredUpdate


def conditioned(rows: int, cols: int, condition: float, generator: torch.Generator) -> torch.Tensor:
    """A random rows×cols matrix whose singular values span ``condition`` (log-spaced)."""
    k = min(rows, cols)
    u, _ = torch.linalg.qr(torch.randn(rows, k, generator=generator, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, k, generator=generator, dtype=torch.float64))
    s = torch.logspace(0, -torch.log10(torch.tensor(condition)).item(), k, dtype=torch.float64)
    return u @ torch.diag(s) @ v.T


def reference(left, right, core=None, scale=1.0) -> torch.Tensor:
    """σ of L·diag(scale)·C·R, materialised here in float64 with plain matmuls."""
    scale = torch.as_tensor(scale, dtype=torch.float64)
    product = left.double() * (scale if scale.ndim == 0 else scale[None, :])
    if core is not None:
        product = product @ core.double()
    return torch.linalg.svdvals(product @ right.double())


def assert_spectrum_matches(sigma: torch.Tensor, expected: torch.Tensor, rank_bound: int) -> None:
    assert sigma.shape == (rank_bound,)
    assert torch.all(sigma[:-1] >= sigma[1:]), "not descending"
    top = expected[0].item()
    head = expected[:rank_bound]
    if top == 0:
        assert torch.all(sigma == 0)
        return
    # exact to 1e-6 relative for σ_i ≥ 1e-6·σ₁; every value to 1e-10·σ₁ absolute (the dense SVD's own floor)
    significant = head >= 1e-6 * top
    rel = (sigma[significant] - head[significant]).abs() / head[significant]
    assert rel.max().item() <= 1e-6, rel.max().item()
    assert (sigma - head).abs().max().item() <= 1e-10 * top
    assert torch.all(expected[rank_bound:] <= 1e-10 * top), "reference has more rank than the bound"


@settings(max_examples=60, deadline=None)
@given(
    m=st.integers(1, 40),
    n=st.integers(1, 40),
    k=st.integers(1, 12),
    log_condition=st.floats(0, 8),
    scale=st.floats(1e-3, 1e3),
    seed=st.integers(0, 2**16),
)
def test_factored_matches_dense_float64(m, n, k, log_condition, scale, seed):
    g = torch.Generator().manual_seed(seed)
    left = conditioned(m, k, 10**log_condition, g)
    right = conditioned(k, n, 10 ** (log_condition / 2), g)
    (sigma,) = factored_singular_values([FactoredUpdate(left, right, scale=scale)])
    assert_spectrum_matches(sigma, reference(left, right, scale=scale), min(m, n, k))


@settings(max_examples=30, deadline=None)
@given(m=st.integers(2, 30), n=st.integers(2, 30), k=st.integers(1, 10), seed=st.integers(0, 2**16))
def test_core_and_vector_scale(m, n, k, seed):
    g = torch.Generator().manual_seed(seed)
    left = torch.randn(m, k, generator=g, dtype=torch.float64)
    right = torch.randn(k, n, generator=g, dtype=torch.float64)
    core = torch.randn(k, k, generator=g, dtype=torch.float64)
    scale = torch.rand(k, generator=g, dtype=torch.float64) + 0.1
    (sigma,) = factored_singular_values([FactoredUpdate(left, right, core=core, scale=scale)])
    assert_spectrum_matches(sigma, reference(left, right, core, scale), min(m, n, k))


def test_batches_of_mixed_shapes_keep_their_order():
    g = torch.Generator().manual_seed(1)
    shapes = [(24, 16, 4), (16, 24, 4), (24, 16, 4), (8, 8, 8), (24, 16, 4), (30, 5, 6)]
    updates = [
        FactoredUpdate(torch.randn(m, k, generator=g), torch.randn(k, n, generator=g), scale=0.5 + i)
        for i, (m, n, k) in enumerate(shapes)
    ]
    results = factored_singular_values(updates, memory_budget=4096)  # forces several chunks per group
    for update, sigma in zip(updates, results, strict=True):
        assert_spectrum_matches(sigma, reference(update.left, update.right, scale=update.scale), update.rank_bound)


def test_low_precision_factors_are_upcast_before_the_algebra():
    g = torch.Generator().manual_seed(2)
    left = torch.randn(64, 8, generator=g).to(torch.bfloat16)
    right = torch.randn(8, 48, generator=g).to(torch.float16)
    (sigma,) = factored_singular_values([FactoredUpdate(left, right, scale=2.0)])
    assert sigma.dtype == torch.float64
    assert_spectrum_matches(sigma, reference(left, right, scale=2.0), 8)


def test_zero_update_gives_zero_spectrum():
    (sigma,) = factored_singular_values([FactoredUpdate(torch.zeros(10, 4), torch.randn(4, 12), scale=2.0)])
    assert sigma.tolist() == [0.0] * 4


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_dense_path(dtype):
    g = torch.Generator().manual_seed(3)
    updates = [
        FactoredUpdate(torch.randn(20, 3, generator=g), torch.randn(3, 15, generator=g), scale=1.5) for _ in range(3)
    ]
    results = dense_singular_values(updates, dtype=dtype, memory_budget=1)
    for update, sigma in zip(updates, results, strict=True):
        expected = reference(update.left, update.right, scale=1.5)
        assert sigma.shape == (15,)
        tolerance = 1e-12 if dtype == torch.float64 else 1e-5
        assert torch.allclose(sigma, expected, rtol=0, atol=tolerance * expected[0].item())


def test_dense_updates_and_exactness_labels():
    g = torch.Generator().manual_seed(4)
    matrix = torch.randn(12, 9, generator=g, dtype=torch.float64)
    dense = DenseUpdate(shape=(12, 9), build=lambda dtype, device: matrix.to(device=device, dtype=dtype))
    factored = FactoredUpdate(torch.randn(12, 2, generator=g), torch.randn(2, 9, generator=g))
    values, exact = singular_values([dense, factored], device="cpu")
    assert exact == [True, True]
    assert torch.allclose(values[0], torch.linalg.svdvals(matrix), rtol=1e-12)
    _, exact32 = singular_values([dense, factored], dense=True, dense_dtype="float32", device="cpu")
    assert exact32 == [False, False]


# -- CholeskyQR with its accuracy gate, and the Householder fallback --------------------------------------------
def factor_with_condition(rows: int, cols: int, condition: float, generator: torch.Generator) -> torch.Tensor:
    """A rows×cols factor (rows ≥ cols) with κ = ``condition`` and columns of very different norms, so that the
    gate is tested on the equilibrated κ it documents, not on the raw one."""
    columns = conditioned(rows, cols, condition, generator)
    return columns * torch.logspace(-2, 2, cols, dtype=torch.float64)[torch.randperm(cols, generator=generator)]


def equilibrated_condition(factor: torch.Tensor) -> float:
    columns = factor.double() / factor.double().norm(dim=0)
    sigma = torch.linalg.svdvals(columns)
    return (sigma[0] / sigma[-1]).item()


def assert_r_factor_matches(r: torch.Tensor, factor: torch.Tensor) -> None:
    """RᵀR = FᵀF ⇔ σ(R) = σ(F): checked against a float64 SVD of F itself."""
    assert_spectrum_matches(torch.linalg.svdvals(r), torch.linalg.svdvals(factor.double()), factor.shape[1])


@pytest.mark.parametrize("condition", [1.0, 10.0, 1e3, 1e5, 1e6, 1e8, 1e10])
@pytest.mark.parametrize("rows", [300, 2000])
def test_cholesky_qr_is_used_only_below_its_stated_limit(rows, condition):
    g = torch.Generator().manual_seed(int(condition) % 1000 + rows)
    factor = factor_with_condition(rows, 16, condition, g)
    (r,), (method,) = r_factors([factor])
    kappa = equilibrated_condition(factor)
    limit = cholesky_qr_limit(rows, 16)
    # the gate measures κ on the computed R; around the limit either answer is allowed
    if kappa < 0.9 * limit:
        assert method == "cholesky"
    elif kappa > 1.1 * limit:
        assert method == "householder"
    assert_r_factor_matches(r, factor)


def test_the_limit_is_the_stated_worst_case_bound():
    # ε·κ² ≤ 1e-7 with ε = K(rows + K + 1)u: κ ≈ 63 for a 14336×16 factor (Llama-3-8B's MLP), ≈ 117 for 4096×16
    u = torch.finfo(torch.float64).eps / 2
    for rows, cols in [(4096, 16), (14336, 16), (28672, 16), (100, 8)]:
        limit = cholesky_qr_limit(rows, cols)
        assert cols * (rows + cols + 1) * u * limit**2 == pytest.approx(CHOLESKY_QR_TOLERANCE)
    assert 60 < cholesky_qr_limit(14336, 16) < 65


def test_plain_cholesky_qr_would_be_inaccurate_where_the_gate_refuses_it(monkeypatch):
    """Why the gate exists: at κ = 1e7 CholeskyQR's σ are off by far more than 1e-6 (at 1e6 by about that much,
    depending on rounding); the gated path stays exact."""
    g = torch.Generator().manual_seed(11)
    left = conditioned(2000, 16, 1e7, g)
    right = conditioned(16, 500, 10.0, g)
    expected = reference(left, right, scale=0.5)
    (gated,) = factored_singular_values([FactoredUpdate(left, right, scale=0.5)])
    assert_spectrum_matches(gated, expected, 16)
    monkeypatch.setattr(triangular, "CHOLESKY_QR_TOLERANCE", 1e30)  # accept every Cholesky factor
    (ungated,) = factored_singular_values([FactoredUpdate(left, right, scale=0.5)])
    significant = expected[:16] >= 1e-6 * expected[0]
    error = ((ungated - expected[:16]).abs() / expected[:16])[significant].max().item()
    assert error > 1e-6, error


@settings(max_examples=80, deadline=None)
@given(
    m=st.integers(1, 400),
    n=st.integers(1, 400),
    k=st.integers(1, 20),
    log_condition_left=st.floats(0, 8),
    log_condition_right=st.floats(0, 8),
    bf16=st.booleans(),
    vector_scale=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_factored_matches_dense_float64_under_hard_conditioning(
    m, n, k, log_condition_left, log_condition_right, bf16, vector_scale, seed
):
    """Both factors up to κ = 1e8, K > m or K > n included, bf16 storage, per-column scales over 4 decades."""
    g = torch.Generator().manual_seed(seed)
    left = conditioned(m, k, 10**log_condition_left, g)
    right = conditioned(k, n, 10**log_condition_right, g)
    if bf16:
        left, right = left.to(torch.bfloat16), right.to(torch.bfloat16)
    scale = torch.logspace(-2, 2, k, dtype=torch.float64)[torch.randperm(k, generator=g)] if vector_scale else 0.25
    (sigma,) = factored_singular_values([FactoredUpdate(left, right, scale=scale)])
    assert_spectrum_matches(sigma, reference(left, right, scale=scale), min(m, n, k))


@pytest.mark.parametrize(("m", "n", "k"), [(6, 40, 12), (40, 5, 9), (3, 4, 16), (16, 16, 16)])
def test_inner_dimension_at_or_above_the_matrix_size(m, n, k):
    g = torch.Generator().manual_seed(m * 100 + n)
    left = torch.randn(m, k, generator=g).to(torch.bfloat16)
    right = torch.randn(k, n, generator=g).to(torch.bfloat16)
    core = torch.randn(k, k, generator=g, dtype=torch.float64)
    (sigma,) = factored_singular_values([FactoredUpdate(left, right, core=core, scale=1.5)])
    assert_spectrum_matches(sigma, reference(left, right, core, 1.5), min(m, n, k))


def test_rank_deficient_and_zero_factors():
    g = torch.Generator().manual_seed(12)
    deficient = torch.randn(50, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 8, generator=g).double()
    with_zero_column = torch.randn(50, 8, generator=g, dtype=torch.float64)
    with_zero_column[:, 4] = 0
    zero = torch.zeros(50, 8)
    rs, methods = r_factors([deficient, with_zero_column, zero])
    assert methods == ["householder", "householder", "cholesky"]
    assert torch.equal(rs[2], torch.zeros(8, 8, dtype=torch.float64))
    for r, factor in zip(rs, [deficient, with_zero_column, zero], strict=True):
        assert_r_factor_matches(r, factor)
    right = torch.randn(8, 30, generator=g)
    for left in (deficient, with_zero_column):
        (sigma,) = factored_singular_values([FactoredUpdate(left, right)])
        assert_spectrum_matches(sigma, reference(left, right), 8)


def test_a_non_finite_factor_gives_nan_values_not_an_exception():
    g = torch.Generator().manual_seed(13)
    left = torch.randn(20, 4, generator=g)
    left[3, 1] = float("inf")
    good = FactoredUpdate(torch.randn(20, 4, generator=g), torch.randn(4, 10, generator=g))
    bad_sigma, good_sigma = factored_singular_values([FactoredUpdate(left, torch.randn(4, 10, generator=g)), good])
    assert torch.isnan(bad_sigma).all()
    assert_spectrum_matches(good_sigma, reference(good.left, good.right), 4)


def test_factors_stored_transposed_or_strided_read_the_same():
    g = torch.Generator().manual_seed(14)
    left = torch.randn(64, 6, generator=g).to(torch.bfloat16)
    right = torch.randn(6, 80, generator=g).to(torch.bfloat16)
    layouts = [
        FactoredUpdate(left, right),
        FactoredUpdate(left.mT.contiguous().mT, right.mT.contiguous().mT),  # column-major
        FactoredUpdate(torch.stack([left, left], dim=2).reshape(64, 12)[:, ::2], right),  # strided, neither layout
    ]
    expected = reference(left, right)
    for sigma in factored_singular_values(layouts):
        assert_spectrum_matches(sigma, expected, 6)


# -- threads: the factor work in parallel gives what it gives on one thread --------------------------------------
def test_parallel_factor_work_matches_the_serial_work_exactly(monkeypatch):
    g = torch.Generator().manual_seed(15)
    shapes = [(300, 200, 8), (200, 300, 8), (120, 50, 4), (300, 200, 8), (64, 64, 16), (10, 400, 12), (500, 90, 24)]
    updates = [
        FactoredUpdate(torch.randn(m, k, generator=g).to(torch.bfloat16), torch.randn(k, n, generator=g), scale=0.3)
        for m, n, k in shapes
    ]
    before = torch.get_num_threads()
    monkeypatch.setattr(triangular, "PARALLEL_MIN_ELEMENTS", 0)
    try:
        torch.set_num_threads(2)
        serial = factored_singular_values(updates)  # outside single_threaded: the calling thread, torch's threads
        assert thread_budget() == 1 and torch.get_num_threads() == 2
        with single_threaded():
            assert torch.get_num_threads() == 1 and thread_budget() == 2  # two Python threads, one torch thread each
            parallel = factored_singular_values(updates)
            with single_threaded():  # nested: no change
                assert torch.get_num_threads() == 1 and thread_budget() == 2
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2 and thread_budget() == 1
    finally:
        torch.set_num_threads(before)
    for update, sigma, same in zip(updates, parallel, serial, strict=True):
        assert_spectrum_matches(sigma, reference(update.left, update.right, scale=0.3), update.rank_bound)
        assert torch.equal(sigma, same)


@pytest.mark.parametrize("budget", [1 << 30, 1])  # two at once on two threads / one at a time
def test_large_dense_matrices_one_at_a_time_match_and_keep_their_order(monkeypatch, budget):
    g = torch.Generator().manual_seed(16)
    updates = [
        FactoredUpdate(torch.randn(30, 3, generator=g), torch.randn(3, 20, generator=g), scale=1.0 + i)
        for i in range(5)
    ]
    broken = FactoredUpdate(torch.full((30, 3), float("inf")), torch.randn(3, 20, generator=g))
    monkeypatch.setattr(dense, "DENSE_BATCH_MAX_ELEMENTS", 0)  # 30×20 counts as large here
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with single_threaded():
            results = dense_singular_values([*updates, broken], memory_budget=budget)
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        serial = dense_singular_values([*updates, broken], memory_budget=budget)  # outside: one at a time
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    for got, same in zip(results[:-1], serial[:-1], strict=True):
        assert torch.allclose(got, same, rtol=0, atol=1e-13 * same[0].item())
    for update, sigma in zip(updates, results[:-1], strict=True):
        expected = reference(update.left, update.right, scale=update.scale)
        assert sigma.shape == (20,)
        assert torch.allclose(sigma, expected, rtol=0, atol=1e-12 * expected[0].item())
    assert torch.isnan(results[-1]).all()
