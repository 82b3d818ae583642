"""Factors kept as recipes (core.formed: VeRA's λ_b·B, LoHa's face-splitting products), the CholeskyQR
acceptance by a shifted Cholesky, and the chunked factored spectrum — each against a dense float64 SVD of ΔW
formed here from the stored tensors, or against matrices whose condition number is known by construction."""

from __future__ import annotations

import math

import pytest
import torch

import rankscope.core.factored as factored
import rankscope.core.triangular as triangular
from rankscope.core.factored import cholesky_qr_limit, factored_singular_values, update_r_factors
from rankscope.core.formed import FaceSplit, FormedUpdate, Joined, RowScaled, Summed
from rankscope.core.threads import thread_policy, worker_pool


def _relative_error(ours: torch.Tensor, dense: torch.Tensor) -> float:
    n = min(len(ours), len(dense))
    keep = dense[:n] > 1e-9 * dense[0]
    return float(((ours[:n] - dense[:n]).abs() / dense[:n])[keep].max())


def _vera(out: int, width: int, r: int, generator: torch.Generator, dtype=torch.bfloat16):
    b = torch.randn(out + 7, r, generator=generator).to(dtype)  # the shared B is taller than any layer
    a = torch.randn(r, width + 5, generator=generator).to(dtype)
    lambda_b = torch.randn(out, generator=generator).to(dtype)
    lambda_d = torch.randn(r, generator=generator).to(dtype)
    update = FormedUpdate(RowScaled(b[:out], lambda_b), a[:, :width].mT, core=torch.diag(lambda_d))
    dense = torch.diag(lambda_b.double()) @ b[:out].double() @ torch.diag(lambda_d.double()) @ a[:, :width].double()
    return update, dense


def test_row_scaled_and_face_split_form_exact_products() -> None:
    g = torch.Generator().manual_seed(0)
    factor, scale = torch.randn(50, 6, generator=g).to(torch.bfloat16), torch.randn(50, generator=g)
    formed = RowScaled(factor, scale).dense()
    assert formed.dtype == torch.float64
    assert torch.equal(formed, scale.double()[:, None] * factor.double())  # float32·bf16 products: exact in float64
    p1, p2 = torch.randn(40, 3, generator=g), torch.randn(40, 5, generator=g).half()
    split = FaceSplit(p1, p2).dense()
    assert split.shape == (40, 15)
    for i in (0, 17, 39):
        assert torch.equal(split[i], torch.kron(p1[i].double(), p2[i].double()))


@pytest.mark.parametrize("threads", [None, 1])
def test_vera_shaped_updates_match_a_dense_svd(threads) -> None:
    """r = 256 factors: wide Grams (numpy's syrk inside single_threaded), the shifted-Cholesky acceptance."""
    g = torch.Generator().manual_seed(1)
    cases = [_vera(out, width, 256, g) for out, width in ((700, 300), (300, 700), (512, 512))]
    with thread_policy(threads):
        values = factored_singular_values([u for u, _ in cases])
    for sigma, (update, dense) in zip(values, cases, strict=True):
        assert len(sigma) == update.rank_bound == 256
        assert _relative_error(sigma, torch.linalg.svdvals(dense)) < 1e-10
        assert torch.allclose(update.materialize(), dense, rtol=0, atol=1e-12 * float(dense.abs().max()))


def test_loha_shaped_update_matches_a_dense_svd() -> None:
    g = torch.Generator().manual_seed(2)
    p1, p2 = torch.randn(90, 4, generator=g), torch.randn(90, 3, generator=g)
    q1, q2 = torch.randn(4, 60, generator=g), torch.randn(3, 60, generator=g)
    update = FormedUpdate(FaceSplit(p1, p2), FaceSplit(q1.mT, q2.mT), scale=0.5)
    dense = 0.5 * ((p1.double() @ q1.double()) * (p2.double() @ q2.double()))
    (sigma,) = factored_singular_values([update])
    assert _relative_error(sigma, torch.linalg.svdvals(dense)) < 1e-10
    assert torch.allclose(update.materialize(), dense, rtol=0, atol=1e-12)
    assert update.unscaled().scale == 1.0 and update.unscaled().left_factor is update.left_factor


def test_summed_heads_match_their_float64_mean() -> None:
    g = torch.Generator().manual_seed(7)
    heads = [torch.randn(80, 5, generator=g).to(torch.bfloat16) for _ in range(3)]
    a = torch.randn(5, 60, generator=g).to(torch.bfloat16)
    update = FormedUpdate(Summed(heads, 3), a.mT, scale=2.0)
    mean = sum(h.double() for h in heads) / 3
    assert torch.equal(update.left, mean)
    dense = 2.0 * mean @ a.double()
    (sigma,) = factored_singular_values([update])
    assert _relative_error(sigma, torch.linalg.svdvals(dense)) < 1e-10
    with pytest.raises(ValueError, match="cannot be summed"):
        Summed([heads[0], heads[1][:-1]])


