"""Any update rankscope reads, written back as a plain LoRA: the truncated SVD taken from the factored core.

For a kept rank k with U_k, Σ_k, V_k — for plain factored updates U_k = L·R_L⁻¹·U_core,k from the spectrum's R
factors (``_from_r_factors``), otherwise ``core.spectrum.singular_vectors`` (U = Q_L·U_core; no dense ΔW for
factored and Kronecker updates) — and the LoRA scale s_k = α_k/k (α_k/√k under rsLoRA):

    B′ = U_k·Σ_k^{½}/√s_k,   A′ = Σ_k^{½}·V_kᵀ/√s_k,   so   s_k·B′A′ = U_kΣ_kV_kᵀ,

the best rank-k approximation of ΔW (Eckart–Young). Several checkpoints merge as Σ wᵢ·ΔWᵢ, one joined
factored update per layer (``core.formed.weighted_sum``), converted the same way.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..core.checkpoint import Checkpoint, Layer
from ..core.errors import UsageProblem
from ..core.factored import update_r_factors
from ..core.formed import FormedUpdate, weighted_sum
from ..core.spectrum import singular_vectors
from ..core.update import FactoredUpdate, KroneckerUpdate, Update, upcast
from .experts import group_experts, stack
from .rules import Rule, parse_rule
from .suggest import Suggestion, alpha_for, plan

# layer kinds a plain LoRA can carry (PEFT's Linear, Conv1D with fan_in_fan_out, ConvNd, Embedding); "matrix" is a
# LyCORIS 2-D form read without --base (a Linear, or a flattened conv): written as Linear factors, and said
WRITABLE_KINDS = ("linear", "matrix", "conv1d_gpt2", "conv1d", "conv2d", "conv3d", "embedding")
EXPERT_KINDS = ("expert", "expert_transposed")  # formats.common.lora_params
EXACT_KINDS = (FactoredUpdate, KroneckerUpdate)


@dataclass(frozen=True)
class ConvertedLayer:
    """One layer as LoRA factors: ΔW′ = (α/k)·up·down (α/√k under rsLoRA), float64 until written."""

    name: str
    kind: str
    weight_shape: tuple[int, ...]  # the base weight's shape as the module stores it
    down: torch.Tensor  # A′: k × n
    up: torch.Tensor  # B′: m × k
    alpha: float
    bias: torch.Tensor | None = None  # lora_B.bias, to be applied with the layer's scale like B′A′
    experts: int = 1  # E > 1: a MoE parameter in PEFT's stacked layout (resize.experts), down E·k × n, up m × E·k

    @property
    def rank(self) -> int:
        return int(self.down.shape[0]) // self.experts


@dataclass
class ConvertedAdapter:
    """A converted adapter: its layers, the ranks chosen (``suggestion``) and where it came from; ``save`` writes it."""

    layers: list[ConvertedLayer]
    suggestion: Suggestion
    sources: list[Checkpoint]
    weights: tuple[float, ...] | None = None
    notes: list[str] = field(default_factory=list)  # what was lost or assumed, for the output's README
    lost: list[str] = field(default_factory=list)  # updates not written at all (also in the README): warnings

    @property
    def use_rslora(self) -> bool:
        return self.suggestion.use_rslora

    def scale(self, layer: ConvertedLayer) -> float:
        return layer.alpha / (math.sqrt(layer.rank) if self.use_rslora else layer.rank)

    def delta(self, name: str) -> torch.Tensor:
        """ΔW′ of one layer as the written adapter applies it, float64 (m × n; E × m × n for stacked experts)."""
        layer = next(x for x in self.layers if x.name == name)
        if layer.experts == 1:
            return self.scale(layer) * (layer.up @ layer.down)
        k, count = layer.rank, layer.experts
        parts = [layer.up[:, e::count] @ layer.down[e * k : (e + 1) * k] for e in range(count)]
        return self.scale(layer) * torch.stack(parts)

    def save(self, path: str | Path, *, to: str = "peft", dtype: str = "float32") -> Path:
        """Write the adapter (``to``: peft, kohya or diffusers) atomically; see :mod:`rankscope.resize.writers`."""
        from .writers import write_adapter

        return write_adapter(self, path, to=to, dtype=dtype)


def _merged_layers(checkpoints: Sequence[Checkpoint], weights: Sequence[float]) -> tuple[list, list[tuple[str, str]]]:
    """(name, update, template layer, params) per layer name over the checkpoints, Σ wᵢ·ΔWᵢ where several hold it."""
    names: dict[str, list[tuple[float, Layer]]] = {}
    for checkpoint, weight in zip(checkpoints, weights, strict=True):
        for layer in checkpoint.layers:
            names.setdefault(layer.name, []).append((weight, layer))
    merged, left_out = [], []
    for name, parts in names.items():
        broken = [layer for _, layer in parts if layer.update is None]
        if broken:
            left_out.append((name, broken[0].error or "cannot be analysed"))
            continue
        template = parts[0][1]
        if len(parts) == 1 and parts[0][0] == 1.0:
            update: Update = template.update
        else:
            shapes = {layer.update.shape for _, layer in parts}
            if len(shapes) > 1:
                raise UsageProblem(f"layer {name} has different shapes {sorted(shapes)} in the adapters to merge")
            update = weighted_sum([layer.update for _, layer in parts], [w for w, _ in parts])
        bias = _merged_bias(parts)
        merged.append((name, update, template, sum(layer.params for _, layer in parts), bias))
    return merged, left_out


def _merged_bias(parts: list[tuple[float, Layer]]) -> torch.Tensor | None:
    """Σ wᵢ·Δbᵢ as the model applies it: scaled like BA where the format says so and the scale is one number (the
    rule ``analysis.analyze`` applies)."""
    total = None
    for weight, layer in parts:
        if layer.bias_update is None:
            continue
        scale = layer.scale if layer.bias_scaled and layer.scale is not None else 1.0
        term = weight * scale * upcast(layer.bias_update.reshape(-1))
        total = term if total is None else total + term
    return total


# κ(R) above which U_k = L·R_L⁻¹·U_core,k is not used: its error is about u·κ (below, ~1e-10 relative)
MAX_R_CONDITION = 1e6


def _from_r_factors(update: FactoredUpdate, r_left: torch.Tensor, r_right: torch.Tensor, methods: tuple[str, str]):
    """(σ, vectors(k) → (U_k, V_k)) of a factored update from the R factors the spectrum already has (cached).

    L·diag(s) = Q_L·R_L·diag(s) and Rightᵀ = Q_R·R_R, so ΔW = Q_L·(R_L·diag(s)·C·R_Rᵀ)·Q_Rᵀ; with the core's SVD
    U_c·Σ·V_cᵀ, U_k = Q_L·U_c,k = L·(R_L⁻¹·U_c,k) — a K×K triangular solve and one m×K×k product, instead of a
    Householder QR that forms all of Q_L. With R backward stable (Householder, or CholeskyQR under the core's
    κ test) the error of L·R⁻¹ is about u·κ(R); None where κ(R) is above ``MAX_R_CONDITION`` (or R is singular),
    and the caller takes the QR path.
    """
    for r, method in zip((r_left, r_right), methods, strict=True):
        if method == "cholesky":  # accepted by the core's test ε·κ² ≤ 1e-7: κ is small already
            continue
        values = torch.linalg.svdvals(r)
        if values.numel() == 0 or not bool(values[-1] * MAX_R_CONDITION > values[0]):
            return None
    left_r = r_left * (
        update.scale.reshape(1, -1).to(r_left) if isinstance(update.scale, torch.Tensor) else update.scale
    )
    if update.core is not None:
        left_r = left_r @ upcast(update.core)
    u_core, sigma, vh_core = torch.linalg.svd(left_r @ r_right.mT, full_matrices=False)
    bound = update.rank_bound
    left, right = update.left, update.right

    def vectors(k: int) -> tuple[torch.Tensor, torch.Tensor]:
        x_left = torch.linalg.solve_triangular(r_left, u_core[:, :k], upper=True)
        x_right = torch.linalg.solve_triangular(r_right, vh_core[:k].mT, upper=True)
        return upcast(left) @ x_left, upcast(right).mT @ x_right

    return sigma[:bound], vectors


def _spectra(updates: Sequence[Update]) -> list[tuple[torch.Tensor, object]]:
    """(σ, vectors(k) → (U_k, V_k)) of each update: plain factored ones (square R factors) from their R factors,
    the rest (and ill-conditioned factors) from ``singular_vectors``."""
    plain = [
        i
        for i, u in enumerate(updates)
        if type(u) in (FactoredUpdate, FormedUpdate) and u.rank_bound > 0 and min(u.shape) >= u.inner_dim
    ]  # fmt: skip
    r_left, r_right, m_left, m_right = update_r_factors([updates[i] for i in plain]) if plain else ([], [], [], [])
    fast = {
        i: _from_r_factors(updates[i], rl, rr, (ml, mr))
        for i, rl, rr, ml, mr in zip(plain, r_left, r_right, m_left, m_right, strict=True)
    }
    out = []
    for i, update in enumerate(updates):
        if fast.get(i) is not None:
            out.append(fast[i])
            continue
        u, sigma, v = singular_vectors(update)
        out.append((sigma, lambda k, u=u, v=v: (u[:, :k], v[:, :k])))
    return out


def convert(
    checkpoints: Checkpoint | str | Path | Sequence[Checkpoint | str | Path],
    rule: Rule | str | None = None,
    *,
    weights: Sequence[float] | None = None,
    max_rank: int | None = None,
    min_rank: int = 0,
) -> ConvertedAdapter:
    """The checkpoint (or Σ wᵢ·ΔWᵢ of several) as a plain LoRA, each layer truncated by ``rule``.

    Without a rule the conversion is lossless: every nonzero direction is kept (the update's numerical rank); that
    needs an update with a factored or Kronecker form — a dense one (DoRA, IA3, OFT, full deltas) needs a rule.
    """
    from ..formats import load

    if isinstance(checkpoints, (Checkpoint, str, Path)):
        checkpoints = [checkpoints]
    loaded = [c if isinstance(c, Checkpoint) else load(c) for c in checkpoints]
    if weights is not None and len(weights) != len(loaded):
        raise UsageProblem(f"weights has {len(weights)} value(s) for {len(loaded)} adapter(s)", argument="weights")
    given_weights = tuple(float(w) for w in weights) if weights is not None else None
    parsed = parse_rule(rule) if rule is not None else None
    merged, left_out = _merged_layers(loaded, given_weights or (1.0,) * len(loaded))
    notes = [f"{c.path}: {message}" for c in loaded for message in c.notes if "uniform" in message.lower()]
    notes += [
        f"{c.path}: {len(c.not_analysed)} module(s) with adapter weights not converted: "
        + ", ".join(f"{item.module} ({item.reason})" for item in c.not_analysed[:3])
        for c in loaded
        if c.not_analysed
    ]
    writable, skipped, experts = [], [], []
    for item in merged:
        kind = item[2].kind
        (experts if kind in EXPERT_KINDS else skipped if kind not in WRITABLE_KINDS else writable).append(item)
    lost = []
    if skipped:
        lost.append(
            f"{len(skipped)} layer(s) of a kind a LoRA cannot carry were not written: "
            + ", ".join(f"{name} ({template.kind})" for name, _, template, _, _ in skipped[:3])
        )
    groups, broken = group_experts(experts, lambda item: item[0])
    if broken:
        lost.append(f"{len(broken)} MoE expert parameter(s) were not written: " + ", ".join(broken[:3]))
    writable += [item for members in groups.values() for item in members.values()]
    flat = [name for name, _, template, *_ in writable if template.kind == "matrix"]
    if flat:
        notes.append(
            f"{len(flat)} layer(s) stored in a 2-D form that fits a Linear layer and a flattened conv alike were "
            "written as Linear factors (give --base to tell convs apart)"
        )
    dense = [name for name, update, *_ in writable if not isinstance(update, EXACT_KINDS)]
    if parsed is None and dense:
        raise UsageProblem(
            f"layer {dense[0]} (and {len(dense) - 1} more) is a dense update, not a low-rank product: a lossless "
            "conversion would keep its full rank; give a rule (e.g. energy:0.99) to truncate it",
            argument="rule",
        )
    if dense:
        notes.append(
            f"{len(dense)} dense layer(s) decomposed by a float64 SVD of ΔW and truncated "
            "(per-layer errors: rankscope suggest --json)"
        )
    vectors = _spectra([update for _, update, *_ in writable])
    configs = [c.config or {} for c in loaded]
    use_rslora = all(bool(config.get("use_rslora")) for config in configs) and given_weights is None
    single = len(loaded) == 1 and given_weights is None
    suggestion = plan(
        [name for name, *_ in writable],
        [sigma for sigma, _ in vectors],
        [update.shape for _, update, *_ in writable],
        rule=parsed,
        current_ranks=[update.rank_bound for _, update, *_ in writable],
        params=[params for *_, params, _ in writable],
        scales=[update.scalar_scale if single else None for _, update, *_ in writable],
        use_rslora=use_rslora,
        max_rank=max_rank,
        min_rank=min_rank,
    )
    suggestion.left_out = left_out
    suggestion.source = {"path": ", ".join(str(c.path) for c in loaded), "family": loaded[0].family}
    layers, stacked = [], {}
    for (name, _, template, _, bias), (sigma, form), choice in zip(writable, vectors, suggestion.layers, strict=True):
        k = choice.rank
        if template.kind in EXPERT_KINDS:  # stacked per parameter below, zero experts too (PEFT wraps them all)
            stacked[name] = (template, _halves(sigma, form, k) if k else None, choice)
            continue
        if k == 0:
            continue
        s_k = choice.alpha / (math.sqrt(k) if use_rslora else k)
        root = torch.sqrt(sigma[:k] / s_k)
        u, v = form(k)  # only the k kept columns are formed
        layers.append(
            ConvertedLayer(
                name=name,
                kind=template.kind,
                weight_shape=tuple(int(x) for x in template.shape),
                down=root[:, None] * v.mT,
                up=u * root[None, :],
                alpha=choice.alpha,
                bias=bias / s_k if bias is not None else None,
            )
        )
    for path, members in groups.items():
        layers.append(_stacked(path, [stacked[f"{path}[{e}]"] for e in members], use_rslora))
    padded = [x.name for x in layers if x.experts > 1 and any(stacked[f"{x.name}[{e}]"][2].rank < x.rank
                                                              for e in range(x.experts))]  # fmt: skip
    if padded:
        notes.append(
            f"{len(padded)} MoE expert parameter(s) written at one r per parameter (PEFT's stacked layout): experts "
            f"of a lower rank are padded with zeros up to it ({', '.join(padded[:3])})"
        )
    return ConvertedAdapter(layers, suggestion, loaded, given_weights, notes, lost)


def _halves(sigma: torch.Tensor, form, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(U_kΣ_k^½, Σ_k^½V_kᵀ): the kept rank-k part of a layer, split evenly."""
    root = torch.sqrt(sigma[:k])
    u, v = form(k)
    return u * root[None, :], root[:, None] * v.mT


def _stacked(path: str, experts: list[tuple[Layer, object, object]], use_rslora: bool) -> ConvertedLayer:
    """One MoE parameter's experts in PEFT's stacked layout at r = the largest kept rank (at least 1)."""
    template, _, widest = max(experts, key=lambda item: item[2].rank)
    rank = max(widest.rank, 1)
    alpha = alpha_for(rank, widest.scale, use_rslora)
    down, up = stack([halves for _, halves, _ in experts], experts[0][0].update.shape, alpha, rank, use_rslora)
    shape = (len(experts), *(int(x) for x in template.shape))
    return ConvertedLayer(path, template.kind, shape, down, up, alpha, experts=len(experts))


__all__ = ["WRITABLE_KINDS", "ConvertedAdapter", "ConvertedLayer", "convert"]
