"""Factors an update keeps as a recipe and forms, exactly and in float64, only when a pass over them needs them.

Some families' factors are products of small stored tensors: VeRA's ``diag(λ_b)·B[:out]`` (B one projection shared
by every layer, K = r = 256 wide), LoHa's face-splitting products ``P1 ⊙ᵣ P2`` (r² wide), HydraLoRA's mean head
``(B_1 + … + B_N)/N``. Formed at read time they
would be held by the checkpoint for every layer at once — for VeRA at the Llama-3-8B shape, ≈ 2.8 GB of float64
against an 18 MB file. As recipes they cost nothing until the factored path's one pass forms each into its float64
workspace, takes the Gram (or a QR) and moves on; ``dense()`` forms one for any other caller.

Every product here is exact: inputs are widened to float64 first, and a product of two numbers of at most 24
significant bits (float32, bf16, fp16) has at most 48, which float64's 53 hold; float64 inputs round once.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch

from .update import DenseUpdate, DerivedFactorsUpdate, Device, FactoredUpdate, Scale, Update, upcast


class FormedFactor:
    """A rows × K factor given by a recipe over stored tensors; ``form`` writes it into a float64 buffer."""

    tensors: tuple[torch.Tensor, ...] = ()
    shape: tuple[int, int]

    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def _version(self) -> int:
        """The sum of the stored tensors' version counters: the factor cache's check for an in-place change."""
        return sum(int(t._version) for t in self.tensors)

    def form(self, out: torch.Tensor) -> torch.Tensor:
        """Write the factor into ``out`` (float64, rows × K, contiguous) and return it."""
        raise NotImplementedError

    def dense(self, dtype: torch.dtype = torch.float64, device: Device = "cpu") -> torch.Tensor:
        """The factor as a tensor (formed in float64, then cast to ``dtype``)."""
        device = torch.device(device)
        out = self.form(torch.empty(self.shape, dtype=torch.float64, device=device))
        return out if dtype == torch.float64 else out.to(dtype)


class RowScaled(FormedFactor):
    """diag(scale)·F: F (rows × K, any float dtype) with row i multiplied by scale[i] (VeRA's λ_b·B[:out])."""

    def __init__(self, factor: torch.Tensor, scale: torch.Tensor) -> None:
        if scale.ndim != 1 or scale.shape[0] != factor.shape[0]:
            raise ValueError(f"a row scale of shape {list(scale.shape)} does not fit a factor {list(factor.shape)}")
        self.factor, self.scale = factor, scale
        self.tensors = (factor, scale)
        self.shape = (int(factor.shape[0]), int(factor.shape[1]))

    def form(self, out: torch.Tensor) -> torch.Tensor:
        out.copy_(self.factor)
        return out.mul_(upcast(self.scale, device=out.device)[:, None])


class FaceSplit(FormedFactor):
    """The row-wise Kronecker product P1 ⊙ᵣ P2 of rows × r1 and rows × r2: rows × r1·r2, row i = P1[i] ⊗ P2[i]."""

    def __init__(self, first: torch.Tensor, second: torch.Tensor) -> None:
        if first.ndim != 2 or second.ndim != 2 or first.shape[0] != second.shape[0]:
            raise ValueError(f"factors {list(first.shape)} and {list(second.shape)} have different row counts")
        self.first, self.second = first, second
        self.tensors = (first, second)
        self.shape = (int(first.shape[0]), int(first.shape[1] * second.shape[1]))

    def form(self, out: torch.Tensor) -> torch.Tensor:
        rows, r1, r2 = self.shape[0], self.first.shape[1], self.second.shape[1]
        first, second = (upcast(t, device=out.device) for t in (self.first, self.second))
        torch.mul(first[:, :, None], second[:, None, :], out=out.view(rows, r1, r2))
        return out


class Joined(FormedFactor):
    """[F_1 … F_N]: factors of one row count side by side (rows × ΣK_i), each upcast once into its columns.

    ``stored``: the tensors the parts are views of, as their updates hold them (a composition's right side joins
    R_iᵀ of the stored R_i): what a part is known by (``core.factor_sides``) and whose versions are checked."""

    def __init__(self, factors: Sequence[torch.Tensor], stored: Sequence[torch.Tensor] | None = None) -> None:
        if len({int(f.shape[0]) for f in factors}) != 1 or any(f.ndim != 2 for f in factors):
            raise ValueError(f"factors of shapes {[list(f.shape) for f in factors]} cannot be joined")
        self.factors = tuple(factors)
        self.tensors = self.stored = tuple(stored) if stored is not None else self.factors
        self.spans = tuple(itertools.pairwise(itertools.accumulate((int(f.shape[1]) for f in factors), initial=0)))
        self.shape = (int(factors[0].shape[0]), self.spans[-1][1])

    def form(self, out: torch.Tensor) -> torch.Tensor:
        for factor, (a, b) in zip(self.factors, self.spans, strict=True):
            out[:, a:b].copy_(factor)
        return out


class Summed(FormedFactor):
    """(F_1 + … + F_N) / divisor of same-shaped factors, summed in float64 (HydraLoRA's uniform-router mean head).

    It is [F_1 … F_N]·J with J = [I; …; I]/divisor, so the factored path may take its Gram JᵀGJ from the Gram G of
    ``joined`` — the pass that also gives each F_i's Gram (the diagonal blocks) and their cross-Grams — where the
    cancellation in the sum leaves that accurate enough (``core.factored``)."""

    def __init__(self, factors: Sequence[torch.Tensor], divisor: float = 1.0) -> None:
        shapes = {tuple(f.shape) for f in factors}
        if len(shapes) != 1 or len(next(iter(shapes))) != 2:
            raise ValueError(f"factors of shapes {sorted(shapes)} cannot be summed")
        self.factors, self.divisor = tuple(factors), float(divisor)
        self.tensors = self.factors
        self.shape = (int(factors[0].shape[0]), int(factors[0].shape[1]))
        self._joined: Joined | None = None

    @property
    def joined(self) -> Joined:
        """[F_1 … F_N], one recipe object per sum (the factor cache keys on it)."""
        if self._joined is None:
            self._joined = Joined(self.factors)
        return self._joined

    @property
    def weights(self) -> tuple[float, ...]:
        return (1.0 / self.divisor,) * len(self.factors)

    def form(self, out: torch.Tensor) -> torch.Tensor:
        out.copy_(self.factors[0])
        for factor in self.factors[1:]:
            out.add_(factor.to(out.device))
        return out.div_(self.divisor) if self.divisor != 1.0 else out


Factor = torch.Tensor | FormedFactor


def _tensor(factor: Factor) -> torch.Tensor:
    """A stored factor as it is, a recipe formed (float64)."""
    return factor.dense() if isinstance(factor, FormedFactor) else factor


class FormedUpdate(DerivedFactorsUpdate):
    """ΔW = F_L · diag(scale) · core · F_Rᵀ with F_L (m × K) and F_R (n × K) stored tensors or recipes.

    The spectrum path takes each side's Gram straight from the recipe (formed into its workspace); ``left`` and
    ``right`` form the m × K and K × n float64 matrices on each access, for the callers that want plain factors.
    """

    def __init__(
        self, left_factor: Factor, right_factor: Factor, core: torch.Tensor | None = None, scale: Scale = 1.0
    ) -> None:
        if left_factor.shape[1] != right_factor.shape[1]:
            shapes = f"{list(left_factor.shape)} and {list(right_factor.shape)}"
            raise ValueError(f"factors {shapes} have different inner dimensions")
        self._fields(left_factor=left_factor, right_factor=right_factor, core=core, scale=scale)

    @property
    def left(self) -> torch.Tensor:  # type: ignore[override]
        return _tensor(self.left_factor)

    @property
    def right(self) -> torch.Tensor:  # type: ignore[override]
        return _tensor(self.right_factor).mT

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.left_factor.shape[0]), int(self.right_factor.shape[0]))

    @property
    def inner_dim(self) -> int:
        return int(self.left_factor.shape[1])

    def __repr__(self) -> str:
        return super().__repr__().replace("FactoredUpdate", "FormedUpdate", 1)

    def unscaled(self) -> FormedUpdate:
        return FormedUpdate(self.left_factor, self.right_factor, self.core, 1.0)


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


