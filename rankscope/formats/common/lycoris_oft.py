"""LyCORIS algorithms that act on the base weight itself, as LyCORIS 4.1's forward applies them (multiplier 1).

Each needs W0 (``--base``) and is a dense update of the analysed (out, in·∏k) matrix; none has a low-rank form
(the rotations and rescalings are full rank, so ΔW has the rank of W0).

**(IA)³** (``<name>.weight`` w, ``<name>.on_input``): LyCORIS scales W0 by (1 + w) along the output axis
(w of shape (out,), or (1, out, 1, …) for a conv), or along the input axis where ``on_input`` is 1 (w (in,) or
(1, in, 1, …)), so ΔW = diag(w)·W0 or W0·diag(w) — each input channel's kernel taps alike. The bias is left as
it is (unlike PEFT's (IA)³, which rescales it too).

**Diag-OFT** (``oft_blocks`` (n, b, b), n·b = out, optional ``rescale`` s (out, 1, …), ``alpha`` = the
constraint c): Q_k = B_k − B_kᵀ; where c > 0 and ‖Q‖_F + 1e-8 > c·out (one norm over all blocks), Q is scaled to
that bound; R_k = (I + Q_k)(I − Q_k)⁻¹ (Cayley). LyCORIS's ``einsum("k n m, k n ... -> k m ...")`` applies R_kᵀ
to block k of W0's rows: W' = diag(s)·blockdiag(R_k)ᵀ·W0, so

    ΔW = diag(s)·blockdiag(R_k − I)ᵀ·W0 + diag(s − 1)·W0,   R_k − I = 2·Q_k·(I − Q_k)⁻¹,

computed in that form so that a barely trained rotation does not cancel.

**BOFT** (``oft_blocks`` (m, n, b, b), the butterfly stages): stage i permutes the rows (k = 2^i·b/2: the
index (c, g, k) taken as (c, k, g)), applies the Cayley rotation R_{i,j} (not its transpose) to each block of b
rows and permutes back; W' = diag(s)·S_{m−1}⋯S_0·W0. With E_0 = 0 and E_{i+1} = E_i + P_iᵀ·blockdiag(R_i − I)·P_i
·(W0 + E_i), ΔW = diag(s)·E_m + diag(s − 1)·W0. The constraint is as Diag-OFT's, one norm over all stages.

LyCORIS computes the Cayley inverse in float32 (``.float().inverse()``); here everything is float64.
"""

from __future__ import annotations

import math

import torch

from ...core.update import DenseUpdate, upcast
from .lycoris_math import FactorError, Stored, check_finite

OFT_ROLES = ("oft_blocks", "rescale")
IA3_ROLES = ("on_input",)  # and ``<name>.weight``, which only beside ``on_input`` is (IA)³'s


def _base_matrix(load_base, dtype, device) -> torch.Tensor:
    w0 = upcast(load_base(), dtype, device)
    return w0.reshape(w0.shape[0], -1)


# -- (IA)³ -----------------------------------------------------------------------------------------------------


def ia3_update(stored: Stored, weight_shape: tuple[int, ...], load_base) -> DenseUpdate:
    """ΔW = diag(w)·W0, or W0·diag(w) where ``on_input`` is set, on the (out, in·∏k) matrix."""
    check_finite(stored)
    key, vector = stored["weight"]
    on_input = bool(stored["on_input"][1].reshape(-1)[0]) if stored["on_input"][1].numel() else False
    out, width = weight_shape[0], weight_shape[1]
    size, ones = (width if on_input else out), [1] * (len(weight_shape) - 2)
    accepted = [[size]] if not ones else [[1, size, *ones], [size]]
    if list(vector.shape) not in accepted:
        axis = "input channels" if on_input else "output channels"
        raise FactorError(
            f"{key}: shape {list(vector.shape)} does not fit the {axis} of the base weight {list(weight_shape)}"
        )
    taps = math.prod(weight_shape[2:])

    def build(dtype: torch.dtype, device) -> torch.Tensor:
        w0 = _base_matrix(load_base, dtype, device)
        w = upcast(vector.reshape(-1), dtype, device)
        if on_input:
            return w0 * w.repeat_interleave(taps)[None, :]
        return w[:, None] * w0

    return DenseUpdate(shape=(out, width * taps), build=build)


