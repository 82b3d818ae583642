"""LoRA inits that rewrite the base weight (PEFT's ``init_lora_weights``): the update the reloaded model applies.

PiSSA and OLoRA set the base weight to W₀ − s·B₀A₀ at init and train B, A from B₀, A₀; a file saved without
``path_initial_model_for_weight_conversion`` holds only the trained B′, A′. ``PeftModel.from_pretrained`` onto
the original base re-runs the init, so against W₀ the model applies

    ΔW = s·(B′A′ − B₀A₀)        rank ≤ 2r: FactoredUpdate([B′, −B₀], [A′; A₀], scale=s)

s·B₀A₀ is recomputed from W₀ (``--base``) as PEFT 0.21's ``pissa_init`` / ``olora_init`` do, in float32 (exact
where the user's init ran the same float32 LAPACK routine, as on a CPU; an init on a GPU may differ by about
eps₃₂·σ₁(W₀)):

- PiSSA: W₀ = V·S·Uᴴ (the analysed (out, in) matrix), B₀ = V_r·diag(√(S_r/s)), A₀ = diag(√(S_r/s))·Uᴴ_r, so
  s·B₀A₀ = V_r·S_r·Uᴴ_r whatever s; unique only when σ_r > σ_{r+1} (a near tie is warned and not exact).
- OLoRA: W = Q·R of the weight as stored (PEFT does not transpose GPT-2's Conv1D here), B₀ = Q[:, :r],
  A₀ = R[:r]: Q_r·R_r is the projection of W onto the span of its first r columns, whatever the QR's signs.

``pissa_niter_K`` uses a randomised SVD that PEFT redraws on each load: the exact top-r part is subtracted and
the layer is marked not exact. CorDA, LoftQ and LoRA-GA rewrite the base from data the files do not hold
(covariances, a quantiser, gradients): s·B′A′ is analysed and marked not exact. PEFT applies PiSSA, OLoRA and
CorDA to Linear (and Conv1D) layers only; LoftQ and LoRA-GA to Embedding and Conv layers too. A bf16/fp16
model keeps W₀ − s·B₀A₀ rounded to its dtype: that rounding (full rank, ~2⁻⁹·|W| for bf16) is not the
adapter's and is not part of ΔW here.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ...core.base import BaseWeights, as_matrix
from ...core.checkpoint import Layer, listed
from ...core.errors import CheckpointError
from ...core.update import FactoredUpdate, upcast

# PiSSA's top-r subspace counts as unique when σ_r − σ_{r+1} > TIE·σ₁: a float32 SVD (~6e-8·σ₁ of error)
# then moves it by ≲ 1e-3 relative; closer ties are warned about and marked not exact
TIE = 1e-4
_LINEAR_KINDS = ("linear", "conv1d_gpt2")  # PEFT's lora.Linear (its Conv1D too)


@dataclass(frozen=True)
class Init:
    """A base-rewriting init: its name, whether --base recomputes it exactly, and the layer kinds it rewrites."""

    name: str
    recomputable: bool  # from the base weight alone, deterministically
    kinds: tuple[str, ...] | None  # None: every kind

    @property
    def from_base(self) -> bool:
        """Whether s·B₀A₀ is a function of the base weight (PiSSA, OLoRA; randomised for pissa_niter_K)."""
        return self.name == "olora" or self.name.startswith("pissa")


def base_rewriting_init(value: object) -> Init | None:
    """PEFT's dispatch on ``init_lora_weights`` (lora/layer.py ``update_layer``), for the inits that rewrite W."""
    if not isinstance(value, str):
        return None
    if value == "pissa":
        return Init("pissa", True, _LINEAR_KINDS)
    if value.startswith("pissa"):
        return Init(value, False, _LINEAR_KINDS)
    if value.lower() == "olora":
        return Init("olora", True, _LINEAR_KINDS)
    if value.startswith("corda"):
        return Init(value, False, _LINEAR_KINDS)
    if value in ("loftq", "lora_ga"):
        return Init(value, False, None)
    return None


