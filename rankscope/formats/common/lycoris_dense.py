"""LyCORIS updates that are not plain low-rank products, as LyCORIS 4.1's forward applies them (multiplier 1).

**full** (``algo=full``): ``<name>.diff`` is ΔW itself, in the weight's own shape (out, in[, *k]), and
``<name>.diff_b`` the bias update; no α (``FullModule`` adds them to W0 and b0 unscaled). A dense update,
exact in float64.

**GLoRA** (``a1``, ``a2``, ``b1``, ``b2`` ``.weight``; ``bm`` for a Tucker b): LyCORIS's ``_glora_weight`` is
ΔW = s·(W0·a1·a2 + b1·b2) with a1 (in, r), a2 (r, in), b1 (out, r), b2 (r, in·∏k) and s = alpha/r. For a conv the
a-product acts on W0's input-channel axis for every kernel position (``einsum("o i ..., i j -> o j ...")``), so on
the analysed (out, in·∏k) matrix it is W0·(a1·a2 ⊗ I_K), K = ∏k. As a product,

    ΔW = s·[b1, W0·(a1 ⊗ I_K)] · [b2; a2 ⊗ I_K],   inner dimension r + r·K,

exact and factored (materialised where r + r·K ≥ min(out, in·K)). It needs the base weight W0 (``--base``).

**DoRA** (``weight_decompose``, ``<name>.dora_scale`` = m): LyCORIS's ``_weight_decompose`` on W = W0 + D, D the
module's scaled update: W' = W·m/(‖W‖ + ε), with ‖W‖ per output row (``wd_on_out``, m of shape (out, 1, …)) or
per input channel over (out, *k) (m of shape (1, in, 1, …)) — the shape of m says which — and ε = the machine
epsilon of the dtype it is computed in (LyCORIS: float32 eps, as the reload holds dora_scale in float32; here the
float64 eps, a difference of ≤ 1.2e-7 relative). With c = m/(‖W‖ + ε),

    ΔW = W' − W0 = (c − 1)·W0 + c·D,

computed in that form so that a barely trained c ≈ 1 does not cancel. Generally full rank: a dense update that
needs W0 (``--base``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ...core.update import DenseUpdate, FactoredUpdate, KroneckerUpdate, upcast
from .lycoris_math import FactorError, Stored, check_finite, dense_matrix, tucker_right

GLORA_ROLES = ("a1", "a2", "b1", "b2", "bm")
FULL_ROLES = ("diff", "diff_b")

Update = FactoredUpdate | DenseUpdate | KroneckerUpdate


# -- full ------------------------------------------------------------------------------------------------------


def full_update(stored: Stored) -> tuple[DenseUpdate, torch.Tensor | None, tuple[int, ...]]:
    """(ΔW = diff as the (out, in·∏k) matrix, the bias update diff_b or None, the weight's shape)."""
    if "diff" not in stored:
        raise FactorError(f"{stored['diff_b'][0]}: a bias update diff_b without its module's diff")
    check_finite(stored)
    key, diff = stored["diff"]
    if diff.ndim < 2 or 0 in diff.shape:
        raise FactorError(f"{key}: expected a weight matrix or conv kernel, found shape {list(diff.shape)}")
    bias = None
    if "diff_b" in stored:
        bias_key, bias = stored["diff_b"]
        if tuple(bias.shape) != (diff.shape[0],):
            raise FactorError(
                f"{bias_key}: expected shape [{diff.shape[0]}] (one per output), found {list(bias.shape)}"
            )
    return dense_matrix(diff, scale=1.0), bias, tuple(diff.shape)


# -- GLoRA -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GloraFactors:
    """A GLoRA module's factors as matrices: a1 (in, r), a2 (r, in), b1 (out, r), b2 (r, in·∏k)."""

    a1: torch.Tensor
    a2: torch.Tensor
    b1: torch.Tensor
    b2: torch.Tensor
    rank: int
    weight_shape: tuple[int, ...]  # (out, in, *k) of the base weight the module adapts
    params: int


def _matrix(stored: Stored, role: str, module: str) -> tuple[str, torch.Tensor]:
    """A 1×…×1 conv weight or a matrix, as the matrix."""
    if role not in stored:
        have = next(iter(stored.values()))[0]
        raise FactorError(f"{have}: has no matching {module}.{role}.weight")
    key, tensor = stored[role]
    if tensor.ndim < 2 or any(k != 1 for k in tensor.shape[2:]):
        raise FactorError(f"{key}: expected a matrix or a 1×1 conv weight, found shape {list(tensor.shape)}")
    return key, tensor.reshape(tensor.shape[0], tensor.shape[1])


def glora_factors(stored: Stored, module: str) -> GloraFactors:
    """Validate a GLoRA module's tensors (``a1`` … ``bm``) and return its factors."""
    check_finite(stored)
    (a1_key, a1), (a2_key, a2), (b1_key, b1) = (_matrix(stored, role, module) for role in ("a1", "a2", "b1"))
    if "b2" not in stored:
        raise FactorError(f"{a1_key}: has no matching {module}.b2.weight")
    b2_key, b2 = stored["b2"]
    rank, width = int(a2.shape[0]), int(a2.shape[1])
    if rank == 0:
        raise FactorError(f"{a2_key}: rank 0 (an empty factor)")
    if tuple(a1.shape) != (width, rank):
        raise FactorError(f"{a1_key}: expected shape [{width}, {rank}] to match {a2_key}, found {list(a1.shape)}")
    if b1.shape[1] != rank or b2.ndim < 2 or tuple(b2.shape[:2]) != (rank, width):
        key, bad = (b1_key, b1) if b1.shape[1] != rank else (b2_key, b2)
        raise FactorError(f"{key}: shape {list(bad.shape)} does not fit rank {rank} and {width} inputs ({a2_key})")
    if "bm" in stored:
        bm_key, bm = stored["bm"]
        if any(k != 1 for k in b2.shape[2:]) or bm.ndim < 3 or tuple(bm.shape[:2]) != (rank, rank):
            raise FactorError(
                f"{bm_key}: expected shape [{rank}, {rank}, *kernel] with a 1×1 b2, found {list(bm.shape)}"
            )
        kernel, right = tuple(bm.shape[2:]), tucker_right(bm, b2.reshape(rank, width))
    else:
        kernel, right = tuple(b2.shape[2:]), b2.reshape(rank, -1)
    params = sum(t.numel() for role, (_, t) in stored.items() if role in GLORA_ROLES)
    return GloraFactors(a1, a2, b1, right, rank, (int(b1.shape[0]), width, *kernel), params)


def glora_update(factors: GloraFactors, base_weight: torch.Tensor, scale: float) -> FactoredUpdate | DenseUpdate:
    """ΔW = s·(W0·(a1·a2 ⊗ I_K) + b1·b2) on the (out, in·K) matrix, exactly (see the module docstring)."""
    out, width, *kernel = factors.weight_shape
    k = math.prod(kernel)
    eye = torch.eye(k, dtype=torch.float64)
    w0 = upcast(base_weight).reshape(out, -1)
    a_left = w0 @ torch.kron(upcast(factors.a1), eye)  # (out, r·K)
    a_right = torch.kron(upcast(factors.a2), eye)  # (r·K, in·K)
    left = torch.cat([upcast(factors.b1), a_left], dim=1)
    right = torch.cat([upcast(factors.b2), a_right], dim=0)
    inner = left.shape[1]
    if inner < min(out, width * k):
        return FactoredUpdate(left, right, scale=scale)

    def build(dtype: torch.dtype, device, factor: float = scale) -> torch.Tensor:
        return (upcast(left, dtype, device) @ upcast(right, dtype, device)) * factor

    return DenseUpdate(
        shape=(out, width * k),
        build=build,
        rank_bound_value=min(inner, out, width * k),
        scale=scale,
        build_unscaled=lambda dtype, device: build(dtype, device, 1.0),
    )


# -- DoRA (weight_decompose) -----------------------------------------------------------------------------------


def dora_axis(magnitude: torch.Tensor, key: str, weight_shape: tuple[int, ...]) -> bool:
    """True where ``dora_scale`` holds one magnitude per output row (``wd_on_out``), False per input channel."""
    out, width = weight_shape[0], weight_shape[1]
    ones = [1] * (len(weight_shape) - 2)
    shape = list(magnitude.shape)
    if shape in ([out, 1, *ones], [out]):
        return True
    if shape == [1, width, *ones]:
        return False
    raise FactorError(
        f"{key}: shape {shape} fits neither a norm per output row ({[out, 1, *ones]}) nor per input channel "
        f"({[1, width, *ones]}) of the base weight {list(weight_shape)}"
    )


def weight_decompose_delta(
    directional: torch.Tensor, magnitude: torch.Tensor, base_weight: torch.Tensor, on_out: bool
) -> torch.Tensor:
    """ΔW = (c − 1)·W0 + c·D, c = m/(‖W0 + D‖ + ε): LyCORIS's DoRA in the dtype of ``base_weight``.

    ``directional`` is D as the (out, in·∏k) matrix, ``base_weight`` W0 in its own shape (out, in, *k); the
    result is the (out, in·∏k) matrix.
    """
    w0 = base_weight
    d = directional.reshape(w0.shape)
    weight = w0 + d
    out, width = w0.shape[0], w0.shape[1]
    if on_out:
        norm = weight.reshape(out, -1).norm(dim=1).reshape(out, *[1] * (w0.dim() - 1))
    else:
        norm = weight.transpose(0, 1).reshape(width, -1).norm(dim=1).reshape(1, width, *[1] * (w0.dim() - 2))
    c = magnitude.to(w0).reshape(norm.shape) / (norm + torch.finfo(w0.dtype).eps)
    return ((c - 1) * w0 + c * d).reshape(out, -1)


def weight_decompose_update(
    directional: Update, magnitude: torch.Tensor, load_base, weight_shape: tuple[int, ...], on_out: bool
) -> DenseUpdate:
    """The dense DoRA update of ``directional`` (the module's scaled ΔW), W0 read by ``load_base()`` when built."""

    def build(dtype: torch.dtype, device) -> torch.Tensor:
        w0 = upcast(load_base(), dtype, device)
        return weight_decompose_delta(
            directional.materialize(dtype, device), upcast(magnitude, dtype, device), w0, on_out
        )

    return DenseUpdate(
        shape=(weight_shape[0], math.prod(weight_shape[1:])), build=build, scale=directional.scalar_scale
    )