# -- Diag-OFT and BOFT -----------------------------------------------------------------------------------------


def _rotations_minus_identity(blocks: torch.Tensor, constraint: float) -> torch.Tensor:
    """R − I = 2·Q·(I − Q)⁻¹ per block (any leading dims), Q = B − Bᵀ scaled to the constraint as LyCORIS does."""
    q = blocks - blocks.transpose(-1, -2)
    if constraint > 0:
        norm = torch.linalg.matrix_norm(q.reshape(-1, q.shape[-1]), "fro") + 1e-8
        if norm > constraint:
            q = q * (constraint / norm)
    eye = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device).expand_as(q)
    return torch.linalg.solve(eye - q, 2 * q, left=False)  # X·(I − Q) = 2Q


def _rescale(stored: Stored, out: int, weight_shape: tuple[int, ...]) -> torch.Tensor | None:
    if "rescale" not in stored:
        return None
    key, scale = stored["rescale"]
    if scale.numel() != out or scale.ndim != len(weight_shape) or scale.shape[0] != out:
        raise FactorError(f"{key}: expected shape {[out] + [1] * (len(weight_shape) - 1)}, found {list(scale.shape)}")
    return scale.reshape(out)


def _butterfly_permutation(out: int, half_block: int, stage: int) -> torch.Tensor:
    """Stage ``stage``'s row order: rows (c, g, k) read as (c, k, g), g ∈ {0, 1}, k = 2^stage·half_block."""
    k = 2**stage * half_block
    return torch.arange(out).reshape(-1, 2, k).transpose(1, 2).reshape(-1)


def oft_update(stored: Stored, module: str, weight_shape: tuple[int, ...], constraint: float, load_base):
    """The dense ΔW of a Diag-OFT (3-D ``oft_blocks``) or BOFT (4-D) module (see the module docstring)."""
    check_finite(stored)
    key, blocks = stored["oft_blocks"]
    out = weight_shape[0]
    butterfly = blocks.ndim == 4
    if blocks.ndim not in (3, 4) or blocks.shape[-1] != blocks.shape[-2] or 0 in blocks.shape:
        raise FactorError(f"{key}: expected (blocks, b, b) or (stages, blocks, b, b), found {list(blocks.shape)}")
    count, size = int(blocks.shape[-3]), int(blocks.shape[-1])
    if count * size != out or (butterfly and (size % 2 or count & (count - 1))):
        what = "a power of two of blocks of even size" if butterfly else "blocks"
        raise FactorError(
            f"{key}: {count} {what} of {size} rows do not cover the base weight's {out} output rows "
            f"({list(weight_shape)}; is --base the model this adapter was trained on?)"
        )
    rescale = _rescale(stored, out, weight_shape)

    def build(dtype: torch.dtype, device) -> torch.Tensor:
        w0 = _base_matrix(load_base, dtype, device)
        d = _rotations_minus_identity(upcast(blocks, dtype, device), constraint * out)
        if not butterfly:  # rows of block k: (R_k − I)ᵀ applied to W0's block k
            delta = torch.einsum("knm,kn...->km...", d, w0.reshape(count, size, -1)).reshape(out, -1)
        else:
            delta = torch.zeros_like(w0)
            for stage in range(d.shape[0]):
                order = _butterfly_permutation(out, size // 2, stage).to(device)
                moved = (w0 + delta)[order].reshape(count, size, -1)
                step = torch.einsum("kij,kj...->ki...", d[stage], moved).reshape(out, -1)
                delta[order] += step
        if rescale is None:
            return delta
        s = upcast(rescale, dtype, device)[:, None]
        return s * delta + (s - 1) * w0

    return DenseUpdate(shape=(out, math.prod(weight_shape[1:])), build=build)
