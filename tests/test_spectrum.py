"""The factored and dense paths against a float64 SVD of the matrix the test materialises itself."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rankscope.spectrum import dense_singular_values, factored_singular_values, singular_values
from rankscope.update import DenseUpdate, FactoredUpdate


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
