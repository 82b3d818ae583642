"""Per-layer rank suggestions from an analysis, and the PEFT ``LoraConfig`` fields that give each layer its rank.

For a kept rank k of a layer with spectrum σ: retained energy Σ_{i≤k}σ²/Σσ², spectral error σ_{k+1} (the error of
the best rank-k approximation in the spectral norm) and Frobenius error √Σ_{i>k}σ² (Eckart–Young). The α that keeps
the layer's scale s is α_k = s·k (s = α/r), or α_k = s·√k under rsLoRA (s = α/√r) — not α itself, which would
change the scale by r/k (√(r/k) with rsLoRA).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..core.naming import expert_slice
from .rules import Rule, choose_ranks, parse_rule

SCHEMA = "rankscope.suggest/1"


@dataclass(frozen=True)
class LayerSuggestion:
    """One layer's kept rank and what keeping it costs and loses."""

    name: str
    rank: int
    current_rank: int
    matrix_shape: tuple[int, int]
    retained_energy: float
    spectral_error: float
    frobenius_error: float
    alpha: float
    scale: float
    wanted: int
    clamped: str | None
    params_before: int
    params_after: int
    energy: float  # Σσ² = ‖ΔW‖_F²

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "rank": self.rank,
            "current_rank": self.current_rank,
            "retained_energy": self.retained_energy,
            "spectral_error": self.spectral_error,
            "frobenius_error": self.frobenius_error,
            "alpha": self.alpha,
            "rule_rank": self.wanted,
            "clamped": self.clamped,
            "params_before": self.params_before,
            "params_after": self.params_after,
        }


@dataclass
class Suggestion:
    """A rank per layer and the ``LoraConfig`` fields (``r``, ``lora_alpha``, ``use_rslora``, ``rank_pattern``,
    ``alpha_pattern``, ``exclude_modules``) that give each layer its rank with the scale it has now."""

    rule: Rule | None
    layers: list[LayerSuggestion]
    use_rslora: bool
    max_rank: int | None = None
    min_rank: int = 0
    left_out: list[tuple[str, str]] = field(default_factory=list)  # (layer, why): invalid layers
    source: dict = field(default_factory=dict)  # path, family, adapter_type of the analysed checkpoint

    @property
    def kept(self) -> list[LayerSuggestion]:
        return [layer for layer in self.layers if layer.rank > 0]

    @property
    def r(self) -> int:
        """The most common kept rank (ties: the larger)."""
        return lora_fields(self._entries())[0]

    @property
    def lora_alpha(self) -> float:
        """The most common α among the layers of rank ``r``."""
        return lora_fields(self._entries())[1]

    @property
    def rank_pattern(self) -> dict[str, int]:
        """Module path (no ``base_model.model.``) → rank, for the layers whose rank is not ``r``."""
        return lora_fields(self._entries())[2]

    @property
    def alpha_pattern(self) -> dict[str, float]:
        """Module path → α_k, for the layers whose α is not ``lora_alpha``."""
        return lora_fields(self._entries())[3]

    def _entries(self) -> list[tuple[str, int, float]]:
        """(module path, rank, α) of the kept layers; MoE experts (``<parameter>[<e>]``) as their parameter, at the
        largest rank among them: PEFT gives a parameter's experts one r (``resize.experts``)."""
        entries, widest = [], {}
        for layer in self.kept:
            found = expert_slice(layer.name)
            if found is None:
                entries.append((layer.name, layer.rank, layer.alpha))
            elif found[0] not in widest or layer.rank > widest[found[0]].rank:
                widest[found[0]] = layer
        return entries + [(path, layer.rank, layer.alpha) for path, layer in widest.items()]

    @property
    def exclude_modules(self) -> list[str]:
        """Layers whose update is zero (rank 0): a LoRA of them would add nothing (not MoE experts, whose
        parameter PEFT wraps whole)."""
        return [layer.name for layer in self.layers if layer.rank == 0 and expert_slice(layer.name) is None]

    @property
    def params_before(self) -> int:
        return sum(layer.params_before for layer in self.layers)

    @property
    def params_after(self) -> int:
        return sum(layer.params_after for layer in self.layers)

    @property
    def retained_energy(self) -> float:
        """Σ over layers of kept σ² / Σ over layers of all σ² (1 where every update is zero)."""
        total = sum(layer.energy for layer in self.layers)
        lost = sum(layer.frobenius_error**2 for layer in self.layers)
        return 1.0 - lost / total if total > 0 else 1.0

    def lora_config(self) -> dict:
        """The keyword arguments of ``peft.LoraConfig`` that give each layer its rank and scale."""
        return {
            "r": self.r,
            "lora_alpha": self.lora_alpha,
            "use_rslora": self.use_rslora,
            "rank_pattern": self.rank_pattern,
            "alpha_pattern": self.alpha_pattern,
            "exclude_modules": self.exclude_modules or None,
        }

    def messages(self) -> list[str]:
        """What a user must be told: clamped ranks, zero layers excluded, layers left out."""
        out = []
        clamped = [layer for layer in self.layers if layer.clamped and layer.clamped != "zero update"]
        for reason in dict.fromkeys(layer.clamped for layer in clamped):
            names = [layer.name for layer in clamped if layer.clamped == reason]
            out.append(f"{len(names)} layer(s) {reason}: {', '.join(names[:3])}{' …' if len(names) > 3 else ''}")
        if self.exclude_modules:
            names = self.exclude_modules
            out.append(
                f"{len(names)} layer(s) have a zero update, so rank 0: listed in exclude_modules "
                f"({', '.join(names[:3])}{' …' if len(names) > 3 else ''})"
            )
        for name, why in self.left_out:
            out.append(f"layer {name} left out (cannot be analysed: {why})")
        return out

    def to_dict(self) -> dict:
        """The ``rankscope.suggest/1`` document."""
        return {
            "schema": SCHEMA,
            "checkpoint": self.source,
            "rule": str(self.rule) if self.rule is not None else "lossless",
            "max_rank": self.max_rank,
            "min_rank": self.min_rank,
            **self.lora_config(),
            "exclude_modules": self.exclude_modules,
            "layers": [layer.to_dict() for layer in self.layers],
            "left_out": [{"name": name, "error": why} for name, why in self.left_out],
            "totals": {
                "layers": len(self.layers),
                "kept_layers": len(self.kept),
                "current_rank": sum(layer.current_rank for layer in self.layers),
                "rank": sum(layer.rank for layer in self.layers),
                "retained_energy": self.retained_energy,
                "params_before": self.params_before,
                "params_after": self.params_after,
            },
            "messages": self.messages(),
        }


