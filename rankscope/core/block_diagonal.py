"""BoRA's block-diagonal factors on the factored path, as blocks: R = blockdiag(R_1..R_b) and the core between two
such factors, computed from the r × r blocks — never a product with the block-diagonal matrices.

For ΔW = blockdiag(B_i) · s·Σ' · blockdiag(A_j) (``core.update.BlockDiagonalUpdate``, K = b·r) the R factors are
block-diagonal too, R_L = blockdiag(L_i) and R_R = blockdiag(R_j) (each block's own CholeskyQR or QR), and the
core R_L · s·Σ' · R_Rᵀ has the r × r blocks L_i · s·Σ'_ij · R_jᵀ. BoRA's Σ'_ij are diagonal, diag(d_ij), so

    core[i·r + a, j·r + c] = s · Σ_k L_i[a, k] · d_ij[k] · R_j[c, k]

b·r³ multiply-adds per block row and one batched product per layer; a core with full blocks takes two products
of the blocks (b·r²·K each).
"""

from __future__ import annotations

import torch


def assemble(blocks: torch.Tensor) -> torch.Tensor:
    """blockdiag(X_1, …, X_b) of square blocks (… × b × r × r) as (… × b·r × b·r), in one copy."""
    *lead, count, rank, _ = blocks.shape
    out = blocks.new_zeros(*lead, count, rank, count, rank)
    out.diagonal(dim1=-4, dim2=-2).copy_(blocks.movedim(-3, -1))
    return out.reshape(*lead, count * rank, count * rank)


def diagonal_blocks(matrix: torch.Tensor, blocks: int) -> torch.Tensor:
    """The ``blocks`` diagonal blocks (… × b × r × r) of block-diagonal (… × K × K) matrices, K = b·r."""
    *lead, k, _ = matrix.shape
    rank = k // blocks
    split = matrix.reshape(*lead, blocks, rank, blocks, rank)
    return torch.diagonal(split, dim1=-4, dim2=-2).movedim(-1, -3)


def block_diagonals(core: torch.Tensor, blocks: int) -> torch.Tensor | None:
    """d (b × b × r) with core = the b × b grid of diag(d_ij) (BoRA's Σ'), or None where some r × r block of the
    K × K ``core`` has a nonzero entry off its diagonal (counted exactly: no tolerance)."""
    k = core.shape[-1]
    rank = k // blocks
    diagonals = torch.diagonal(core.reshape(blocks, rank, blocks, rank), dim1=1, dim2=3)  # d[i, j, k]
    if int(torch.count_nonzero(core)) != int(torch.count_nonzero(diagonals)):
        return None
    return diagonals


def cores_from_blocks(
    left: torch.Tensor, right: torch.Tensor, core: torch.Tensor | None, diagonals: torch.Tensor | None
) -> torch.Tensor:
    """left · core · rightᵀ (N × K × K) for block-diagonal left and right given as their blocks (N × b × r × r,
    any scale already in ``left``): from the diagonals (N × b × b × r) where every layer's core has them, else from
    the dense cores (N × K × K)."""
    n, blocks, rank, _ = left.shape
    k = blocks * rank
    if diagonals is not None:
        # Y[n, i, k, j, c] = d[n, i, j, k] · R_j[c, k]; then block row i of the core is L_i · Y[n, i]
        weighted = diagonals.transpose(-1, -2)[..., None] * right.permute(0, 3, 1, 2)[:, None]
        return (left @ weighted.reshape(n, blocks, rank, k)).reshape(n, k, k)
    assert core is not None
    product = (left @ core.reshape(n, blocks, rank, k)).reshape(n, k, k)  # block row i: L_i · core_i,:
    columns = product.reshape(n, k, blocks, rank).permute(0, 2, 1, 3)  # N × b × K × r
    return (columns @ right.mT).permute(0, 2, 1, 3).reshape(n, k, k)  # block column j: (·)_:,j · R_jᵀ


__all__ = ["assemble", "block_diagonals", "cores_from_blocks", "diagonal_blocks"]
