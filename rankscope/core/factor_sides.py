"""The factors whose R the factored path needs, one per side of an update, and where each one's Gram comes from:
its own pass, row blocks of it (BoRA), or a block of a composite's Gram (a composition's components).

A composition's factor is [F_1 … F_k] (``core.formed.weighted_sum``: a ``Joined`` of the stored factors): the
[a, b) × [a, b) block of its computed Gram is a computed Gram of the part F_i — every entry the dot product of the
same two columns, so within the same bound γ_rows·|F_i|ᵀ|F_i| the CholeskyQR test of ``core.factored`` assumes —
and the part's CholeskyQR, accepted or refused by that same test, needs no pass over F_i of its own.

A sum F = Σ w_i·F_i of same-shaped parts (HydraLoRA's mean head) is H·J with H = [F_1 … F_N] (``formed.Joined``)
and J = [w_1·I; …; w_N·I]; the factored path computes H's Gram Ĝ (which also gives each F_i's, as above) and
takes F's as JᵀĜJ. Every entry of Ĝ is within γ_rows·|h_a|ᵀ|h_b| of the exact one, so entry (c, d) of JᵀĜJ, summed
in float64, is within γ_{rows+N²}·s_c·s_d, s_c = Σ_i |w_i|·‖F_i e_c‖: against D = diag(‖F e_c‖) that is
ρ_c·ρ_d·γ with ρ_c = s_c/‖F e_c‖ ≥ 1, how much column c cancels in the sum. The CholeskyQR test then holds with
ε(rows + N², K)·ρ_max² for ε: a sum that cancels badly is refused and takes Householder QR of the formed sum.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .formed import Factor, FormedUpdate, Joined, Summed
from .update import BlockDiagonalUpdate, FactoredUpdate

Span = tuple[int, int, int]  # (host side, a, b): columns [a, b) of the host's factor


@dataclass(frozen=True)
class Side:
    """The factor F (rows × K) of one side of an update — ``left``, or ``right``ᵀ — split into ``blocks`` row
    blocks when the side is block-diagonal (BoRA: R = blockdiag(R(F_i)) from each block's own Gram).
    ``stored`` is the tensor the update holds (what the cache is keyed on); ``parts`` (a composite's): the stored
    tensors whose factors are its columns [a, b)."""

    stored: Factor
    factor: Factor
    blocks: int
    tag: str
    parts: tuple[tuple[torch.Tensor, int, int], ...] = ()
    # (host, w): the factor is Σ w_i·F_i of the host's parts F_i (HydraLoRA's mean head), its Gram JᵀGJ derivable
    combination: tuple[Joined, tuple[float, ...]] | None = None

    @property
    def key(self) -> tuple[int, str]:
        return id(self.stored), self.tag

    @property
    def values(self) -> tuple:
        """Equal for two sides whose factors are the same memory seen the same way (HydraLoRA's A, held by the mean
        head as Aᵀ and by every head as A): a view's address, shape, strides and dtype; a recipe's identity."""
        factor = self.factor
        if isinstance(factor, torch.Tensor):
            return factor.data_ptr(), tuple(factor.shape), factor.stride(), factor.dtype, str(factor.device)
        return (id(factor),)

    @property
    def tall(self) -> bool:
        """rows ≥ K > 0: FᵀF is computed (CholeskyQR's first step)."""
        return self.factor.shape[0] >= self.factor.shape[1] > 0

    def block(self, index: int) -> torch.Tensor:
        rows = self.factor.shape[0] // self.blocks
        return self.factor[index * rows : (index + 1) * rows]


def sides_of(update: FactoredUpdate) -> tuple[Side, Side]:
    """(left side, right side) of an update; a composite's (joined factors) carry their parts."""
    if isinstance(update, BlockDiagonalUpdate):
        blocks = update.blocks
        return (
            Side(update.left_stack, update.left_stack, blocks, "left"),
            Side(update.right_stack, update.right_stack.mT, blocks, "right"),
        )
    if isinstance(update, FormedUpdate):  # recipes (or stored tensors) formed into the workspace as they are read
        left, right = update.left_factor, update.right_factor
        return (
            Side(left, left, 1, "left", _joined_parts(left), combination=_combination(left)),
            Side(right, right, 1, "right", _joined_parts(right)),
        )
    return Side(update.left, update.left, 1, "left"), Side(update.right, update.right.mT, 1, "right")


def _joined_parts(factor: Factor) -> tuple[tuple[torch.Tensor, int, int], ...]:
    """A joined factor's parts (stored tensor, a, b) — a composition's components' factors — else none."""
    if not isinstance(factor, Joined):
        return ()
    return tuple((t, a, b) for t, (a, b) in zip(factor.stored, factor.spans, strict=True))


def _combination(factor: Factor) -> tuple[Joined, tuple[float, ...]] | None:
    if not isinstance(factor, Summed) or len(factor.factors) < 2:
        return None
    if len({(f.dtype, f.device) for f in factor.factors}) != 1:
        return None
    return factor.joined, factor.weights


def host_side(host: Joined, tag: str) -> Side:
    """The side of a joined factor [F_1 … F_N], its parts the F_i in their columns."""
    return Side(host, host, 1, tag, _joined_parts(host))


def derivations(sides: Sequence[Side], candidates: Sequence[int]) -> dict[int, Span]:
    """candidate → (host, a, b) for every candidate side (whole, i.e. not block-diagonal) whose factor is columns
    [a, b) of a host's: a component, a run of consecutive components (a sequential composition's partial sums), a
    composite inside a composite. The widest tall composites among the candidates host (their Gram is computed
    anyway); a host is never derived."""
    where: dict[tuple[int, str], Span] = {}  # a part's key → its span in a host
    derived: dict[int, Span] = {}
    tall = [i for i in candidates if sides[i].tall]
    for i in sorted((i for i in tall if sides[i].parts), key=lambda i: -sides[i].factor.shape[1]):
        side = sides[i]
        span = where.get(side.key) or _run(side, where)
        if span is not None:
            derived[i] = span
        else:  # a host: CholeskyQR computes its Gram
            span = (i, 0, side.factor.shape[1])
        host, offset, _ = span
        for part, a, b in side.parts:
            where.setdefault((id(part), side.tag), (host, offset + a, offset + b))
    for i in tall:
        if not sides[i].parts and sides[i].key in where:
            derived[i] = where[sides[i].key]
    return derived


def _run(side: Side, where: dict[tuple[int, str], Span]) -> Span | None:
    """(host, a, b) where ``side``'s parts lie side by side, in order, in one host's columns; else None."""
    spans = [where.get((id(part), side.tag)) for part, _, _ in side.parts]
    if any(s is None for s in spans):
        return None
    found: list[Span] = spans  # type: ignore[assignment]
    if len({s[0] for s in found}) != 1 or any(s[2] != t[1] for s, t in itertools.pairwise(found)):
        return None
    return found[0][0], found[0][1], found[-1][2]


__all__ = ["Side", "Span", "derivations", "host_side", "sides_of"]
