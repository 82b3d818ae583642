"""Concentration of a weight vector against values worked out by hand from the definitions (p_i = |w_i|/Σ|w|):
normalised entropy H/ln k, effective number 1/Σp², Gini Σ|p_i − p_j|/(2k) over ordered pairs, max share, and
KL from uniform ln k − H."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rankscope.measures import concentration as C

MEASURES = ("normalized_entropy", "effective_number", "gini", "max_share", "kl_from_uniform")


@pytest.mark.parametrize("k", [2, 3, 7])
def test_uniform(k):
    result = C.concentration([0.4] * k)
    assert result["normalized_entropy"] == pytest.approx(1.0, abs=1e-12)
    assert result["effective_number"] == pytest.approx(k, rel=1e-12)
    assert result["gini"] == pytest.approx(0.0, abs=1e-12)
    assert result["max_share"] == pytest.approx(1 / k, rel=1e-12)
    assert result["kl_from_uniform"] == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("k", [2, 3, 7])
def test_one_hot(k):
    weights = [0.0] * k
    weights[k // 2] = 2.5
    result = C.concentration(weights)
    assert result["normalized_entropy"] == pytest.approx(0.0, abs=1e-12)
    assert result["effective_number"] == pytest.approx(1.0, rel=1e-12)
    assert result["gini"] == pytest.approx((k - 1) / k, rel=1e-12)
    assert result["max_share"] == 1.0
    assert result["kl_from_uniform"] == pytest.approx(math.log(k), rel=1e-12)


def test_worked_example():
    # w = (0.2, 0.5, 0.3): p = w (Σ = 1)
    # H = −(0.2 ln 0.2 + 0.5 ln 0.5 + 0.3 ln 0.3) = 0.321888 + 0.346574 + 0.361192 = 1.029653 nats
    # H / ln 3 = 1.029653 / 1.098612 = 0.937231;  1/Σp² = 1/(0.04 + 0.25 + 0.09) = 1/0.38 = 2.631579
    # Gini: |0.2−0.5| + |0.2−0.3| + |0.5−0.3| = 0.6 over unordered pairs, 1.2 over ordered; 1.2/(2·3) = 0.2
    # KL = ln 3 − H = 0.068959
    result = C.concentration([0.2, 0.5, 0.3])
    assert result["normalized_entropy"] == pytest.approx(0.937231, abs=1e-6)
    assert result["effective_number"] == pytest.approx(2.631579, abs=1e-6)
    assert result["gini"] == pytest.approx(0.2, abs=1e-12)
    assert result["max_share"] == pytest.approx(0.5)
    assert result["kl_from_uniform"] == pytest.approx(0.068959, abs=1e-6)


def test_shares_are_of_magnitudes():
    # w = (3, −1): p = (0.75, 0.25); H = 0.562335; 1/Σp² = 1/0.625 = 1.6; Gini = 2·0.5/(2·2) = 0.25
    result = C.concentration([3.0, -1.0])
    assert result["normalized_entropy"] == pytest.approx(0.562335 / math.log(2), abs=1e-6)
    assert result["effective_number"] == pytest.approx(1.6)
    assert result["gini"] == pytest.approx(0.25)
    assert result["max_share"] == pytest.approx(0.75)
    assert C.shares([3.0, -1.0]).tolist() == [0.75, 0.25]
    negated = C.concentration([-0.2, -0.5, 0.3])
    assert negated == pytest.approx(C.concentration([0.2, 0.5, 0.3]))


def test_tensor_input_matches_list_input():
    weights = [0.1, 0.7, 0.05, 0.15]
    assert C.concentration(torch.tensor(weights, dtype=torch.float32)) == pytest.approx(
        C.concentration(weights), rel=1e-6
    )


def test_single_weight():
    result = C.concentration([-0.3])
    assert result["normalized_entropy"] == 0.0
    assert result["effective_number"] == 1.0
    assert result["gini"] == 0.0
    assert result["max_share"] == 1.0
    assert result["kl_from_uniform"] == 0.0


@pytest.mark.parametrize("weights", [[0.0], [0.0, 0.0, 0.0], [0.0, -0.0]])
def test_all_zero_weights_have_no_distribution(weights):
    assert C.shares(weights) is None
    assert C.concentration(weights) == dict.fromkeys(MEASURES)


weight_vectors = st.lists(
    st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_subnormal=False), min_size=1, max_size=24
).filter(lambda ws: sum(abs(w) for w in ws) > 1e-300)


@settings(max_examples=200, deadline=None)
@given(weight_vectors)
def test_bounds_hold_for_any_weights(weights):
    k = len(weights)
    result = C.concentration(weights)
    assert 1.0 - 1e-9 <= result["effective_number"] <= k * (1 + 1e-9)
    assert -1e-12 <= result["normalized_entropy"] <= 1.0 + 1e-9
    assert -1e-12 <= result["gini"] < 1.0
    assert 1 / k - 1e-12 <= result["max_share"] <= 1.0 + 1e-12
    assert result["kl_from_uniform"] >= -1e-9
    # KL and the normalised entropy are one quantity seen two ways: KL = ln k·(1 − H/ln k)
    assert result["kl_from_uniform"] == pytest.approx(math.log(k) * (1 - result["normalized_entropy"]), abs=1e-9)
    # scaling and sign flips change nothing: only |w|/Σ|w| matters
    assert C.concentration([-3.0 * w for w in weights]) == pytest.approx(result, rel=1e-9, abs=1e-12)