def lora_fields(entries: Sequence[tuple[str, int, float]]) -> tuple[int, float, dict[str, int], dict[str, float]]:
    """``LoraConfig``'s (r, lora_alpha, rank_pattern, alpha_pattern) for (module path, rank > 0, α) entries: r the
    most common rank (ties: the larger), α the most common among the entries of rank r, the patterns the rest."""
    ranks = Counter(rank for _, rank, _ in entries)
    r = max(ranks, key=lambda k: (ranks[k], k)) if ranks else 0
    alphas = Counter(alpha for _, rank, alpha in entries if rank == r)
    alpha = max(alphas, key=lambda a: (alphas[a], a)) if alphas else 0
    rank_pattern = {name: rank for name, rank, _ in entries if rank != r}
    return r, alpha, rank_pattern, {name: a for name, _, a in entries if a != alpha}


def alpha_for(rank: int, scale: float, use_rslora: bool) -> float:
    """α_k with α_k/k = s (α_k/√k = s under rsLoRA); integral values as ints, for tidy configs."""
    alpha = scale * (math.sqrt(rank) if use_rslora else rank)
    return round(alpha) if abs(alpha - round(alpha)) <= 1e-9 * max(1.0, abs(alpha)) else alpha


def usable_scale(scale: float | None) -> float:
    """The layer's scale where it is one positive number, else 1 (the factors then carry the whole update)."""
    return float(scale) if scale is not None and math.isfinite(scale) and scale > 0 else 1.0


