"""The factored paths of round 2 against dense float64 references computed here: BoRA from per-block R factors,
compositions without float64 copies, the R-factor cache, and ``compare``'s alignment from cross-Grams."""

from __future__ import annotations

import math

import pytest
import torch

from rankscope.core.factored import FACTOR_CACHE, factored_singular_values
from rankscope.core.formed import FormedUpdate, weighted_sum
from rankscope.core.spectrum import singular_values
from rankscope.core.triangular import CHOLESKY_QR_TOLERANCE
from rankscope.core.update import BlockDiagonalUpdate, FactoredUpdate
from rankscope.measures.alignment import factored_pairwise_alignment

FLOAT32_EPS = float(torch.finfo(torch.float32).eps)


def dense_sigma(matrix: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(matrix.double())


def assert_sigma(got: torch.Tensor, expected: torch.Tensor, count: int) -> None:
    expected = expected[:count]
    significant = expected >= 1e-9 * expected[0]
    error = ((got[:count] - expected).abs() / expected)[significant].max().item()
    assert error <= 1e-6, error


def conditioned(rows: int, cols: int, condition: float, generator: torch.Generator) -> torch.Tensor:
    u, _ = torch.linalg.qr(torch.randn(rows, cols, generator=generator, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, cols, generator=generator, dtype=torch.float64))
    return (u * torch.logspace(0, -math.log10(condition), cols, dtype=torch.float64)) @ v.T


def bora_dense(b: torch.Tensor, a: torch.Tensor, blocks: int, core: torch.Tensor, scale: float) -> torch.Tensor:
    """s·blockdiag(B_i)·Σ'·blockdiag(A_j), built here from the definition."""
    m, n = b.shape[0], a.shape[1]
    left = torch.zeros(m, blocks * b.shape[1], dtype=torch.float64)
    right = torch.zeros(blocks * a.shape[0], n, dtype=torch.float64)
    r, rows, cols = b.shape[1], m // blocks, n // blocks
    for i in range(blocks):
        left[i * rows : (i + 1) * rows, i * r : (i + 1) * r] = b[i * rows : (i + 1) * rows].double()
        right[i * r : (i + 1) * r, i * cols : (i + 1) * cols] = a[:, i * cols : (i + 1) * cols].double()
    return scale * left @ core.double() @ right


def test_bora_from_blocks_matches_a_dense_svd() -> None:
    g = torch.Generator().manual_seed(1)
    cases = []
    # well-conditioned blocks; one block of B ill-conditioned (its R by Householder QR); blocks narrower than r
    for m, n, r, blocks, ill in ((96, 64, 4, 4, False), (96, 64, 4, 4, True), (12, 16, 4, 4, False)):
        b = torch.randn(m, r, generator=g, dtype=torch.float64)
        if ill:
            b[: m // blocks] = conditioned(m // blocks, r, 1e7, g)
        a = torch.randn(r, n, generator=g, dtype=torch.float64).to(torch.bfloat16)
        core = torch.randn(blocks * r, blocks * r, generator=g, dtype=torch.float64)
        cases.append((b.to(torch.float32), a, blocks, core, 0.7))
    updates = [BlockDiagonalUpdate(b, a, blocks, core, scale) for b, a, blocks, core, scale in cases]
    FACTOR_CACHE.clear()
    values, exact = singular_values(updates)
    assert all(exact)
    for sigma, (b, a, blocks, core, scale), update in zip(values, cases, updates, strict=True):
        expected = dense_sigma(bora_dense(b, a, blocks, core, scale))
        assert sigma.shape[0] == update.rank_bound == min(b.shape[0], a.shape[1], blocks * b.shape[1])
        assert_sigma(sigma, expected, update.rank_bound)
        # the materialised factors are the block-diagonal ones, and unscaled() drops only the scale
        reference = bora_dense(b, a, blocks, core, scale)
        assert torch.allclose(update.materialize(), reference, rtol=1e-10, atol=1e-10)
        assert torch.allclose(update.unscaled().materialize() * scale, reference, rtol=1e-10, atol=1e-10)


def test_bora_cores_from_diagonal_blocks_match_a_dense_svd() -> None:
    """BoRA's Σ' (a grid of diagonal r × r blocks) takes the cores from the diagonals, a full core the general
    products; with a scalar and a per-column scale, and one ill-conditioned block — σ against a dense SVD."""
    from rankscope.core.block_diagonal import block_diagonals
    from rankscope.formats.bora import block_core

    g = torch.Generator().manual_seed(4)
    m, n, r, blocks = 96, 64, 4, 4
    cases = []
    for scale, ill, diagonal in ((0.7, False, True), (0.7, True, True), ("vector", False, True), (0.7, False, False)):
        b = torch.randn(m, r, generator=g, dtype=torch.float64)
        if ill:
            b[m // blocks : 2 * m // blocks] = conditioned(m // blocks, r, 1e7, g)
        a = torch.randn(r, n, generator=g, dtype=torch.float64).to(torch.bfloat16)
        if diagonal:
            core = block_core(torch.randn(blocks, blocks, r, generator=g, dtype=torch.float64).exp())
        else:
            core = torch.randn(blocks * r, blocks * r, generator=g, dtype=torch.float64)
        if scale == "vector":
            scale = torch.rand(blocks * r, generator=g, dtype=torch.float64) + 0.5
        cases.append((b.float(), a, blocks, core, scale))
    assert [block_diagonals(core, blocks) is not None for _, _, _, core, _ in cases] == [True, True, True, False]
    # the diagonal cores and the full one in separate batches (they share a shape, so also together below)
    for chosen in (cases, cases[:3], cases[3:]):
        updates = [BlockDiagonalUpdate(b, a, blocks, core, scale) for b, a, blocks, core, scale in chosen]
        FACTOR_CACHE.clear()
        values, exact = singular_values(updates)
        assert all(exact)
        for sigma, (b, a, blocks, core, scale) in zip(values, chosen, strict=True):
            scaled = core * scale[:, None] if isinstance(scale, torch.Tensor) else core * scale
            assert_sigma(sigma, dense_sigma(bora_dense(b, a, blocks, scaled, 1.0)), blocks * r)


def test_composition_keeps_stored_precision_and_its_weights() -> None:
    g = torch.Generator().manual_seed(2)
    parts = []
    for rank, scale in ((4, 2.0), (3, 0.5), (5, 1.5)):
        b = torch.randn(40, rank, generator=g).to(torch.bfloat16)
        a = torch.randn(rank, 24, generator=g).to(torch.bfloat16)
        parts.append(FactoredUpdate(b, a, scale=scale))
    weights = (0.6, -0.3, 0.2)
    update = weighted_sum(parts, weights)
    # no copies at all: the composite's factors are the stored bf16 tensors themselves, joined
    assert all(x is p.left for x, p in zip(update.left_factor.stored, parts, strict=True))
    assert all(x is p.right for x, p in zip(update.right_factor.stored, parts, strict=True))
    expected = sum(w * p.scale * p.left.double() @ p.right.double() for p, w in zip(parts, weights, strict=True))
    unscaled = sum(w * p.left.double() @ p.right.double() for p, w in zip(parts, weights, strict=True))
    (sigma, sigma_unscaled), _ = singular_values([update, update.unscaled()])
    assert_sigma(sigma, dense_sigma(expected), update.rank_bound)
    assert_sigma(sigma_unscaled, dense_sigma(unscaled), update.rank_bound)


def test_cached_r_factors_follow_in_place_changes() -> None:
    g = torch.Generator().manual_seed(3)
    b, a = torch.randn(50, 4, generator=g), torch.randn(4, 30, generator=g)
    update = FactoredUpdate(b, a, scale=1.0)
    (first,) = factored_singular_values([update])
    (again,) = factored_singular_values([update])
    assert torch.equal(first, again)
    with torch.no_grad():
        b.mul_(3.0)  # the version counter moves: the cached R factor must not be used
    (changed,) = factored_singular_values([update])
    assert_sigma(changed, dense_sigma(b.double() @ a.double()), 4)


def reference_alignment(a: torch.Tensor, b: torch.Tensor) -> dict:
    """The alignment of two dense float64 matrices from their full SVDs (numpy's matrix_rank rule per matrix)."""

    def bases(matrix):
        u, sigma, vh = torch.linalg.svd(matrix, full_matrices=False)
        rank = int((sigma > sigma[0] * max(matrix.shape) * FLOAT32_EPS).sum()) if sigma[0] > 0 else 0
        return u[:, :rank], vh.mT[:, :rank]

    (ua, va), (ub, vb) = bases(a), bases(b)
    out = {"cosine": float((a * b).sum() / (a.norm() * b.norm()))}
    for side, x, y in (("left", ua, ub), ("right", va, vb)):
        k = min(x.shape[1], y.shape[1])
        cross = x[:, :k].mT @ y[:, :k]
        degrees = torch.rad2deg(torch.arccos(torch.linalg.svdvals(cross).clamp(0, 1)))
        out[f"{side}_overlap"] = float(cross.pow(2).sum()) / k
        out[f"{side}_baseline"] = k / x.shape[0]
        out[f"{side}_min_angle"] = float(degrees.min())
        out[f"{side}_mean_angle"] = float(degrees.mean())
    return out


def test_alignment_from_cross_grams_matches_dense_references() -> None:
    g = torch.Generator().manual_seed(4)
    m, n = 120, 80
    shared = torch.randn(m, 3, generator=g, dtype=torch.float64)
    updates = [
        FactoredUpdate(
            torch.cat([shared, torch.randn(m, 3, generator=g, dtype=torch.float64)], 1).float(),
            torch.randn(6, n, generator=g).to(torch.bfloat16),
            scale=2.0,
        ),
        # an ill-conditioned left factor (Householder side), a core and per-dimension scales
        FactoredUpdate(
            (conditioned(m, 5, 1e6, g) + 0.1 * torch.cat([shared, shared[:, :2]], 1)).float(),
            torch.randn(5, n, generator=g, dtype=torch.float64),
            core=torch.randn(5, 5, generator=g, dtype=torch.float64),
            scale=torch.tensor([1.0, 0.5, 2.0, 1.5, 0.25], dtype=torch.float64),
        ),
        BlockDiagonalUpdate(
            torch.randn(m, 2, generator=g),
            torch.randn(2, n, generator=g),
            4,
            torch.randn(8, 8, generator=g, dtype=torch.float64),
            0.5,
        ),
        FactoredUpdate(torch.zeros(m, 4), torch.randn(4, n, generator=g), scale=1.0),  # a zero update (B = 0)
    ]
    dense = [u.materialize() for u in updates]
    for cached in (True, False):
        FACTOR_CACHE.clear()
        if cached:
            singular_values(updates)  # the spectra fill the cache, the alignment reads it
        got = factored_pairwise_alignment(updates)
        for i in range(len(updates)):
            for j in range(len(updates)):
                if i == 3 or j == 3:
                    assert all(got[key][i][j] is None for key in got), (i, j)
                    continue
                expected = reference_alignment(dense[i], dense[j])
                for key, value in expected.items():
                    tolerance = 1e-5 if key.endswith("angle") else 1e-9  # degrees near 0 are arccos-limited
                    assert abs(got[key][i][j] - value) <= tolerance, (cached, i, j, key, got[key][i][j], value)


def composition_cases(g: torch.Generator) -> list[list[FactoredUpdate]]:
    """Components of a weighted sum: mixed precision (bf16 beside float32, promoted by weighted_sum), cores and
    per-dimension scales, two nearly parallel components (the composite's CholeskyQR is refused), a zero
    component, and a layer narrower than the summed inner dimension (m < ΣK_i: the composite's R is wide)."""
    m, n = 90, 70
    shared = torch.randn(m, 4, generator=g, dtype=torch.float64)
    mixed = [
        FactoredUpdate(torch.randn(m, 4, generator=g).to(torch.bfloat16), torch.randn(4, n, generator=g), scale=2.0),
        FactoredUpdate(
            torch.randn(m, 3, generator=g),
            torch.randn(3, n, generator=g),
            core=torch.randn(3, 3, generator=g, dtype=torch.float64),
            scale=torch.tensor([1.0, 0.5, 2.0]),
        ),
        FactoredUpdate(torch.randn(m, 5, generator=g), torch.randn(5, n, generator=g), scale=0.25),
    ]
    nearby = shared + 1e-4 * torch.randn(m, 4, generator=g, dtype=torch.float64)
    parallel = [
        FactoredUpdate(shared.float(), torch.randn(4, n, generator=g), scale=1.0),
        FactoredUpdate(nearby.float(), torch.randn(4, n, generator=g), scale=1.5),
        FactoredUpdate(torch.zeros(m, 2), torch.randn(2, n, generator=g), scale=1.0),  # a zero component (B = 0)
    ]
    narrow = [FactoredUpdate(torch.randn(6, 4, generator=g), torch.randn(4, 40, generator=g), scale=1.0)
              for _ in range(3)]  # fmt: skip
    return [mixed, parallel, narrow]


def test_alignment_from_the_composites_r_factors_matches_dense_references(monkeypatch) -> None:
    import rankscope.measures.alignment as alignment

    g = torch.Generator().manual_seed(5)
    cases = composition_cases(g)
    composites = [weighted_sum(parts, [0.5, -1.0, 2.0][: len(parts)]) for parts in cases]

    def refuse(updates):  # the composite's coordinates must be what answers, not the per-factor path
        raise AssertionError("the per-factor path was taken")

    monkeypatch.setattr(alignment, "_from_factors", refuse)
    for cached in (True, False):
        FACTOR_CACHE.clear()
        if cached:
            singular_values([u for parts in cases for u in parts] + composites)
        for parts, composite in zip(cases, composites, strict=True):
            got = factored_pairwise_alignment(parts, composite)
            dense = [u.materialize() for u in parts]
            zero = [i for i, d in enumerate(dense) if not bool(d.any())]
            for i in range(len(parts)):
                for j in range(len(parts)):
                    if i in zero or j in zero:
                        assert all(got[key][i][j] is None for key in got), (i, j)
                        continue
                    expected = reference_alignment(dense[i], dense[j])
                    for key, value in expected.items():
                        tolerance = 1e-5 if key.endswith("angle") else 1e-9
                        assert abs(got[key][i][j] - value) <= tolerance, (cached, i, j, key, got[key][i][j], value)


def test_a_composite_of_other_factors_is_not_trusted() -> None:
    g = torch.Generator().manual_seed(6)
    parts = composition_cases(g)[0]
    other = weighted_sum([FactoredUpdate(p.left.clone(), p.right.clone(), scale=p.scale) for p in parts], [1, 1, 1])
    with torch.no_grad():
        other.right[0, 0] += 1.0  # one element differs: the composite is not these components' concatenation
    assert factored_pairwise_alignment(parts, other) == factored_pairwise_alignment(parts)
    assert factored_pairwise_alignment(parts, weighted_sum(parts[:2], [1, 1])) == factored_pairwise_alignment(parts)


# -- a composition's components from the composite's Gram (core.factor_sides) ----------------------------------
def assert_sigma_tight(got: torch.Tensor, matrix: torch.Tensor, count: int) -> None:
    """σ within 1e-12 relative of a dense float64 SVD, over σ ≥ 1e-3·σ₁ (the dense SVD's own error is ε·σ₁)."""
    expected = dense_sigma(matrix)[:count]
    assert got.shape[0] == count
    if count == 0 or expected[0] == 0:
        assert bool((got == 0).all()) if expected.numel() and expected[0] == 0 else True
        return
    significant = expected >= 1e-3 * expected[0]
    error = ((got[:count] - expected).abs() / expected)[significant].max().item()
    assert error <= 1e-12, error


def grams_taken(monkeypatch) -> list[torch.Tensor]:
    """The factors whose Gram the factored path computes from the factor itself, recorded."""
    import rankscope.core.triangular as triangular

    seen: list[torch.Tensor] = []
    real = triangular._gram

    def recording(factor, workspace):
        seen.append(factor)
        return real(factor, workspace)

    monkeypatch.setattr(triangular, "_gram", recording)
    return seen


def read(seen: list[torch.Tensor], update: FactoredUpdate) -> tuple[bool, bool]:
    """Whether the left factor, and the right one (whose factor is ``right``ᵀ), were read for a Gram (a
    composite's: its joined factors)."""
    if isinstance(update, FormedUpdate):
        return any(f is update.left_factor for f in seen), any(f is update.right_factor for f in seen)
    right = update.right
    return (any(f is update.left for f in seen),
            any(isinstance(f, torch.Tensor) and f.data_ptr() == right.data_ptr() and f.shape == right.mT.shape
                for f in seen))  # fmt: skip


def test_components_take_their_r_factors_from_the_composites_gram(monkeypatch) -> None:
    from rankscope.core.factored import update_r_factors

    g = torch.Generator().manual_seed(7)
    mixed, parallel, narrow = composition_cases(g)
    ill = FactoredUpdate(conditioned(90, 4, 1e7, g).float(), torch.randn(4, 70, generator=g), scale=1.0)
    refusing = [mixed[0], ill]  # the ill-conditioned part is refused by its block's test: Householder on its own
    cases = [mixed, parallel, narrow, refusing]
    composites = [weighted_sum(parts, [0.5, -1.0, 2.0][: len(parts)]) for parts in cases]
    growth = [weighted_sum(mixed[:t], [0.5, -1.0][:t]) for t in (1, 2)]  # a sequential composition's partial sums
    nested = weighted_sum([composites[0], parallel[0]], [1.0, 0.3])  # a composite inside a composite
    components = [u for parts in cases for u in parts]
    updates = [*composites, *growth, nested, *components]
    seen = grams_taken(monkeypatch)
    FACTOR_CACHE.clear()
    values, exact = singular_values(updates)
    assert all(exact)
    for update, sigma in zip(updates, values, strict=True):
        assert_sigma_tight(sigma, update.materialize(), update.rank_bound)
    # the path that answered: only the widest tall composites were read for a Gram ("hosts": the nested one, and
    # those not inside it); every other composite and component took a block of a host's Gram. The narrow layer's
    # composite has a wide left factor (6 × 12: no Gram), so its components' left factors took their own passes.
    left_hosts = [nested, composites[1], composites[3], *narrow]
    right_hosts = [nested, composites[1], composites[3], composites[2]]
    for update in updates:
        expected = (any(update is h for h in left_hosts), any(update is h for h in right_hosts))
        assert read(seen, update) == expected, update
    assert len(seen) == len(left_hosts) + len(right_hosts)
    # the methods: the nearly parallel composite is refused, its (well-conditioned) components are not; the
    # ill-conditioned part took Householder QR — all of it from the cache now
    _, _, how_left, _ = update_r_factors([composites[1], *parallel[:2], ill, mixed[0]])
    assert how_left == ["householder", "cholesky", "cholesky", "householder", "cholesky"]
    assert len(seen) == len(left_hosts) + len(right_hosts)


def test_a_component_changed_in_place_after_composing_changes_the_composite_too(monkeypatch) -> None:
    """The composite joins the components' very tensors (no copy): a change in place is its change too, and no
    R factor cached before it (the composite's or a component's) is used after it."""
    g = torch.Generator().manual_seed(8)
    parts = [FactoredUpdate(torch.randn(60, 3, generator=g), torch.randn(3, 50, generator=g)) for _ in range(3)]
    composite = weighted_sum(parts, [1.0, 2.0, -0.5])
    FACTOR_CACHE.clear()
    singular_values([composite, *parts])  # caches every R factor
    with torch.no_grad():
        parts[1].left.mul_(4.0)
    expected = sum(w * p.materialize() for p, w in zip(parts, [1.0, 2.0, -0.5], strict=True))
    assert torch.allclose(composite.materialize(), expected, rtol=0, atol=1e-12)
    seen = grams_taken(monkeypatch)
    values, _ = singular_values([composite, *parts])
    assert_sigma_tight(values[0], expected, 9)
    for update, sigma in zip(parts, values[1:], strict=True):
        assert_sigma_tight(sigma, update.materialize(), 3)
    assert read(seen, composite) == (True, False)  # the left side changed: read again; the right one did not


def test_the_alignment_trusts_a_concatenation_only_of_the_very_tensors(monkeypatch) -> None:
    import rankscope.measures.alignment as alignment

    g = torch.Generator().manual_seed(9)
    parts = composition_cases(g)[0]
    composite = weighted_sum(parts, [1.0, -1.0, 0.5])
    expected = factored_pairwise_alignment(parts)

    def refuse(part, factor):
        raise AssertionError("the factors were compared")

    monkeypatch.setattr(alignment, "_same", refuse)
    got = factored_pairwise_alignment(parts, composite)
    for key, matrix in expected.items():
        for row, other in zip(matrix, got[key], strict=True):
            assert other == pytest.approx(row, abs=1e-5 if key.endswith("angle") else 1e-9), key
    # components whose factors are copies of the joined ones are not taken for its parts (nothing compared):
    # aligned from their own factors, to the same values
    copies = [FactoredUpdate(p.left.clone(), p.right.clone(), p.core, p.scale) for p in parts]
    assert alignment._spans(copies, composite) is None
    got = factored_pairwise_alignment(copies, composite)
    for key, matrix in expected.items():
        for row, other in zip(matrix, got[key], strict=True):
            assert other == pytest.approx(row, abs=1e-5 if key.endswith("angle") else 1e-9), key
    # a plain update holding the concatenation is checked by comparing values
    plain = FactoredUpdate(composite.left, composite.right, composite.core, composite.scale)
    with pytest.raises(AssertionError, match="compared"):
        factored_pairwise_alignment(parts, plain)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_weighted_sum_joins_the_factors_exactly(dtype) -> None:
    g = torch.Generator().manual_seed(11)
    parts = [FactoredUpdate(torch.randn(30, 4, generator=g).to(dtype), torch.randn(4, 20, generator=g).to(dtype))
             for _ in range(3)]  # fmt: skip
    parts[1].left[3, 2] = -0.0  # a signed zero survives the upcast
    composite = weighted_sum(parts, [0.5, 1.0, -2.0])
    assert composite.left.dtype == composite.right.dtype == torch.float64  # formed on access, exactly
    assert torch.equal(composite.left, torch.cat([p.left for p in parts], dim=1).double())
    assert torch.signbit(composite.left[3, 6])
    assert torch.equal(composite.right, torch.cat([p.right for p in parts], dim=0).double())
    dense = sum(w * p.materialize() for p, w in zip(parts, [0.5, 1.0, -2.0], strict=True))
    assert torch.allclose(composite.materialize(), dense, rtol=0, atol=1e-12)


def test_spectra_keep_their_r_factors_only_when_they_all_fit_the_cache(monkeypatch) -> None:
    """R factors that together overflow FACTOR_CACHE would only push each other out: none is kept then; within
    the budget every side's is. The σ are the same either way (and a dense SVD's)."""
    g = torch.Generator().manual_seed(6)
    updates = [FactoredUpdate(torch.randn(120, 6, generator=g), torch.randn(6, 90, generator=g), scale=0.5)
               for _ in range(5)]  # fmt: skip
    needed = sum(2 * 8 * u.inner_dim**2 for u in updates)
    kept = {}
    for budget in (needed, needed - 1):
        monkeypatch.setattr(FACTOR_CACHE, "budget", budget)
        FACTOR_CACHE.clear()
        sigmas = factored_singular_values(updates)
        sides = [(u.left, "left") for u in updates] + [(u.right, "right") for u in updates]
        kept[budget] = [FACTOR_CACHE.get(t, (tag, 1, "cpu", CHOLESKY_QR_TOLERANCE)) is not None for t, tag in sides]
        for sigma, update in zip(sigmas, updates, strict=True):
            assert_sigma(sigma, dense_sigma(update.materialize()), update.rank_bound)
    assert all(kept[needed]) and not any(kept[needed - 1])
    FACTOR_CACHE.clear()