def _sum_passes(monkeypatch) -> dict[str, int]:
    """How often the sum is formed, the joined heads read (formed, or their Gram taken), Householder QRs taken."""
    counts = {"sum": 0, "joined": 0, "householder": 0}

    def counted(function, name):
        return lambda *args: counts.__setitem__(name, counts[name] + 1) or function(*args)

    monkeypatch.setattr(Summed, "form", counted(Summed.form, "sum"))
    monkeypatch.setattr(Joined, "form", counted(Joined.form, "joined"))
    monkeypatch.setattr(triangular, "_joined_gram", counted(triangular._joined_gram, "joined"))
    monkeypatch.setattr(triangular, "householder_r", counted(triangular.householder_r, "householder"))
    monkeypatch.setattr(factored, "householder_r", triangular.householder_r)
    return counts


def test_the_mean_heads_gram_comes_from_the_joined_heads(monkeypatch) -> None:
    """The mean's Gram JᵀGJ from the heads' joined Gram: the sum is never formed, σ of the mean and of every head
    within 1e-10 of a dense float64 SVD."""
    g = torch.Generator().manual_seed(8)
    heads = [torch.randn(90, 4, generator=g).to(torch.bfloat16) for _ in range(3)]
    a = torch.randn(4, 70, generator=g).to(torch.bfloat16)
    updates = [FormedUpdate(Summed(heads, 3), a.mT, scale=1.5), *(FormedUpdate(h, a.mT, scale=1.5) for h in heads)]
    dense = [u.materialize() for u in updates]
    factored.FACTOR_CACHE.clear()
    counts = _sum_passes(monkeypatch)
    sigmas = factored_singular_values(updates)
    assert counts == {"sum": 0, "joined": 1, "householder": 0}
    for sigma, matrix in zip(sigmas, dense, strict=True):
        assert _relative_error(sigma, torch.linalg.svdvals(matrix)) < 1e-10


@pytest.mark.parametrize("residue", [1e-3, 1e-9])
def test_heads_that_cancel_in_their_mean_take_householder_of_the_formed_sum(monkeypatch, residue) -> None:
    """B_3 ≈ −(B_1 + B_2): the derived Gram's error grows as the cancellation squared, so the test refuses it
    (residue 1e-3: ρ ≈ 3·10³, tried and refused; 1e-9: not even tried) and the mean is formed; σ still exact."""
    g = torch.Generator().manual_seed(9)
    first, second = (torch.randn(90, 4, generator=g, dtype=torch.float64) for _ in range(2))
    heads = [first, second, -(first + second) + residue * torch.randn(90, 4, generator=g, dtype=torch.float64)]
    a = torch.randn(4, 70, generator=g, dtype=torch.float64)
    update = FormedUpdate(Summed(heads, 3), a.mT)
    dense = update.materialize()
    factored.FACTOR_CACHE.clear()
    counts = _sum_passes(monkeypatch)
    (sigma,) = factored_singular_values([update])
    assert counts["sum"] == 1 and counts["householder"] >= 1
    assert _relative_error(sigma, torch.linalg.svdvals(dense)) < 1e-10


def test_layers_sharing_a_stored_factor_take_its_r_once(monkeypatch) -> None:
    g = torch.Generator().manual_seed(3)
    a = torch.randn(16, 400, generator=g)
    shared = a[:, :300].mT
    updates = [FormedUpdate(RowScaled(torch.randn(200, 16, generator=g), torch.rand(200, generator=g)), shared)
               for _ in range(3)]  # fmt: skip
    passes: list[tuple[int, int]] = []
    gram = triangular._gram
    monkeypatch.setattr(triangular, "_gram", lambda f, w: passes.append(tuple(f.shape)) or gram(f, w))
    factored.FACTOR_CACHE.clear()
    _, r_right, _, _ = update_r_factors(updates)
    assert passes.count((300, 16)) == 1 and passes.count((200, 16)) == 3
    assert r_right[0] is r_right[1] is r_right[2]


def test_chunked_spectrum_equals_the_unchunked(monkeypatch) -> None:
    g = torch.Generator().manual_seed(4)
    updates = [_vera(64 + 8 * i, 48, 24, g, torch.float32)[0] for i in range(9)]
    monkeypatch.setattr(factored, "SPECTRUM_CHUNK_ELEMENTS", 3 * 2 * 24**2)  # three updates a chunk
    assert [len(c) for c in factored._chunks(list(range(9)), updates)] == [3, 3, 3]
    chunked = factored_singular_values(updates)
    for sigma, update in zip(chunked, updates, strict=True):
        assert _relative_error(sigma, torch.linalg.svdvals(update.materialize())) < 1e-10


def _known_condition(k: int, condition: float, generator: torch.Generator) -> torch.Tensor:
    """An equilibrated-looking SPD matrix Q·diag(λ)·Qᵀ with λ_max/λ_min = condition exactly (up to rounding)."""
    q, _ = torch.linalg.qr(torch.randn(k, k, dtype=torch.float64, generator=generator))
    eigenvalues = torch.logspace(0, -math.log10(condition), k, dtype=torch.float64)
    return (q * eigenvalues) @ q.mT