def pissa_factors(weight: torch.Tensor, r: int, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PEFT's PiSSA init of ``weight`` (out, in) in float32: (B₀, A₀, all singular values of the weight)."""
    v, s, uh = torch.linalg.svd(weight.to(torch.float32), full_matrices=False)
    sr = s[:r] / scale  # PEFT: Sr /= scaling, in float32
    b0 = v[:, :r] @ torch.diag(torch.sqrt(sr))
    a0 = torch.diag(torch.sqrt(sr)) @ uh[:r]
    return b0, a0, s


def olora_factors(stored: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's OLoRA init of the weight as stored, in float32: (Q[:, :r], R[:r])."""
    q, rr = torch.linalg.qr(stored.to(torch.float32))
    return q[:, :r], rr[:r]


@dataclass
class _Outcome:
    """How one init treated the layers: layer names by what happened."""

    recomputed: list[str]
    estimated: list[str]  # not exact: randomised, a near tie, or not recomputable
    ties: list[str]


def _with_init(layer: Layer, init: Init, base: BaseWeights, outcome: _Outcome) -> Layer:
    """``layer`` (s·B′A′) as s·(B′A′ − B₀A₀) with B₀A₀ recomputed from ``base``."""
    update = layer.update
    r = update.inner_dim
    key = base.key_for(layer.name)
    if key is None:
        missing = f"{init.name} init: the base model has no weight for layer {layer.name!r} (looked in {base.path})"
        return replace(layer, update=None, error=missing)
    stored = base.get(layer.name)
    weight = as_matrix(stored, layer.kind)
    if tuple(weight.shape) != update.shape:
        raise CheckpointError(
            f"the weight's shape {list(stored.shape)} does not match the adapter's {list(layer.shape)} for layer "
            f"{layer.name!r} (is base the model this adapter was trained on?)",
            path=base.path,
            key=key,
            argument="base",
        )
    exact = layer.exact
    if init.name == "olora":
        q, rr = olora_factors(stored, r)
        # PEFT subtracts s·Q_r·R_r from the stored weight: in the analysed layout of a Conv1D that is its transpose
        left0, right0 = (rr.T, q.T) if layer.kind == "conv1d_gpt2" else (q, rr)
    else:
        left0, right0, sigma = pissa_factors(weight, r, update.scalar_scale)
        if init.name != "pissa":
            exact = False
        elif r < sigma.numel() and sigma[r - 1] - sigma[r] <= TIE * sigma[0]:
            outcome.ties.append(layer.name)
            exact = False
    (outcome.recomputed if exact else outcome.estimated).append(layer.name)
    left = torch.cat([upcast(update.left), -upcast(left0)], dim=1)
    right = torch.cat([upcast(update.right), upcast(right0)], dim=0)
    return replace(layer, update=FactoredUpdate(left, right, scale=update.scale), exact=exact)


def apply_init(
    layers: list[Layer], init_of: dict[str, object], base: BaseWeights | None
) -> tuple[list[Layer], list[str]]:
    """The layers as the reloaded model applies them, and warnings; ``init_of`` maps a layer name to its
    ``init_lora_weights``. Layers an init does not rewrite, and invalid ones, are returned as they are."""
    groups: dict[str, tuple[Init, _Outcome]] = {}
    result = []
    for layer in layers:
        init = base_rewriting_init(init_of.get(layer.name))
        applies = init is not None and (init.kinds is None or layer.kind in init.kinds)
        if not applies or not isinstance(layer.update, FactoredUpdate):
            result.append(layer)
            continue
        _, outcome = groups.setdefault(init.name, (init, _Outcome([], [], [])))
        if init.from_base and base is not None:
            result.append(_with_init(layer, init, base, outcome))
            continue
        outcome.estimated.append(layer.name)
        result.append(replace(layer, exact=False))
    return result, [_warning(init, outcome, base is not None) for init, outcome in groups.values()]


def _warning(init: Init, outcome: _Outcome, with_base: bool) -> str:
    rewrite = "a quantised W" if init.name == "loftq" else "W − s·B₀A₀"
    head = f"init_lora_weights={init.name!r} rewrote the base weight to {rewrite} at init and the file holds "
    if init.from_base:
        head += (
            "only the trained B′, A′: PEFT re-runs that init when it loads the adapter, so the model applies "
            "ΔW = s·(B′A′ − B₀A₀) (rank ≤ 2r; PEFT's path_initial_model_for_weight_conversion saves it as a plain LoRA)"
        )
        if not with_base:
            return (
                f"{head}; s·B₀A₀ comes from the base weight: pass --base BASE to recompute it as PEFT does. Without it "
                f"s·B′A′ alone is analysed and marked exact: false ({_layers(outcome.estimated)})"
            )
        parts = [head]
        if outcome.recomputed:
            parts.append(f"s·B₀A₀ recomputed from --base as PEFT does, in float32 ({_layers(outcome.recomputed)})")
        if init.name not in ("pissa", "olora"):
            parts.append(
                "its randomised SVD (torch.svd_lowrank) is redrawn on every load: the exact top-r SVD part is "
                f"subtracted instead, and the layers are marked exact: false ({_layers(outcome.estimated)})"
            )
        elif outcome.ties:
            parts.append(
                f"σ_r and σ_(r+1) of W nearly tie (gap ≤ {TIE:g}·σ₁), so the top-r part PEFT subtracts is not unique "
                f"and its float32 SVD may differ from this one: marked exact: false ({_layers(outcome.ties)})"
            )
        return "; ".join(parts)
    source = {"loftq": "a quantised copy of W", "lora_ga": "gradients"}.get(init.name, "activation statistics")
    return (
        f"{head}B′, A′ trained from an init computed from {source}, which the files do not hold: ΔW against the "
        f"original base cannot be recomputed, so s·B′A′ is analysed and marked exact: false "
        f"({_layers(outcome.estimated)}; PEFT's path_initial_model_for_weight_conversion saves the true update)"
    )


def _layers(names: list[str]) -> str:
    return listed(names, counted="layer(s)")
