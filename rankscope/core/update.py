"""The update types every reader produces and every analysis consumes.

Almost every adapter's ΔW is a low-rank product ``ΔW = L · diag(scale) · C · R`` (docs/architecture.md); updates that
are not (DoRA, IA3, …) are dense recipes that materialise themselves on request.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

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
    # set by weighted_sum: which stored factors ``left`` and ``right`` concatenate (the spectrum path then takes
    # their Grams from the composite's); not part of the update's value
    concatenation: Concatenation | None = field(default=None, compare=False, repr=False)

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


def _version(tensor: torch.Tensor) -> int | None:
    try:
        return int(tensor._version)
    except RuntimeError:  # inference tensors have no version counter
        return None


@dataclass(frozen=True)
class Concatenation:
    """How ``weighted_sum`` built a composite: its ``left`` is cat(lefts, dim=1), its ``right`` cat(rights, dim=0),
    component i in the inner columns ``spans[i]`` = [a, b) — the values equal (a promotion to a wider float dtype
    is exact), while no tensor's version counter has moved since (``versions``: the composite's two factors, then
    the lefts, then the rights)."""

    left: torch.Tensor
    right: torch.Tensor
    lefts: tuple[torch.Tensor, ...]
    rights: tuple[torch.Tensor, ...]
    spans: tuple[tuple[int, int], ...]
    versions: tuple[int | None, ...]

    @classmethod
    def of(cls, composite: FactoredUpdate, parts: Sequence[FactoredUpdate]) -> Concatenation:
        lefts, rights = tuple(p.left for p in parts), tuple(p.right for p in parts)
        edges = [0]
        for part in parts:
            edges.append(edges[-1] + part.inner_dim)
        versions = tuple(_version(t) for t in (composite.left, composite.right, *lefts, *rights))
        spans = tuple(itertools.pairwise(edges))
        return cls(composite.left, composite.right, lefts, rights, spans, versions)

    def holds(self, update: FactoredUpdate) -> bool:
        """Whether ``update``'s factors are still this concatenation: the very tensors, none changed in place."""
        if update.left is not self.left or update.right is not self.right or None in self.versions:
            return False
        tensors = (self.left, self.right, *self.lefts, *self.rights)
        return all(_version(t) == v for t, v in zip(tensors, self.versions, strict=True))

    def spans_of(self, update: FactoredUpdate, parts: Sequence[FactoredUpdate]) -> list[tuple[int, int]] | None:
        """Each part's inner columns [a, b) in ``update`` where this concatenation holds and ``parts`` are the very
        updates' factors it joined (by identity: no comparison of values needed); else None."""
        if len(parts) != len(self.lefts) or not self.holds(update):
            return None
        mine = zip(parts, self.lefts, self.rights, strict=True)
        return list(self.spans) if all(p.left is a and p.right is b for p, a, b in mine) else None


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


def _cat(tensors: Sequence[torch.Tensor], dim: int) -> torch.Tensor:
    """torch.cat of tensors of one float dtype, bit for bit through their integer views."""
    bits = [as_bits(t) for t in tensors]
    if len({t.dtype for t in tensors}) != 1 or any(b is None for b in bits):
        return torch.cat(list(tensors), dim=dim)
    return torch.cat(bits, dim=dim).view(tensors[0].dtype)  # type: ignore[arg-type]


def _scale_vector(update: FactoredUpdate) -> torch.Tensor:
    if isinstance(update.scale, torch.Tensor):
        return upcast(update.scale.reshape(-1))
    return torch.full((update.inner_dim,), float(update.scale), dtype=torch.float64)


def _weighted_core(update: FactoredUpdate, weight: float) -> torch.Tensor:
    """w·C (w·I where the update has no core), float64, K × K."""
    if update.core is None:
        return torch.eye(update.inner_dim, dtype=torch.float64) * weight
    return upcast(update.core) * weight


# a composed model builds these per layer: one tensor from a Python list where every component is plain (no core,
# a scalar scale), instead of a few small ops per component (≈ 0.1 s of an 8B k=3 composition's reading)
def _weighted_cores(updates: Sequence[FactoredUpdate], weights: Sequence[float]) -> torch.Tensor:
    """blockdiag(w_i·C_i), float64: diag(w_1·1_{K_1}, …) where no component has a core."""
    if all(u.core is None for u in updates):
        diagonal = [float(w) for u, w in zip(updates, weights, strict=True) for _ in range(u.inner_dim)]
        return torch.diag(torch.tensor(diagonal, dtype=torch.float64))
    return torch.block_diag(*(_weighted_core(u, float(w)) for u, w in zip(updates, weights, strict=True)))


def _scale_vectors(updates: Sequence[FactoredUpdate]) -> torch.Tensor:
    """The composite's per-dimension scales [s_1·1_{K_1}, …], float64."""
    if not any(isinstance(u.scale, torch.Tensor) for u in updates):
        return torch.tensor([float(u.scale) for u in updates for _ in range(u.inner_dim)], dtype=torch.float64)
    return torch.cat([_scale_vector(u) for u in updates])


def weighted_sum(updates: Sequence[Update], weights: Sequence[float]) -> Update:
    """Σ_i w_i·ΔW_i as one update.

    Factored components concatenate: [L_1 … L_k]·blockdiag(s_i)·blockdiag(w_i·C_i)·[R_1; …; R_k], inner
    dimension Σ K_i — exact, and ``unscaled()`` drops the s_i but keeps the weights (they sit in the K×K core). The
    factors are concatenated in their stored precision (no float64 copy; the spectrum path upcasts as it reads).
    Other kinds are summed densely.
    """
    shapes = {u.shape for u in updates}
    if len(shapes) != 1:
        raise ValueError(f"components of different shapes {sorted(shapes)} cannot be summed")
    (shape,) = shapes
    if all(isinstance(u, FactoredUpdate) for u in updates):
        factored = [u for u in updates if isinstance(u, FactoredUpdate)]
        lefts, rights = [u.left for u in factored], [u.right for u in factored]
        dtype = lefts[0].dtype
        for tensor in lefts + rights:
            dtype = torch.promote_types(dtype, tensor.dtype)
        composite = FactoredUpdate(
            left=_cat([t.to(dtype) for t in lefts], dim=1),
            right=_cat([t.to(dtype) for t in rights], dim=0),
            core=_weighted_cores(factored, weights),
            scale=_scale_vectors(factored),
        )
        if all(type(u) is FactoredUpdate for u in factored):  # a block-diagonal one's .left is built on each access
            composite = replace(composite, concatenation=Concatenation.of(composite, factored))
        return composite

    def build(dtype: torch.dtype, device: Device, parts: Sequence[Update] = tuple(updates)) -> torch.Tensor:
        return sum(float(w) * u.materialize(dtype, device) for u, w in zip(parts, weights, strict=True))

    def build_unscaled(dtype: torch.dtype, device: Device) -> torch.Tensor:
        return build(dtype, device, tuple(u.unscaled() for u in updates))

    bound = min(sum(u.rank_bound for u in updates), *shape)
    return DenseUpdate(shape=shape, build=build, rank_bound_value=bound, build_unscaled=build_unscaled)