def test_shifted_cholesky_proves_only_what_holds() -> None:
    g = torch.Generator().manual_seed(5)
    k, rows = 64, 1000
    limit = cholesky_qr_limit(rows, k)
    inside = [_known_condition(k, c * limit**2, g) for c in (1e-3, 0.01)]
    outside = [_known_condition(k, c * limit**2, g) for c in (1.001, 4.0, 1e6)]
    limits = torch.full((len(inside) + len(outside),), limit, dtype=torch.float64)
    proven = triangular._shifted_cholesky_test(torch.stack(inside + outside), limits)
    assert proven[len(inside) :].tolist() == [False] * len(outside)  # never accepts κ(S) above limit²
    assert proven[: len(inside)].all()  # a sound test that still settles well-conditioned matrices


def test_wide_well_conditioned_factors_take_cholesky_without_an_svd(monkeypatch) -> None:
    """K = 256: ‖R‖_F·‖R⁻¹‖_F exceeds the limit for random tall factors, the shifted Cholesky settles them."""
    g = torch.Generator().manual_seed(6)
    factors = [torch.randn(4096, 256, generator=g, dtype=torch.float64) for _ in range(2)]
    calls = []
    svdvals = torch.linalg.svdvals
    monkeypatch.setattr(torch.linalg, "svdvals", lambda x, *a, **k: calls.append(x.shape) or svdvals(x, *a, **k))
    r, methods = factored.r_factors(factors)
    assert methods == ["cholesky", "cholesky"] and not calls
    for factor, triangle in zip(factors, r, strict=True):
        reference = torch.linalg.svdvals(factor)
        assert _relative_error(torch.linalg.svdvals(triangle), reference) < 1e-12


def test_one_worker_pool_serves_every_call() -> None:
    assert worker_pool() is worker_pool()


def _three_from_the_pool() -> int:
    return worker_pool().submit(lambda: 3).result(timeout=30)


def test_a_forked_child_gets_a_pool_of_its_own() -> None:
    import multiprocessing

    assert _three_from_the_pool() == 3  # the parent's pool has a live thread
    with multiprocessing.get_context("fork").Pool(1) as pool:  # the child inherits the pool object, not its threads
        assert pool.apply_async(_three_from_the_pool).get(timeout=60) == 3


@pytest.mark.parametrize("layout", ["columns", "transposed", "mixed"])
def test_joined_gram_in_every_layout_equals_the_float64_gram(layout) -> None:
    """[F_1 … F_N]ᵀ[F_1 … F_N] of parts stored as they are (a composition's B_i, HydraLoRA's heads), transposed
    (a composition's R_iᵀ) or both: the exact Gram of the concatenation, upcast once, whichever branch runs."""
    g = torch.Generator().manual_seed(21)
    rows, widths = 37, (3, 5, 2)
    dense = [torch.randn(rows, k, generator=g).to(torch.bfloat16) for k in widths]
    flips = {"columns": (False,) * 3, "transposed": (True,) * 3, "mixed": (False, True, False)}[layout]
    parts = [d.mT.contiguous().mT if flip else d for d, flip in zip(dense, flips, strict=True)]
    joined = Joined(parts)
    workspace = triangular._Workspace(joined.numel(), "cpu")
    expected = torch.cat(dense, dim=1).double()
    gram = triangular._gram(joined, workspace)
    torch.testing.assert_close(gram, expected.mT @ expected, rtol=1e-13, atol=1e-13)
    assert torch.equal(joined.dense(), expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["plain", "transposed"])
def test_face_split_gram_equals_the_formed_factors_gram(dtype, layout) -> None:
    """LoHa's P ⊙ᵣ Q Gram from its column-pair products (never formed) against the float64 Gram of the formed
    factor, r₁ ≠ r₂, both storage layouts (a right factor is stored transposed)."""
    g = torch.Generator().manual_seed(5)
    p, q = torch.randn(300, 6, generator=g).to(dtype), torch.randn(300, 4, generator=g).to(dtype)
    if layout == "transposed":
        p, q = p.mT.contiguous().mT, q.mT.contiguous().mT
    formed = FaceSplit(p, q).dense()
    got = triangular._gram(FaceSplit(p, q), triangular._Workspace(formed.numel(), "cpu"))
    expected = formed.mT @ formed
    assert got.shape == (24, 24)
    assert float((got - expected).abs().max()) <= 1e-14 * float(expected.abs().max())


def test_a_well_conditioned_loha_spectrum_never_forms_its_factors(monkeypatch) -> None:
    g = torch.Generator().manual_seed(6)
    p1, p2 = torch.randn(120, 3, generator=g), torch.randn(120, 3, generator=g)
    q1, q2 = torch.randn(3, 90, generator=g), torch.randn(3, 90, generator=g)
    dense = (p1.double() @ q1.double()) * (p2.double() @ q2.double())
    update = FormedUpdate(FaceSplit(p1, p2), FaceSplit(q1.mT, q2.mT), scale=0.5)
    monkeypatch.setattr(FaceSplit, "form", lambda self, out: pytest.fail("the face-split factor was formed"))
    (sigma,) = factored_singular_values([update])
    assert _relative_error(sigma, torch.linalg.svdvals(0.5 * dense)) < 1e-10
