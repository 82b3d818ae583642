"""LoHa and LoKr maths shared by the PEFT readers (``loha.py``, ``lokr.py``) and the kohya / LyCORIS reader.

PEFT's LoHa/LoKr layers are ports of LyCORIS's: the tensor names, their shapes and ΔW are the same in both;
only the scale rules differ, and those stay in the readers. Everything here is a pure function of tensors.

**LoHa** (FedPara): ΔW = s·(W1 ⊙ W2), W_i = P_i·Q_i (P_i m×r, Q_i r×n). By the face-splitting identity

    (P1·Q1) ⊙ (P2·Q2) = (P1 ⊙ᵣ P2)·(Q1 ⊙꜀ Q2)

with P1 ⊙ᵣ P2 the row-wise Kronecker product (m×r², row i = P1[i] ⊗ P2[i]) and Q1 ⊙꜀ Q2 the column-wise
Khatri–Rao product (r²×n, column j = Q1[:, j] ⊗ Q2[:, j]), ΔW is an exact rank-≤r² product whose spectrum
comes from an r²×r² core. Both r²-wide factors stay recipes (``core.formed.FaceSplit``), formed exactly in
float64 only while the spectrum reads them, never held for every layer. Where r² ≥ min(m, n) the factored form
is no cheaper than ΔW itself, so ΔW is materialised instead (a dense recipe, exact in float64).

Stored forms of W_i = P_i·Q_i (matrix (out, in·∏k)):

- flattened: ``hada_w{i}_a`` (out, r) = P_i, ``hada_w{i}_b`` (r, in·∏k) = Q_i;
- Tucker / ``use_effective_conv2d``: ``hada_t{i}`` (r, r, *k), ``hada_w{i}_a`` (r, out), ``hada_w{i}_b`` (r, in)
  with W_i[p, c, κ] = Σ_{a,b} t[a, b, κ]·w_a[a, p]·w_b[b, c] (PEFT's einsum "ijkl,jr,ip->prkl"), i.e.
  P_i = w_aᵀ and Q_i = tucker_right(t, w_b) — still exact and factored.

**LoKr**: ΔW = s·(W1 ⊗ W2) reshaped to W0; as the analysed (out, in·∏k) matrix it is W1 ⊗ W2.reshape(b, d·∏k)
(W1 (a, c), W2 (b, d, *k), out = a·b, in = c·d), whose singular values are the products σ_i(W1)·σ_j(W2).
W1 is ``lokr_w1`` or ``lokr_w1_a``·``lokr_w1_b``; W2 is ``lokr_w2``, ``lokr_w2_a``·``lokr_w2_b`` or, in Tucker
form, W2[p, c, κ] = Σ t2[a, b, κ]·w2_a[a, p]·w2_b[b, c] (einsum "ijkl,ip,jr->prkl").
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ...core.base import BaseWeights
from ...core.formed import FaceSplit, FormedUpdate
from ...core.update import DenseUpdate, FactoredUpdate, KroneckerUpdate, upcast
from .peft import nonfinite_problem

LOHA_ROLES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_ROLES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")

Stored = Mapping[str, tuple[str, torch.Tensor]]
"""One module's tensors: role (``hada_w1_a`` …) → (stored key, tensor)."""


class FactorError(ValueError):
    """The stored factors of one module do not fit together; the message starts with the offending key."""


def check_finite(stored: Stored) -> None:
    for key, tensor in stored.values():
        problem = nonfinite_problem(tensor, key)
        if problem:
            raise FactorError(problem)


