"""Metrics on spectra with known answers, numpy's rank rule, and DESIGN.md's inequality chain."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rankscope.measures import metrics as M


def test_flat_spectrum_has_every_rank_equal_to_its_length():
    sigma = torch.ones(4)
    assert M.erank(sigma) == pytest.approx(4)
    assert M.erank_energy(sigma) == pytest.approx(4)
    assert M.stable_rank(sigma) == pytest.approx(4)
    assert M.participation_ratio(sigma) == pytest.approx(4)
    assert M.energy_rank(sigma, 0.9) == 4
    assert M.energy_rank(sigma, 0.75) == 3
    assert M.count_above(sigma, 0.5) == 4
    assert M.utilization(M.erank(sigma), 8) == pytest.approx(0.5)


def test_single_direction_has_rank_one():
    sigma = torch.tensor([2.0, 0.0, 0.0])
    for f in (M.erank, M.erank_energy, M.stable_rank, M.participation_ratio):
        assert f(sigma) == pytest.approx(1)
    assert M.energy_rank(sigma, 0.99) == 1
    assert M.count_above(sigma, 0.005) == 1
    assert M.energy(sigma) == pytest.approx(4)
    assert M.frobenius(sigma) == pytest.approx(2)
    assert M.sigma_max(sigma) == 2


def test_zero_update_gives_zeros_never_nan():
    sigma = torch.zeros(8)
    values = M.spectrum_metrics(sigma, (16, 16), 8)
    flat = [values[k] for k in values if not isinstance(values[k], dict)]
    flat += [v for k in values if isinstance(values[k], dict) for v in values[k].values()]
    assert all(v == 0 for v in flat), values
    assert M.spectrum_metrics(torch.zeros(0), (4, 4), 0)["utilization"] == 0


def test_known_values():
    sigma = torch.tensor([1.0, 0.5])
    p = [2 / 3, 1 / 3]
    assert M.erank(sigma) == pytest.approx(math.exp(-sum(x * math.log(x) for x in p)))
    e = [0.8, 0.2]
    assert M.erank_energy(sigma) == pytest.approx(math.exp(-sum(x * math.log(x) for x in e)))
    assert M.stable_rank(sigma) == pytest.approx(1.25)
    assert M.participation_ratio(sigma) == pytest.approx(1.25**2 / (1 + 0.0625))
    assert M.frobenius(torch.tensor([3.0, 4.0])) == pytest.approx(5)


def test_energy_rank_boundaries():
    sigma = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64).sqrt()  # energies 0.5, 0.3, 0.2
    assert M.energy_rank(sigma, 0.5) == 1
    assert M.energy_rank(sigma, 0.8) == 2
    assert M.energy_rank(sigma, 0.81) == 3
    assert M.energy_rank(sigma, 1.0) == 3
    with pytest.raises(ValueError):
        M.energy_rank(sigma, 1.5)


def test_relative_and_absolute_counts():
    sigma = torch.tensor([10.0, 0.1, 0.006, 0.004, 0.0001])
    assert M.count_above(sigma, 0.005) == 3
    assert M.count_above_rel(sigma, 0.001) == 2  # > 0.01
    assert M.count_above_rel(sigma, 1e-6) == 5


@pytest.mark.parametrize("shape", [(100, 100), (4096, 64), (10, 3000)])
def test_numerical_rank_is_numpys_rule_for_a_float32_matrix(shape):
    m, n = shape
    k = min(m, n)
    sigma = np.zeros(k)
    sigma[:6] = [1.0, 1e-2, 1e-4, 5e-5, 2e-5, 1e-9]
    sigma = sigma[:k]
    matrix = np.zeros((m, n), dtype=np.float32)
    matrix[np.arange(k), np.arange(k)] = sigma
    assert M.numerical_rank(torch.tensor(sigma), shape) == np.linalg.matrix_rank(matrix)


def test_order_of_the_input_does_not_matter():
    sigma = torch.tensor([0.1, 3.0, 1.0])
    assert M.sigma_max(sigma) == 3.0
    assert M.energy_rank(sigma, 0.9) == M.energy_rank(torch.tensor([3.0, 1.0, 0.1]), 0.9)


def test_parametrised_keys_are_python_str_of_float():
    values = M.spectrum_metrics(
        torch.ones(3), (8, 8), 3, thresholds=(0.005, 1), energies=(0.9,), rel_thresholds=(1e-3,)
    )
    assert list(values["count_above"]) == ["0.005", "1.0"]
    assert list(values["energy_rank"]) == ["0.9"]
    assert list(values["count_above_rel"]) == ["0.001"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.floats(1e-12, 1e6), min_size=1, max_size=64))
def test_inequality_chain(values):
    sigma = torch.tensor(values, dtype=torch.float64)
    nonzero = int((sigma > 0).sum())
    chain = [M.stable_rank(sigma), M.participation_ratio(sigma), M.erank_energy(sigma), M.erank(sigma), nonzero]
    for smaller, larger in itertools.pairwise(chain):
        assert smaller <= larger * (1 + 1e-9), chain
    assert chain[0] >= 1 - 1e-9


# -- many spectra at once (the one implementation), held to a plain-Python reference -------------------------------
def reference_metrics(sigma, shape, bound, thresholds, energies, rel_thresholds) -> dict:
    """Every metric from its formula, on Python floats, written independently of rankscope's tensor code."""
    s = sorted((abs(float(v)) for v in sigma), reverse=True)
    top = s[0] if s else 0.0
    ratios = [v / top for v in s] if top > 0 else []
    squares = [r * r for r in ratios]
    total = float(sum(squares))

    def entropy_exp(shares):
        return math.exp(-sum(p * math.log(p) for p in shares if p > 0)) if shares else 0.0

    def energy_rank(p):
        if not squares:
            return 0
        running, below = 0.0, 0
        for e in squares:
            running += e
            below += running < p * total * (1 - 4 * 2.0**-52)
        return min(below + 1, sum(e > 0 for e in squares))

    effective = entropy_exp([r / sum(ratios) for r in ratios])
    energy = float(sum(v * v for v in s))
    return {
        "count_above": {str(float(t)): sum(v > t for v in s) for t in thresholds},
        "count_above_rel": {str(float(r)): sum(x > r for x in ratios) for r in rel_thresholds},
        "energy_rank": {str(float(p)): energy_rank(p) for p in energies},
        "erank": effective,
        "erank_energy": entropy_exp([e / total for e in squares]),
        "stable_rank": total,
        "participation_ratio": total**2 / sum(e * e for e in squares) if squares else 0.0,
        "numerical_rank": sum(x > max(shape) * float(np.finfo(np.float32).eps) for x in ratios),
        "utilization": effective / bound if bound > 0 else 0.0,
        "frobenius": math.sqrt(energy),
        "sigma_max": top,
        "energy": energy,
    }


