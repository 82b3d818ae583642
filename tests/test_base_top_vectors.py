"""The top-k singular vectors from the Gram (core.top_vectors) and the dense-update base measures built on them
(analysis.against_base: amplification, intruder dimensions), against a float64 ``torch.linalg.svd`` written here:
random and structured matrices, a near-degenerate σ_k (kept on the Gram where σ_k ~ σ₁, the dense SVD where
σ_k ≪ σ₁), a rank below k, and the paths where the spectrum's σ cannot be reused (float32, --unscaled)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import rankscope
from rankscope.analysis import against_base
from rankscope.core import top_vectors
from rankscope.core.base import BaseWeights
from rankscope.core.checkpoint import Checkpoint, Layer
from rankscope.core.top_vectors import top_singular_triplets
from rankscope.core.update import DenseUpdate

from .factories import quiet_library_warnings  # noqa: F401  (autouse)


def _with_spectrum(m: int, n: int, sigma: torch.Tensor, seed: int) -> torch.Tensor:
    """U·diag(σ)·Vᵀ with Haar-random U, V (QR of Gaussians), float64."""
    generator = torch.Generator().manual_seed(seed)
    s = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, s, generator=generator, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, s, generator=generator, dtype=torch.float64))
    return u @ torch.diag(sigma) @ v.T


def _projector_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖AAᵀ − BBᵀ‖₂ = sin of the largest principal angle between the spans of orthonormal A and B."""
    return float(torch.linalg.matrix_norm(a @ a.T - b @ b.T, ord=2))