def tucker_right(core: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """M (r, n·∏k) with M[a, (c, κ)] = Σ_b core[a, b, κ]·factor[b, c], in float64.

    For core (r, r', *k) and factor (r', n): the right factor of a Tucker (CP) conv update
    W[p, c, κ] = Σ_{a,b} core[a, b, κ]·left[a, p]·factor[b, c], which is W.reshape(out, -1) = leftᵀ·M.
    """
    rank = core.shape[0]
    return torch.einsum("ab...,bc->ac...", upcast(core), upcast(factor)).reshape(rank, -1)


def hadamard_update(
    first: tuple[torch.Tensor, torch.Tensor], second: tuple[torch.Tensor, torch.Tensor], scale: float
) -> FactoredUpdate | DenseUpdate:
    """ΔW = scale·((P1·Q1) ⊙ (P2·Q2)): factored through the face-splitting identity while r1·r2 < min(m, n)."""
    (p1, q1), (p2, q2) = first, second
    m, n = p1.shape[0], q1.shape[1]
    inner = p1.shape[1] * p2.shape[1]
    if inner < min(m, n):  # the r² wide factors stay recipes, formed (exactly, in float64) as the spectrum reads them
        return FormedUpdate(FaceSplit(p1, p2), FaceSplit(q1.mT, q2.mT), scale=scale)

    def build(dtype: torch.dtype, device, factor: float = scale) -> torch.Tensor:
        w1 = upcast(p1, dtype, device) @ upcast(q1, dtype, device)
        w2 = upcast(p2, dtype, device) @ upcast(q2, dtype, device)
        return (w1 * w2) * factor

    return DenseUpdate(
        shape=(m, n),
        build=build,
        rank_bound_value=min(inner, m, n),
        scale=scale,
        build_unscaled=lambda dtype, device: build(dtype, device, 1.0),
    )


# -- LoHa --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LohaFactors:
    """A LoHa module's two Hadamard factors as products P·Q of the (out, in·∏k) matrix, validated."""

    first: tuple[torch.Tensor, torch.Tensor]
    second: tuple[torch.Tensor, torch.Tensor]
    rank: int
    out_features: int
    in_features: int  # in_channels for a conv whose kernel is known, else the flattened width
    kernel: tuple[int, ...]  # () where the stored form does not show it (Linear, or a flattened conv)
    params: int


def _rank_mismatch(a_key: str, a: torch.Tensor, b_key: str, b: torch.Tensor) -> FactorError:
    return FactorError(f"{b_key}: rank mismatch: {a_key} has r={a.shape[1]} columns but {b_key} has {b.shape[0]} rows")


def _need(stored: Stored, role: str, module: str) -> tuple[str, torch.Tensor]:
    if role not in stored:
        have = next(iter(stored.values()))[0]
        raise FactorError(f"{have}: has no matching {module}.{role}")
    return stored[role]


def _loha_factor(stored: Stored, i: int, module: str) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...], int]:
    """(P, Q, kernel, in_channels) of Hadamard factor i."""
    a_key, a = _need(stored, f"hada_w{i}_a", module)
    b_key, b = _need(stored, f"hada_w{i}_b", module)
    if a.ndim != 2 or b.ndim < 2:
        key, bad = (a_key, a) if a.ndim != 2 else (b_key, b)
        raise FactorError(f"{key}: expected a matrix, found shape {list(bad.shape)}")
    t_role = f"hada_t{i}"
    if t_role in stored:
        t_key, t = stored[t_role]
        if t.ndim < 3 or b.ndim != 2 or (t.shape[0], t.shape[1]) != (a.shape[0], b.shape[0]):
            raise FactorError(
                f"{t_key}: shape {list(t.shape)} does not fit {a_key} {list(a.shape)} (r, out) and "
                f"{b_key} {list(b.shape)} (r, in)"
            )
        return a.mT, tucker_right(t, b), tuple(t.shape[2:]), int(b.shape[1])
    if a.shape[1] != b.shape[0]:
        raise _rank_mismatch(a_key, a, b_key, b)
    return a, b.reshape(b.shape[0], -1), tuple(b.shape[2:]), int(b.shape[1])


def loha_factors(stored: Stored, module: str) -> LohaFactors:
    """Validate a LoHa module's tensors (``hada_w1_a`` … ``hada_t2``) and return its factors."""
    if ("hada_t1" in stored) != ("hada_t2" in stored):
        key = stored.get("hada_t1", stored.get("hada_t2"))[0]
        raise FactorError(f"{key}: a Tucker LoHa needs both hada_t1 and hada_t2")
    check_finite(stored)
    p1, q1, kernel, width = _loha_factor(stored, 1, module)
    p2, q2, kernel2, _ = _loha_factor(stored, 2, module)
    key2 = stored["hada_w2_b"][0]
    if p1.shape != p2.shape or q1.shape != q2.shape or kernel != kernel2:
        raise FactorError(
            f"{key2}: the second Hadamard factor ({p2.shape[0]}×{q2.shape[1]}, r={p2.shape[1]}) does not match the "
            f"first ({p1.shape[0]}×{q1.shape[1]}, r={p1.shape[1]})"
        )
    if p1.shape[1] == 0:
        raise FactorError(f"{stored['hada_w1_b'][0]}: rank 0 (an empty factor)")
    params = sum(t.numel() for _, t in stored.values())
    return LohaFactors((p1, q1), (p2, q2), int(p1.shape[1]), int(p1.shape[0]), width, kernel, params)