def plan(
    names: Sequence[str],
    spectra: Sequence[torch.Tensor],
    shapes: Sequence[tuple[int, int]],
    *,
    rule: Rule | str | None,
    current_ranks: Sequence[int],
    params: Sequence[int],
    scales: Sequence[float | None],
    use_rslora: bool = False,
    max_rank: int | None = None,
    min_rank: int = 0,
) -> Suggestion:
    """The suggestion for layers given by their spectra (σ sorted descending, float64) and matrix shapes (m, n)."""
    rule = parse_rule(rule) if rule is not None else None
    choices = choose_ranks(rule, spectra, shapes, max_rank=max_rank, min_rank=min_rank)
    layers = []
    for name, sigma, shape, choice, current, count, scale in zip(
        names, spectra, shapes, choices, current_ranks, params, scales, strict=True
    ):
        sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1)
        k = choice.rank
        total = float((sigma**2).sum())
        lost = float((sigma[k:] ** 2).sum())
        s = usable_scale(scale)
        layer = LayerSuggestion(
            name=name,
            rank=k,
            current_rank=int(current),
            matrix_shape=(int(shape[0]), int(shape[1])),
            retained_energy=1.0 - lost / total if total > 0 else 1.0,
            spectral_error=float(sigma[k]) if k < sigma.numel() else 0.0,
            frobenius_error=math.sqrt(lost),
            alpha=alpha_for(k, s, use_rslora) if k else 0,
            scale=s,
            wanted=choice.wanted,
            clamped=choice.clamped,
            params_before=int(count),
            params_after=k * (int(shape[0]) + int(shape[1])),
            energy=total,
        )
        layers.append(layer)
    return Suggestion(rule, layers, use_rslora, max_rank, min_rank)


def suggest(analysis, rule: Rule | str, *, max_rank: int | None = None, min_rank: int = 0) -> Suggestion:
    """Per-layer ranks under ``rule`` (``"energy:0.95"``, ``"params:2M"``, … see ``rules.ACCEPTED``) for an
    :class:`~rankscope.analysis.Analysis`; invalid layers are left out and listed in ``left_out``."""
    valid = [record for record in analysis.layers if record.valid]
    checkpoint = analysis.checkpoint
    use_rslora = bool((checkpoint.config or {}).get("use_rslora")) and not analysis.options.unscaled
    suggestion = plan(
        [record.name for record in valid],
        [torch.tensor(record.singular_values, dtype=torch.float64) for record in valid],
        [tuple(record.matrix_shape) for record in valid],
        rule=rule,
        current_ranks=[record.rank_bound for record in valid],
        params=[record.params for record in valid],
        scales=[record.scale for record in valid],
        use_rslora=use_rslora,
        max_rank=max_rank,
        min_rank=min_rank,
    )
    suggestion.left_out = [(record.name, record.error or "invalid") for record in analysis.layers if not record.valid]
    suggestion.source = {
        "path": str(checkpoint.path),
        "family": checkpoint.family,
        "adapter_type": checkpoint.adapter_type,
    }
    return suggestion


def energy_frontier(analysis, *, by: str = "rank") -> tuple[list[float], list[float]]:
    """The most energy any allocation keeps at each budget: (total rank or parameters, retained energy), from 0.

    By rank, the directions of all layers taken in order of σ² (Eckart–Young per layer, so optimal for a total
    rank); by parameters, in order of σ²/(m+n) with each costing m+n (the ``params:N`` rule's greedy order).
    """
    if by not in ("rank", "params"):
        raise ValueError(f"by must be 'rank' or 'params', got {by!r}")
    items = []
    for record in analysis.layers:
        if not record.valid:
            continue
        m, n = record.matrix_shape[0], record.matrix_shape[-1]
        cost = 1 if by == "rank" else m + n
        items += [(s * s / cost, s * s, cost) for s in record.singular_values if s > 0]
    items.sort(key=lambda item: -item[0])
    total = sum(energy for _, energy, _ in items)
    xs, ys, spent, kept = [0.0], [0.0], 0.0, 0.0
    for _, energy, cost in items:
        spent, kept = spent + cost, kept + energy
        xs.append(spent)
        ys.append(kept / total if total > 0 else 1.0)
    return xs, ys


__all__ = ["SCHEMA", "LayerSuggestion", "Suggestion", "alpha_for", "energy_frontier", "plan", "suggest", "usable_scale"]
