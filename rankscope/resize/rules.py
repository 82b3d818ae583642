"""Rank rules: how many of a layer's singular directions to keep, parsed from ``kind:value`` strings.

Per-layer rules look at one spectrum σ₁ ≥ σ₂ ≥ …; ``params:N`` is global (a parameter budget shared by every layer,
spent greedily on the directions of largest σ²/(m+n), the energy a direction buys per parameter it costs).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..core.errors import UsageProblem
from ..measures import metrics as M

# each rule's form and meaning, as the errors and --help list them
ACCEPTED = {
    "energy": ("energy:P", "smallest k with Σ_{i≤k}σ²/Σσ² ≥ P, 0 < P ≤ 1"),
    "fixed": ("fixed:K", "k = K (an integer ≥ 1) in every layer"),
    "count": ("count:τ", "k = #{σ > τ}, τ ≥ 0"),
    "rel": ("rel:ρ", "k = #{σ > ρ·σ₁}, 0 ≤ ρ < 1"),
    "sv_ratio": ("sv_ratio:X", "kohya's: k = #{σ > σ₁/X}, X ≥ 1"),
    "sv_fro": ("sv_fro:P", "kohya's: smallest k with √(Σ_{i≤k}σ²)/‖ΔW‖_F ≥ P, 0 < P ≤ 1"),
    "sv_cumulative": ("sv_cumulative:P", "kohya's: smallest k with Σ_{i≤k}σ/Σσ ≥ P, 0 < P ≤ 1"),
    "erank": ("erank", "k = ⌈erank⌉ (Roy & Vetterli's effective rank)"),
    "params": ("params:N", "a global budget of N parameters, greedy by σ²/(m+n) across layers"),
}
ACCEPTED_FORMS = ", ".join(form for form, _ in ACCEPTED.values())
_FRACTIONS = ("energy", "sv_fro", "sv_cumulative")
_SUFFIXES = {"k": 10**3, "m": 10**6, "g": 10**9}


@dataclass(frozen=True)
class Rule:
    """A parsed rank rule: ``kind`` one of :data:`ACCEPTED`, ``value`` its parameter (None for ``erank``)."""

    kind: str
    value: float | None = None

    def __str__(self) -> str:
        if self.value is None:
            return self.kind
        value = int(self.value) if self.kind in ("fixed", "params") else self.value
        return f"{self.kind}:{value:g}" if isinstance(value, float) else f"{self.kind}:{value}"


def _bad(text: str, why: str) -> UsageProblem:
    return UsageProblem(f"rule {text!r}: {why}; the accepted forms are {ACCEPTED_FORMS}", argument="rule")


def parse_rule(text: str | Rule) -> Rule:
    """``"energy:0.95"`` → ``Rule("energy", 0.95)``; a malformed string or an out-of-range value raises
    :class:`UsageProblem` listing the accepted forms."""
    if isinstance(text, Rule):
        return text
    kind, sep, raw = str(text).strip().partition(":")
    kind = kind.strip().lower()
    if kind not in ACCEPTED:
        raise _bad(text, f"unknown rule {kind!r}" if kind else "empty rule")
    if kind == "erank":
        if sep:
            raise _bad(text, "erank takes no value")
        return Rule("erank")
    if not raw.strip():
        raise _bad(text, f"{kind} needs a value ({ACCEPTED[kind][0]})")
    raw = raw.strip()
    multiplier = _SUFFIXES.get(raw[-1].lower(), 1) if kind == "params" else 1
    try:
        value = float(raw[:-1] if multiplier != 1 else raw) * multiplier
    except ValueError:
        raise _bad(text, f"{raw!r} is not a number") from None
    if not math.isfinite(value):
        raise _bad(text, f"{raw!r} is not a finite number")
    if kind in _FRACTIONS and not 0.0 < value <= 1.0:
        raise _bad(text, f"P must be in (0, 1], got {value:g}")
    if kind in ("fixed", "params") and (value != int(value) or value < 1):
        raise _bad(text, f"{'K' if kind == 'fixed' else 'N'} must be a whole number ≥ 1, got {raw}")
    if kind == "count" and value < 0:
        raise _bad(text, f"τ must be ≥ 0, got {value:g}")
    if kind == "rel" and not 0.0 <= value < 1.0:
        raise _bad(text, f"ρ must be in [0, 1), got {value:g}")
    if kind == "sv_ratio" and value < 1.0:
        raise _bad(text, f"X must be ≥ 1, got {value:g}")
    return Rule(kind, value)


def layer_rank(rule: Rule, sigma: torch.Tensor) -> int:
    """The rank ``rule`` keeps of one spectrum (σ sorted descending), before any clamping; 0 for a zero update."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1)
    if sigma.numel() == 0 or float(sigma[0]) <= 0.0:
        return 0
    kind, value = rule.kind, rule.value
    if kind == "energy":
        return M.energy_rank(sigma, value)
    if kind == "sv_fro":  # √(Σ_{≤k}σ²)/‖ΔW‖_F ≥ P  ⇔  Σ_{≤k}σ²/Σσ² ≥ P²
        return M.energy_rank(sigma, value * value)
    if kind == "sv_cumulative":
        shares = torch.cumsum(sigma, 0) / sigma.sum()
        return min(int((shares < value * (1 - 4 * torch.finfo(torch.float64).eps)).sum()) + 1, int((sigma > 0).sum()))
    if kind == "fixed":
        return int(value)
    if kind == "count":
        return M.count_above(sigma, value)
    if kind == "rel":
        return M.count_above_rel(sigma, value)
    if kind == "sv_ratio":
        return M.count_above_rel(sigma, 1.0 / value)
    if kind == "erank":
        return math.ceil(M.erank(sigma) - 1e-9)
    raise ValueError(f"{kind} is not a per-layer rule")