def loha_update(factors: LohaFactors, scale: float) -> FactoredUpdate | DenseUpdate:
    return hadamard_update(factors.first, factors.second, scale)


# -- LoKr --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LokrFactors:
    """A LoKr module's Kronecker factors W1 (a, c) and W2 (b, d, *k), validated.

    ``first``/``second`` are the factors as updates of their matrices (W2 as (b, d·∏k)); ``rank`` is the r of
    the decomposed factor(s), None when both are stored in full; ``second_full`` is the stored full W2.
    """

    first: FactoredUpdate | DenseUpdate
    second: FactoredUpdate | DenseUpdate
    rank: int | None
    out_features: int
    in_features: int
    kernel: tuple[int, ...]
    params: int
    second_full: torch.Tensor | None


def dense_matrix(tensor: torch.Tensor, scale: float | None = None) -> DenseUpdate:
    """A tensor stored in full (out, in[, *k]) as the dense update of its (out, in·∏k) matrix."""
    rows = int(tensor.shape[0])
    matrix = tensor.reshape(rows, -1)
    return DenseUpdate(
        shape=(rows, int(matrix.shape[1])), build=lambda dtype, device: upcast(matrix, dtype, device), scale=scale
    )


def _lokr_first(stored: Stored, module: str) -> tuple[FactoredUpdate | DenseUpdate, int | None]:
    if "lokr_w1" in stored:
        if "lokr_w1_a" in stored or "lokr_w1_b" in stored:
            raise FactorError(f"{stored['lokr_w1'][0]}: stored both in full and as lokr_w1_a·lokr_w1_b")
        key, w1 = stored["lokr_w1"]
        if w1.ndim != 2:
            raise FactorError(f"{key}: expected a matrix, found shape {list(w1.shape)}")
        return dense_matrix(w1), None
    a_key, a = _need(stored, "lokr_w1_a", module)
    b_key, b = _need(stored, "lokr_w1_b", module)
    if a.ndim != 2 or b.ndim != 2:
        key, bad = (a_key, a) if a.ndim != 2 else (b_key, b)
        raise FactorError(f"{key}: expected a matrix, found shape {list(bad.shape)}")
    if a.shape[1] != b.shape[0]:
        raise _rank_mismatch(a_key, a, b_key, b)
    return FactoredUpdate(a, b), int(a.shape[1])


def _lokr_second(
    stored: Stored, module: str
) -> tuple[FactoredUpdate | DenseUpdate, int | None, tuple[int, ...], int, torch.Tensor | None]:
    """(W2 as an update of its (b, d·∏k) matrix, r, kernel, d, the full tensor if stored in full)."""
    if "lokr_w2" in stored:
        if any(role in stored for role in ("lokr_w2_a", "lokr_w2_b", "lokr_t2")):
            raise FactorError(f"{stored['lokr_w2'][0]}: stored both in full and as lokr_w2_a·lokr_w2_b")
        key, w2 = stored["lokr_w2"]
        if w2.ndim < 2:
            raise FactorError(f"{key}: expected a matrix or a conv kernel, found shape {list(w2.shape)}")
        return dense_matrix(w2), None, tuple(w2.shape[2:]), int(w2.shape[1]), w2
    a_key, a = _need(stored, "lokr_w2_a", module)
    b_key, b = _need(stored, "lokr_w2_b", module)
    if a.ndim != 2 or b.ndim < 2:
        key, bad = (a_key, a) if a.ndim != 2 else (b_key, b)
        raise FactorError(f"{key}: expected a matrix, found shape {list(bad.shape)}")
    if "lokr_t2" in stored:
        t_key, t = stored["lokr_t2"]
        if t.ndim < 3 or b.ndim != 2 or (t.shape[0], t.shape[1]) != (a.shape[0], b.shape[0]):
            raise FactorError(
                f"{t_key}: shape {list(t.shape)} does not fit {a_key} {list(a.shape)} (r, b) and "
                f"{b_key} {list(b.shape)} (r, d)"
            )
        return FactoredUpdate(a.mT, tucker_right(t, b)), int(t.shape[0]), tuple(t.shape[2:]), int(b.shape[1]), None
    if a.shape[1] != b.shape[0]:
        raise _rank_mismatch(a_key, a, b_key, b)
    # newer LyCORIS stores a conv's w2_b as (r, d, *k); older ones and PEFT as (r, d·∏k)
    right = b.reshape(b.shape[0], -1)
    return FactoredUpdate(a, right), int(a.shape[1]), tuple(b.shape[2:]), int(b.shape[1]), None


