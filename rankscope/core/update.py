"""The update types every reader produces and every analysis consumes.

Almost every adapter's ΔW is a low-rank product ``ΔW = L · diag(scale) · C · R`` (docs/architecture.md); updates that
are not (DoRA, IA3, …) are dense recipes that materialise themselves on request.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

Scale = float | torch.Tensor
Device = str | torch.device


def upcast(
    tensor: torch.Tensor, dtype: torch.dtype = torch.float64, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """The one place factors leave their stored dtype (bf16/fp16 have no SVD) for linear algebra."""
    return tensor.to(device=device, dtype=dtype)


@dataclass(frozen=True)
class FactoredUpdate:
    """ΔW = left · diag(scale) · core · right.

    ``left`` is m×K, ``right`` K×n, ``core`` K×K or None for the identity, ``scale`` a number or a
    K-vector (one scale per inner dimension: MELoRA's per-block α_i/r_i, a composition's w_i·s_i).
    """

    left: torch.Tensor
    right: torch.Tensor
    core: torch.Tensor | None = None
    scale: Scale = 1.0

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.left.shape[0]), int(self.right.shape[1]))

    @property
    def inner_dim(self) -> int:
        return int(self.left.shape[1])

    @property
    def rank_bound(self) -> int:
        m, n = self.shape
        return min(self.inner_dim, m, n)

    @property
    def scalar_scale(self) -> float | None:
        """The single scale of this update, or None where the scale differs across the inner dimension."""
        if isinstance(self.scale, torch.Tensor):
            flat = self.scale.reshape(-1)
            if flat.numel() and bool((flat == flat[0]).all()):
                return float(flat[0])
            return None
        return float(self.scale)

    def __repr__(self) -> str:
        m, n = self.shape
        scale = self.scalar_scale
        scale_text = f"scale {scale:.4g}" if scale is not None else "per-dimension scales"
        core = ", with a core" if self.core is not None else ""
        return f"FactoredUpdate({m}×{n}, inner dim {self.inner_dim}{core}, {scale_text})"

    def unscaled(self) -> FactoredUpdate:
        """The same product without its scale (``--unscaled``: B·A without α/r)."""
        return replace(self, scale=1.0)

    def scaled_left(self, dtype: torch.dtype = torch.float64, device: Device = "cpu") -> torch.Tensor:
        """left · diag(scale), upcast."""
        left = upcast(self.left, dtype, device)
        if isinstance(self.scale, torch.Tensor):
            return left * upcast(self.scale.reshape(1, -1), dtype, device)
        return left * self.scale

    def materialize(self, dtype: torch.dtype = torch.float64, device: Device = "cpu") -> torch.Tensor:
        """The m×n matrix itself."""
        left = self.scaled_left(dtype, device)
        if self.core is not None:
            left = left @ upcast(self.core, dtype, device)
        return left @ upcast(self.right, dtype, device)


class DerivedFactorsUpdate(FactoredUpdate):
    """A FactoredUpdate whose ``left`` and ``right`` are built from other fields on each access (BoRA's blocks,
    core.formed's recipes): its fields are set by ``_fields``, and it compares by identity — comparing the fields'
    values would build the factors."""

    __eq__ = object.__eq__
    __hash__ = object.__hash__

    def _fields(self, **values: object) -> None:
        for name, value in values.items():
            object.__setattr__(self, name, value)


class BlockDiagonalUpdate(DerivedFactorsUpdate):
    """ΔW = blockdiag(B_1..B_b) · diag(scale) · core · blockdiag(A_1..A_b) (BoRA), kept as the stored factors.

    ``left_stack`` is B = [B_1; …; B_b] (m × r, row blocks of m/b), ``right_stack`` A = [A_1 … A_b] (r × n, column
    blocks of n/b), ``core`` the (b·r)² matrix between the two block-diagonal factors. The spectrum path takes the
    R factor of each block (R_L = blockdiag(R(B_i))) and never forms the block-diagonal matrices; ``left`` and
    ``right`` materialise them (m × b·r, b·r × n) for the callers that want plain factors.
    """

    def __init__(
        self, left_stack: torch.Tensor, right_stack: torch.Tensor, blocks: int, core: torch.Tensor, scale: Scale = 1.0
    ) -> None:
        (m, rank), n = left_stack.shape, right_stack.shape[1]
        if blocks < 1 or m % blocks or n % blocks or right_stack.shape[0] != rank:
            shapes = f"{list(left_stack.shape)} and {list(right_stack.shape)}"
            raise ValueError(f"{blocks} blocks do not fit factors {shapes}")
        self._fields(left_stack=left_stack, right_stack=right_stack, blocks=blocks, core=core, scale=scale)

    @property
    def left(self) -> torch.Tensor:  # type: ignore[override]
        return torch.block_diag(*self.left_stack.split(self.left_stack.shape[0] // self.blocks, dim=0))

    @property
    def right(self) -> torch.Tensor:  # type: ignore[override]
        return torch.block_diag(*self.right_stack.split(self.right_stack.shape[1] // self.blocks, dim=1))

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.left_stack.shape[0]), int(self.right_stack.shape[1]))

    @property
    def inner_dim(self) -> int:
        return self.blocks * int(self.left_stack.shape[1])

    def __repr__(self) -> str:
        m, n = self.shape
        return f"BlockDiagonalUpdate({m}×{n}, {self.blocks} blocks of rank {self.left_stack.shape[1]}, with a core)"

    def unscaled(self) -> BlockDiagonalUpdate:
        return BlockDiagonalUpdate(self.left_stack, self.right_stack, self.blocks, self.core, 1.0)


@dataclass(frozen=True)
class DenseUpdate:
    """An update that is not a low-rank product: ``build(dtype, device)`` returns the m×n matrix."""

    shape: tuple[int, int]
    build: Callable[[torch.dtype, torch.device | str], torch.Tensor]
    rank_bound_value: int | None = None
    scale: float | None = None
    build_unscaled: Callable[[torch.dtype, torch.device | str], torch.Tensor] | None = None

    @property
    def rank_bound(self) -> int:
        return self.rank_bound_value if self.rank_bound_value is not None else min(self.shape)

    @property
    def scalar_scale(self) -> float | None:
        return self.scale

    def __repr__(self) -> str:
        return f"DenseUpdate({self.shape[0]}×{self.shape[1]}, dense, rank ≤ {self.rank_bound})"

    def unscaled(self) -> DenseUpdate:
        if self.build_unscaled is None:
            return self
        return replace(self, build=self.build_unscaled, scale=1.0, build_unscaled=None)

    def materialize(self, dtype: torch.dtype = torch.float64, device: Device = "cpu") -> torch.Tensor:
        return self.build(dtype, device)


@dataclass(frozen=True)
class KroneckerUpdate:
    """ΔW = scale · (first ⊗ second) with first (a×c) and second (b×d) themselves updates: ΔW is (a·b)×(c·d).

    The singular values of a Kronecker product are the products σ_i(first)·σ_j(second), exactly (LoKr).
    """

    first: FactoredUpdate | DenseUpdate
    second: FactoredUpdate | DenseUpdate
    scale: float = 1.0

    @property
    def shape(self) -> tuple[int, int]:
        (a, c), (b, d) = self.first.shape, self.second.shape
        return (a * b, c * d)

    @property
    def rank_bound(self) -> int:
        return self.first.rank_bound * self.second.rank_bound

    @property
    def scalar_scale(self) -> float | None:
        return float(self.scale)

    def __repr__(self) -> str:
        m, n = self.shape
        return f"KroneckerUpdate({m}×{n} = {self.first!r} ⊗ {self.second!r}, scale {self.scale:.4g})"

    def unscaled(self) -> KroneckerUpdate:
        return replace(self, scale=1.0)

    def materialize(self, dtype: torch.dtype = torch.float64, device: Device = "cpu") -> torch.Tensor:
        return self.scale * torch.kron(self.first.materialize(dtype, device), self.second.materialize(dtype, device))


@dataclass(frozen=True)
class DiagonalUpdate:
    """ΔW = diag(values), n×n: a vector update (LN tuning's Δγ); its singular values are |values|, sorted."""

    values: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.values.numel()), int(self.values.numel()))

    @property
    def rank_bound(self) -> int:
        return int(self.values.numel())

    @property
    def scalar_scale(self) -> float | None:
        return None

    def __repr__(self) -> str:
        return f"DiagonalUpdate({self.shape[0]}×{self.shape[1]}, diagonal)"

    def unscaled(self) -> DiagonalUpdate:
        return self

    def materialize(self, dtype: torch.dtype = torch.float64, device: Device = "cpu") -> torch.Tensor:
        return torch.diag(upcast(self.values.reshape(-1), dtype, device))


Update = FactoredUpdate | DenseUpdate | KroneckerUpdate | DiagonalUpdate


# an integer dtype of each float width: torch's int kernels copy and compare bits about twice as fast as its
# bf16/fp16 ones (measured: cat of three 14336 × 8 bf16 factors along their columns 2.8 against 1.4 ms)
_BITS = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def as_bits(tensor: torch.Tensor) -> torch.Tensor | None:
    """The tensor's bits as an integer view of the same width, None for non-float dtypes (and unusual widths)."""
    width = _BITS.get(tensor.element_size()) if tensor.dtype.is_floating_point else None
    return tensor.view(width) if width is not None else None