def _reference(matrix: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    u, sigma, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u[:, :k], sigma[:k], vh[:k].T


@pytest.mark.parametrize("shape", [(80, 300), (300, 80), (120, 120)])
def test_random_and_decaying_match_the_dense_svd(shape):
    m, n = shape
    torch.manual_seed(0)
    random = torch.randn(m, n, dtype=torch.float64)
    decaying = _with_spectrum(m, n, 2.0 ** (-torch.arange(min(m, n), dtype=torch.float64) / 4), seed=1)
    for matrix in (random, decaying):
        got = top_singular_triplets(matrix, 12, per_vector=True)
        u, sigma, v = _reference(matrix, 12)
        assert got.method == "gram"
        torch.testing.assert_close(got.sigma, sigma, rtol=1e-12, atol=0)
        # each vector on its own (up to sign), both sides
        for ours, theirs in ((got.left, u), (got.right, v)):
            cosines = (ours * theirs).sum(0).abs()
            assert float((1 - cosines).abs().max()) < 1e-10
        assert _projector_distance(got.left, u) < 1e-8 and _projector_distance(got.right, v) < 1e-8


def test_near_degenerate_sigma_k_comparable_to_sigma_1_stays_on_the_gram():
    """σ_k = σ_{k+1}·(1 + 1e-8), both ~σ₁: the span is ill-conditioned for the dense SVD as much as for the Gram
    (bound × σ₁/(σ_k + σ_{k+1}) ≈ 0.6); the Gram's span agrees with the SVD's to the SVD's own conditioning."""
    sigma = torch.linspace(3.0, 1.0, 60, dtype=torch.float64)
    k = 8
    sigma[k] = sigma[k - 1] / (1 + 1e-8)
    matrix = _with_spectrum(60, 200, sigma, seed=2)
    got = top_singular_triplets(matrix, k)
    u, _, v = _reference(matrix, k)
    assert got.method == "gram"
    # ε·n·σ₁/gap ≈ 2e-16·200·3/(2e-8) ≈ 7e-6 is the a-priori bound of either; the measured distance is far below
    assert _projector_distance(got.left, u) < 1e-6 and _projector_distance(got.right, v) < 1e-6


def test_near_degenerate_sigma_k_far_below_sigma_1_takes_the_dense_svd():
    """σ₁ = 1, σ_k ≈ σ_{k+1} ≈ 1e-3 with a 1e-6 relative gap: squaring would lose ~3 digits the SVD keeps."""
    sigma = torch.logspace(0, -5, 50, dtype=torch.float64)
    k = 20
    sigma[k - 1], sigma[k] = 1e-3, 1e-3 / (1 + 1e-6)
    matrix = _with_spectrum(50, 90, sigma, seed=3)
    got = top_singular_triplets(matrix, k)
    u, s, _ = _reference(matrix, k)
    assert got.method == "svd"
    torch.testing.assert_close(got.sigma, s, rtol=0, atol=0)
    assert _projector_distance(got.left, u) < 1e-12


def test_rank_below_k_takes_the_dense_svd():
    torch.manual_seed(4)
    low = torch.randn(40, 3, dtype=torch.float64) @ torch.randn(3, 70, dtype=torch.float64)
    got = top_singular_triplets(low, 6)
    assert got.method == "svd"  # σ_4..σ_6 are at the Gram's rounding floor
    torch.testing.assert_close(got.sigma[:3], torch.linalg.svdvals(low)[:3], rtol=1e-13, atol=0)
    assert top_singular_triplets(low, 3).method == "gram"


# ---- the base measures of dense updates, end to end --------------------------------------------------------------


def _intruders(w0: torch.Tensor, delta: torch.Tensor, top_k: int = 10, epsilon: float = 0.5) -> list[int]:
    u_base = torch.linalg.svd(w0, full_matrices=False).U
    u_merged = torch.linalg.svd(w0 + delta, full_matrices=False).U[:, :top_k]
    return torch.nonzero((u_merged.T @ u_base).abs().amax(dim=1) < epsilon).flatten().tolist()


def _amplification(w0: torch.Tensor, delta: torch.Tensor, k: int) -> float:
    u, _, v = _reference(delta, k)
    return float(delta.norm() / (u.T @ w0 @ v).norm())


def _cases() -> dict[str, tuple[torch.Tensor, torch.Tensor, int]]:
    """name → (W₀, ΔW, expected amplification k) for 64×160 layers (and one 160×64)."""
    torch.manual_seed(5)
    w0 = torch.randn(64, 160, dtype=torch.float64) / 8
    w0_tall = torch.randn(160, 64, dtype=torch.float64) / 8
    scale = torch.rand(160, dtype=torch.float64) * 0.2 - 0.1  # IA3: ΔW = W₀·diag(l − 1)
    low = torch.randn(64, 3, dtype=torch.float64) @ torch.randn(3, 160, dtype=torch.float64) * 0.3
    sigma = torch.linspace(2.0, 0.5, 64, dtype=torch.float64)
    sigma[16] = sigma[15] / (1 + 1e-7)  # near-degenerate at k = 16 (amplification_k)
    return {
        "full": (w0, torch.randn(64, 160, dtype=torch.float64) * 0.05, 16),
        "ia3": (w0, w0 * scale, 16),
        "tall": (w0_tall, torch.randn(160, 64, dtype=torch.float64) * 0.05, 16),
        "low_rank": (w0, low, 3),  # numerical rank 3 < amplification_k
        "degenerate": (w0, _with_spectrum(64, 160, sigma, seed=6) * 0.05, 16),
        "spiked": (w0, _with_spectrum(64, 160, torch.logspace(1, -3, 64, dtype=torch.float64), seed=7), 16),
    }


def _checkpoint(tmp_path, cases) -> Checkpoint:
    base_file = tmp_path / "base.safetensors"
    save_file({f"{name}.weight": w0.clone() for name, (w0, _, _) in cases.items()}, str(base_file))
    layers = []
    for name, (_, delta, _) in cases.items():
        # the same tensor on every call (``.to`` copies nothing here): the base measures must not modify it
        build = lambda dtype, device, d=delta: d.to(device=device, dtype=dtype)  # noqa: E731
        update = DenseUpdate(shape=tuple(delta.shape), build=build)
        layers.append(Layer(name, update, tuple(delta.shape), params=delta.numel(), family="full-delta"))
    return Checkpoint(tmp_path, "full-delta", "FULL", {}, layers, base=BaseWeights(base_file))


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("RANKSCOPE_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize("options", [{}, {"dense_dtype": "float32"}, {"unscaled": True}])
def test_dense_base_measures_match_the_dense_svd(tmp_path, cache_dir, monkeypatch, options):
    """Amplification (k, value) and intruder indices of every case equal the dense-SVD reference; the Gram
    route is what ran (spied), except where the dense SVD is the honest answer; ΔW is left untouched."""
    cases = _cases()
    originals = {name: delta.clone() for name, (_, delta, _) in cases.items()}
    methods: list[str] = []

    def spy(*args, **kwargs):
        found = top_singular_triplets(*args, **kwargs)
        methods.append(found.method)
        return found

    monkeypatch.setattr(against_base, "top_singular_triplets", spy)
    analysis = rankscope.analyze(_checkpoint(tmp_path, cases), device="cpu", **options)
    for name, (w0, delta, k) in cases.items():
        base = analysis[name].base
        assert base["amplification_k"] == k, name
        assert base["amplification"] == pytest.approx(_amplification(w0, delta, k), rel=1e-8), name
        assert base["intruders"]["indices"] == _intruders(w0, delta), name
        assert base["relative_update"] == pytest.approx(float(delta.norm() / w0.norm()), rel=1e-12)
        sigma_max = float(torch.linalg.svdvals(delta)[0] / torch.linalg.svdvals(w0)[0])
        assert base["relative_sigma_max"] == pytest.approx(sigma_max, rel=1e-12)
        torch.testing.assert_close(delta, originals[name], rtol=0, atol=0)
    if "dense_dtype" not in options:  # the spectrum's σ reused (unscaling a DenseUpdate changes nothing): every
        assert methods == ["gram"] * (2 * len(cases))  # case on the Gram, the near-degenerate one included
    else:  # a float32 spectrum: k from the Gram's σ; the low-rank ΔW's σ_16 is at its rounding floor: dense SVD
        assert methods.count("svd") == 1


def test_large_layer_without_vectors_reuses_the_spectrum(tmp_path, cache_dir, monkeypatch):
    """Above the CPU limit (no amplification, no intruders) σ₁ and ‖ΔW‖_F come from the spectrum: ΔW is not
    materialised again, and both equal the reference."""
    w0, delta, _ = _cases()["full"]
    base_file = tmp_path / "base.safetensors"
    save_file({"full.weight": w0.clone()}, str(base_file))
    calls = []

    def build(dtype, device):
        calls.append(1)
        return delta.to(device=device, dtype=dtype)

    layer = Layer("full", DenseUpdate(shape=(64, 160), build=build), (64, 160), params=delta.numel())
    checkpoint = Checkpoint(tmp_path, "full-delta", "FULL", {}, [layer], base=BaseWeights(base_file))
    monkeypatch.setattr(against_base, "DENSE_VECTORS_CPU_LIMIT", 20)
    record = rankscope.analyze(checkpoint, device="cpu")["full"]
    assert record.base["amplification"] is None and record.base["intruders"] is None
    assert len(calls) == 1  # the spectrum's own
    sigma_max = float(torch.linalg.svdvals(delta)[0] / torch.linalg.svdvals(w0)[0])
    assert record.base["relative_sigma_max"] == pytest.approx(sigma_max, rel=1e-12)


@pytest.mark.parametrize("shape", [(30, 50), (50, 30), (7, 40)])
def test_full_and_subset_eigensolvers_agree(shape):
    """The GPU's solver (torch's full eigh, top taken) and the CPU's (scipy's, stopped at the top) on the CPU."""
    torch.manual_seed(8)
    matrix = torch.randn(*shape, dtype=torch.float64)
    for count in (3, min(shape)):
        lam_subset, vectors_subset, left = top_vectors.gram_top_eigen(matrix, count, full=False)
        lam_full, vectors_full, left_full = top_vectors.gram_top_eigen(matrix, count, full=True)
        assert left == left_full == (shape[0] <= shape[1]) and lam_full.shape == (count,)
        torch.testing.assert_close(torch.from_numpy(lam_full), torch.from_numpy(lam_subset), rtol=1e-12, atol=1e-12)
        cosines = abs((vectors_full * vectors_subset).sum(0))
        assert float(abs(1 - cosines).max()) < 1e-9
        reference = torch.linalg.svdvals(matrix)[:count] ** 2
        torch.testing.assert_close(torch.from_numpy(lam_full), reference, rtol=1e-12, atol=1e-12)


def test_gram_bounds_are_the_documented_ones():
    """η/gap with η = ε·max(m, n)·λ₁, of the block and of the worst single vector."""
    lam = torch.tensor([4.0, 3.0, 2.9, 1.0], dtype=torch.float64).numpy()
    eta = top_vectors.EPS * 100 * 4.0
    assert top_vectors.gram_error_bound(lam, 2, (10, 100), per_vector=False) == pytest.approx(eta / 0.1)
    assert top_vectors.gram_error_bound(lam, 3, (10, 100), per_vector=False) == pytest.approx(eta / 1.9)
    assert top_vectors.gram_error_bound(lam, 3, (10, 100), per_vector=True) == pytest.approx(eta / 0.1)