def assert_same_metrics(batched: dict, single: dict) -> None:
    assert list(batched) == list(single)  # the JSON contract's key order
    for key, expected in single.items():
        got = batched[key]
        if isinstance(expected, dict):
            assert list(got) == list(expected), key
            assert got == expected, key  # counts and ranks: integers, equal
        elif isinstance(expected, int):
            assert got == expected and isinstance(got, int), key
        else:
            assert isinstance(got, float), key
            assert got == pytest.approx(expected, rel=1e-12, abs=1e-300), key


spectra = st.lists(
    st.one_of(st.just(0.0), st.floats(1e-12, 1e6), st.sampled_from([1.0, 0.5, 0.005, 1e-3])),
    min_size=0,
    max_size=20,
)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(spectra, min_size=1, max_size=12),
    st.lists(st.floats(0, 2), min_size=1, max_size=3),
    st.lists(st.floats(0.01, 1.0), min_size=1, max_size=3),
    st.lists(st.floats(0, 0.5), min_size=1, max_size=2),
    st.integers(1, 5000),
)
def test_batched_and_single_metrics_equal_the_reference(values, thresholds, energies, rel_thresholds, dim):
    sigmas = [torch.tensor(v, dtype=torch.float64) for v in values]
    shapes = [(dim + i, max(len(v), 1)) for i, v in enumerate(values)]
    bounds = [len(v) for v in values]
    options = {"thresholds": thresholds, "energies": energies, "rel_thresholds": rel_thresholds}
    batched = M.spectrum_metrics_batch(sigmas, shapes, bounds, **options)
    assert len(batched) == len(sigmas)
    for got, sigma, shape, bound in zip(batched, sigmas, shapes, bounds, strict=True):
        expected = reference_metrics(sigma.tolist(), shape, bound, thresholds, energies, rel_thresholds)
        assert_same_metrics(got, expected)
        assert_same_metrics(M.spectrum_metrics(sigma, shape, bound, **options), expected)


def test_batched_metrics_edge_cases():
    sigmas = [torch.zeros(4), torch.zeros(0), torch.ones(4), torch.tensor([3.0, 0.0, 0.0, 1.0]), torch.tensor([2.0])]
    shapes = [(16, 16), (4, 4), (8, 8), (100, 10), (5, 5)]
    bounds = [4, 0, 4, 4, 1]
    options = {"thresholds": (0.0, 0.005, 1.0), "energies": (0.5, 0.75, 1.0), "rel_thresholds": (0.0, 0.5)}
    for got, sigma, shape, bound in zip(M.spectrum_metrics_batch(sigmas, shapes, bounds, **options), sigmas,
                                        shapes, bounds, strict=True):  # fmt: skip
        assert_same_metrics(got, reference_metrics(sigma.tolist(), shape, bound, **options))
    with pytest.raises(ValueError):
        M.spectrum_metrics_batch([torch.ones(2)], [(2, 2)], [2], energies=(1.5,))


def test_analysis_records_carry_the_per_spectrum_metrics(tmp_path):
    import rankscope

    from .factories import llama_like

    analysis = rankscope.analyze(rankscope.load(llama_like(tmp_path / "a", layers=3, hidden=24, rank=4)),
                                 thresholds=(0.005, 0.5), energies=(0.9,))  # fmt: skip
    assert len(analysis) == 6
    for record in analysis:
        sigma = torch.tensor(record.singular_values, dtype=torch.float64)
        expected = M.spectrum_metrics(sigma, record.matrix_shape, record.rank_bound, thresholds=(0.005, 0.5),
                                      energies=(0.9,))  # fmt: skip
        assert_same_metrics(record.metrics, expected)