def _is_joined(update: FactoredUpdate) -> bool:
    return (
        isinstance(update, FormedUpdate)
        and isinstance(update.left_factor, Joined)
        and isinstance(update.right_factor, Joined)
    )


def weighted_sum(updates: Sequence[Update], weights: Sequence[float]) -> Update:
    """Σ_i w_i·ΔW_i as one update.

    Factored components join: [L_1 … L_k]·blockdiag(s_i)·blockdiag(w_i·C_i)·[R_1; …; R_k], inner dimension Σ K_i
    — exact, and ``unscaled()`` drops the s_i but keeps the weights (they sit in the K×K core). The factors stay
    the stored tensors (``Joined``: no copy at all until the spectrum path upcasts each into its workspace, and
    the components' factors are the composite's parts, so their Grams are blocks of its Gram). Other kinds are
    summed densely.
    """
    shapes = {u.shape for u in updates}
    if len(shapes) != 1:
        raise ValueError(f"components of different shapes {sorted(shapes)} cannot be summed")
    (shape,) = shapes
    if all(isinstance(u, FactoredUpdate) for u in updates):
        factored = [u for u in updates if isinstance(u, FactoredUpdate)]
        lefts, rights, stored_rights = [], [], []
        for update in factored:
            if _is_joined(update):  # a composite inside a composite: its parts join this one's, in order
                lefts += update.left_factor.factors
                rights += update.right_factor.factors
                stored_rights += update.right_factor.stored
            else:  # a derived update's factors are formed here (BoRA's block-diagonal ones, recipes)
                left, right = update.left, update.right
                lefts.append(left)
                rights.append(right.mT)
                stored_rights.append(right)
        return FormedUpdate(
            Joined(lefts),
            Joined(rights, stored=stored_rights),
            core=_weighted_cores(factored, weights),
            scale=_scale_vectors(factored),
        )

    def build(dtype: torch.dtype, device: Device, parts: Sequence[Update] = tuple(updates)) -> torch.Tensor:
        return sum(float(w) * u.materialize(dtype, device) for u, w in zip(parts, weights, strict=True))

    def build_unscaled(dtype: torch.dtype, device: Device) -> torch.Tensor:
        return build(dtype, device, tuple(u.unscaled() for u in updates))

    bound = min(sum(u.rank_bound for u in updates), *shape)
    return DenseUpdate(shape=shape, build=build, rank_bound_value=bound, build_unscaled=build_unscaled)


__all__ = ["FaceSplit", "Factor", "FormedFactor", "FormedUpdate", "Joined", "RowScaled", "Summed", "weighted_sum"]