@dataclass(frozen=True)
class RankChoice:
    """One layer's kept rank, what the rule asked for, and why they differ (``None`` where they do not)."""

    rank: int
    wanted: int
    clamped: str | None = None


def lossless_rank(sigma: torch.Tensor, shape: Sequence[int]) -> int:
    """Every nonzero direction: the update's numerical rank at float32 precision (numpy's ``matrix_rank`` rule)."""
    return M.numerical_rank(sigma, shape)


def _budget_ranks(budget: int, spectra: Sequence[torch.Tensor], costs: Sequence[int], caps: Sequence[int]) -> list[int]:
    """Greedy by σ_i²/(m+n): all directions of all layers by that value, each taken while it fits the budget.

    Within a layer σ is sorted and every direction costs the same (m+n), so each layer keeps a prefix.
    """
    values = [
        (float(s) ** 2 / cost, index)
        for index, (sigma, cost, cap) in enumerate(zip(spectra, costs, caps, strict=True))
        for s in torch.as_tensor(sigma, dtype=torch.float64).reshape(-1)[:cap]
        if float(s) > 0
    ]
    values.sort(key=lambda item: -item[0])
    ranks, left = [0] * len(spectra), budget
    for _, index in values:
        if costs[index] <= left:
            ranks[index] += 1
            left -= costs[index]
    return ranks


def choose_ranks(
    rule: Rule | None,
    spectra: Sequence[torch.Tensor],
    shapes: Sequence[tuple[int, int]],
    *,
    max_rank: int | None = None,
    min_rank: int = 0,
) -> list[RankChoice]:
    """Each layer's kept rank under ``rule`` (None: lossless, every nonzero direction), clamped to
    [min_rank, max_rank] and to the layer's bound (the length of its spectrum); a zero update keeps rank 0."""
    if max_rank is not None and max_rank < 1:
        raise UsageProblem(f"max_rank must be ≥ 1, got {max_rank}", argument="max_rank")
    if min_rank < 0 or (max_rank is not None and min_rank > max_rank):
        raise UsageProblem(f"min_rank must be in [0, max_rank], got {min_rank}", argument="min_rank")
    bounds = [int(torch.as_tensor(s).numel()) for s in spectra]
    if rule is not None and rule.kind == "params":
        caps = [min(b, max_rank) if max_rank is not None else b for b in bounds]
        wanted = _budget_ranks(int(rule.value), spectra, [m + n for m, n in shapes], caps)
    elif rule is None:
        wanted = [lossless_rank(s, shape) for s, shape in zip(spectra, shapes, strict=True)]
    else:
        wanted = [layer_rank(rule, s) for s in spectra]
    choices = []
    for sigma, bound, want in zip(spectra, bounds, wanted, strict=True):
        sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1)
        if bound == 0 or float(sigma[0]) <= 0.0:
            choices.append(RankChoice(0, 0, "zero update"))
            continue
        rank, why = want, None
        if max_rank is not None and rank > max_rank:
            rank, why = max_rank, f"clamped to --max-rank {max_rank}"
        if rank < min_rank:
            rank, why = min_rank, f"raised to --min-rank {min_rank}"
        if rank > bound:
            rank, why = bound, f"clamped to the layer's rank bound {bound}"
        choices.append(RankChoice(rank, want, why))
    return choices


__all__ = [
    "ACCEPTED",
    "ACCEPTED_FORMS",
    "RankChoice",
    "Rule",
    "choose_ranks",
    "layer_rank",
    "lossless_rank",
    "parse_rule",
]