def lokr_factors(stored: Stored, module: str) -> LokrFactors:
    """Validate a LoKr module's tensors (``lokr_w1`` … ``lokr_t2``) and return its factors."""
    check_finite(stored)
    first, rank1 = _lokr_first(stored, module)
    second, rank2, kernel, d, second_full = _lokr_second(stored, module)
    if rank1 is not None and rank2 is not None and rank1 != rank2:
        raise FactorError(
            f"{stored['lokr_w2_b'][0]}: rank mismatch: lokr_w1 is decomposed with r={rank1}, lokr_w2 with r={rank2}"
        )
    if 0 in (rank1, rank2):
        raise FactorError(f"{stored['lokr_w1_b' if rank1 == 0 else 'lokr_w2_b'][0]}: rank 0 (an empty factor)")
    (a, c), (b, _) = first.shape, second.shape
    params = sum(t.numel() for _, t in stored.values())
    rank = rank1 if rank1 is not None else rank2
    return LokrFactors(first, second, rank, a * b, c * d, kernel, params, second_full)


def lokr_update(
    factors: LokrFactors, scale: float, *, peft_conv1d_layout: bool = False
) -> KroneckerUpdate | DenseUpdate:
    """ΔW = scale·(W1 ⊗ W2.reshape(b, d·∏k)), exact from the factors' spectra.

    ``peft_conv1d_layout``: PEFT 0.21's LoKr builds a Conv1d ΔW whose W2 is stored in full as (b, d, k) with
    ``torch.kron`` of a 2-D and a 3-D tensor, which pairs the indices differently: the matrix it applies is
    M[(j, i), (l, k', κ)] = W1[i, k']·W2[j, l, κ] — a row and column permutation of W1 ⊗ W2.reshape(b, d·k),
    with the same singular values but other singular vectors. That layout is materialised as PEFT applies it.
    """
    full = factors.second_full
    if peft_conv1d_layout and full is not None and full.ndim == 3:
        first = factors.first
        a, c = first.shape
        b, d, k = full.shape

        def build(dtype: torch.dtype, device, factor: float = scale) -> torch.Tensor:
            w1 = first.materialize(dtype, device)
            w2 = upcast(full, dtype, device)
            return torch.einsum("ic,jlk->jilck", w1, w2).reshape(b * a, d * c * k) * factor

        return DenseUpdate(
            shape=(a * b, c * d * k),
            build=build,
            rank_bound_value=first.rank_bound * factors.second.rank_bound,
            scale=scale,
            build_unscaled=lambda dtype, device: build(dtype, device, 1.0),
        )
    return KroneckerUpdate(factors.first, factors.second, scale=scale)


# -- what a reader reports -----------------------------------------------------------------------------------


def kind_of(shape: tuple[int, ...]) -> str:
    """``linear`` for a 2-D weight, ``conv{n}d`` for (out, in, *k) — the module kinds LyCORIS adapts."""
    return "linear" if len(shape) == 2 else f"conv{len(shape) - 2}d"


def layer_shape(
    base: BaseWeights | None, name: str, out_features: int, in_features: int, kernel: tuple[int, ...], width: int
) -> tuple[tuple[int, ...], str]:
    """The stored base-weight shape and the layer kind.

    The stored factors show a conv's kernel only in Tucker form or as a full 4-D factor; a 2-D form serves a
    Linear layer and a flattened conv alike, so it is reported as ``matrix`` of shape (out, ``width``) unless
    the base model (``--base``) says which. ``width`` is the analysed matrix's column count (in·∏k).
    """
    if base is not None and base.key_for(name) is not None:
        shape = tuple(base.get(name).shape)
        if len(shape) >= 2 and shape[0] == out_features and math.prod(shape[1:]) == width:
            return shape, kind_of(shape)
        raise FactorError(
            f"the base weight has shape {list(shape)}, which does not fit ΔW of shape [{out_features}, {width}]"
        )
    if kernel:
        return (out_features, in_features, *kernel), kind_of((out_features, in_features, *kernel))
    return (out_features, width), "matrix"
