"""The batched per-factor alignment (``measures.alignment_batched``: HydraLoRA's heads, components without a
concatenated composite) against dense float64 references computed here from each component's ΔW."""

from __future__ import annotations

import math

import pytest
import torch

from rankscope.core.factored import FACTOR_CACHE, update_r_factors
from rankscope.core.spectrum import singular_values
from rankscope.core.update import FactoredUpdate
from rankscope.measures import alignment
from rankscope.measures.alignment_batched import batch_key

FLOAT32_EPS = float(torch.finfo(torch.float32).eps)


def dense_alignment(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """Principal angles of the top-k singular subspaces (torch.linalg.svd of each ΔW, numpy's matrix_rank rule)
    and the Frobenius cosine of the dense matrices."""

    def bases(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        u, sigma, vh = torch.linalg.svd(matrix, full_matrices=False)
        rank = int((sigma > sigma[0] * max(matrix.shape) * FLOAT32_EPS).sum())
        return u[:, :rank], vh.mT[:, :rank]

    (ua, va), (ub, vb) = bases(a), bases(b)
    out = {"cosine": float((a * b).sum() / (a.norm() * b.norm()))}
    for side, x, y, dim in (("left", ua, ub, a.shape[0]), ("right", va, vb, a.shape[1])):
        k = min(x.shape[1], y.shape[1])
        cross = x[:, :k].mT @ y[:, :k]
        degrees = torch.rad2deg(torch.arccos(torch.linalg.svdvals(cross).clamp(0, 1)))
        out[f"{side}_overlap"] = float(cross.pow(2).sum()) / k
        out[f"{side}_baseline"] = k / dim
        out[f"{side}_min_angle"] = float(degrees.min())
        out[f"{side}_mean_angle"] = float(degrees.mean())
    return out


def ill_conditioned(rows: int, cols: int, condition: float, g: torch.Generator) -> torch.Tensor:
    u, _ = torch.linalg.qr(torch.randn(rows, cols, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, cols, generator=g, dtype=torch.float64))
    return (u * torch.logspace(0, -math.log10(condition), cols, dtype=torch.float64)) @ v.T


def hydra_layers(g: torch.Generator, m: int = 96, n: int = 72, r: int = 5) -> list[list[FactoredUpdate]]:
    """Four layers of three heads s·B_i·A sharing one bf16 A: plain heads; one head ill-conditioned (its side takes
    Householder QR, the others CholeskyQR, in the same batch); two nearly parallel heads; a zero head (B = 0)."""
    layers = []
    for case in range(4):
        a = torch.randn(r, n, generator=g).to(torch.bfloat16)
        heads = [torch.randn(m, r, generator=g) for _ in range(3)]
        if case == 1:
            heads[1] = ill_conditioned(m, r, 1e6, g).float()
        if case == 2:
            heads[2] = heads[0] + 1e-3 * torch.randn(m, r, generator=g)
        if case == 3:
            heads[1] = torch.zeros(m, r)
        layers.append([FactoredUpdate(b, a, scale=2.0) for b in heads])
    return layers


def shared_left_layers(g: torch.Generator, m: int = 64, n: int = 80) -> list[list[FactoredUpdate]]:
    """Three layers whose components share the left factor, with cores, per-dimension scales and float64 factors;
    one right factor ill-conditioned (Householder on the side whose factors meet by a product)."""
    layers = []
    for case in range(3):
        b = torch.randn(m, 4, generator=g, dtype=torch.float64)
        a = ill_conditioned(n, 4, 1e6, g).T.float() if case == 0 else torch.randn(4, n, generator=g)  # Householder
        layers.append([
            FactoredUpdate(b, a, core=torch.randn(4, 4, generator=g, dtype=torch.float64),
                           scale=torch.tensor([1.0, 0.5, 2.0, 0.25])),
            FactoredUpdate(b, torch.randn(4, n, generator=g).to(torch.float16), scale=0.75),
        ])  # fmt: skip
    return layers


def shared_householder_layers(g: torch.Generator, m: int = 80, n: int = 60, r: int = 4) -> list[list[FactoredUpdate]]:
    """Two layers of two heads sharing a float32 A, the first one's A ill-conditioned: a shared factor whose
    cross-Gram with itself is taken from its (Householder) R alone."""
    layers = []
    for case in range(2):
        a = ill_conditioned(n, r, 1e6, g).T.float() if case == 0 else torch.randn(r, n, generator=g)
        layers.append([FactoredUpdate(torch.randn(m, r, generator=g), a, scale=0.5) for _ in range(2)])
    return layers


@pytest.mark.parametrize("cached", [True, False])
def test_batched_alignment_matches_dense_references(cached: bool, monkeypatch) -> None:
    g = torch.Generator().manual_seed(11)
    layers = hydra_layers(g) + shared_left_layers(g) + shared_householder_layers(g)
    assert len({batch_key(updates) for updates in layers}) == 3  # one batch per layout
    assert update_r_factors(layers[1])[2] == ["cholesky", "householder", "cholesky"]  # a mixed batch
    assert update_r_factors(layers[4])[3] == ["householder", "cholesky"]
    assert update_r_factors(layers[7])[3] == ["householder", "householder"]

    def refuse(updates):  # the batched path must answer, not the one-by-one one
        raise AssertionError("the one-by-one path was taken")

    monkeypatch.setattr(alignment, "_from_factors", refuse)
    FACTOR_CACHE.clear()
    if cached:
        singular_values([u for updates in layers for u in updates])  # the spectra fill the cache
    results = alignment.factored_pairwise_alignments([(updates, None) for updates in layers])
    for updates, got in zip(layers, results, strict=True):
        dense = [u.materialize().double() for u in updates]
        zero = {i for i, d in enumerate(dense) if not bool(d.any())}
        for i in range(len(updates)):
            for j in range(len(updates)):
                if i in zero or j in zero:
                    assert all(got[key][i][j] is None for key in got), (i, j)
                    continue
                for key, value in dense_alignment(dense[i], dense[j]).items():
                    tolerance = 1e-5 if key.endswith("angle") else 1e-9  # degrees near 0 are arccos-limited
                    assert abs(got[key][i][j] - value) <= tolerance, (cached, i, j, key, got[key][i][j], value)


def test_batched_and_one_by_one_paths_agree() -> None:
    g = torch.Generator().manual_seed(12)
    layers = hydra_layers(g)
    FACTOR_CACHE.clear()
    batched = alignment.factored_pairwise_alignments([(updates, None) for updates in layers])
    for updates, got in zip(layers, batched, strict=True):
        one = alignment._matrices(alignment._from_factors(updates), updates[0].shape)
        for key, rows in one.items():
            for expected_row, got_row in zip(rows, got[key], strict=True):
                for expected, value in zip(expected_row, got_row, strict=True):
                    assert (expected is None) == (value is None), key
                    if expected is not None:
                        assert value == pytest.approx(expected, abs=1e-5 if key.endswith("angle") else 1e-12), key
