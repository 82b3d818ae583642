"""KaSA (PEFT LoRA's ``kasa_config``): a learned diagonal between the factors, and a truncated base.

At init PEFT 0.21 replaces the base weight W₀ by its rank-(k − r) SVD truncation (``W₀ = U·S·Vᴴ`` in float32,
k = min(m, n); the r smallest components U_d·S_d·Vᴴ_d are dropped) and trains ``<module>.lora_diag`` d (r,)
with the LoRA factors: the layer applies W_trunc + s·B·diag(d)·A. Against the original base, as the adapter is
loaded onto it (PEFT re-runs the truncation), the update is

    ΔW = s·B·diag(d)·A − U_d·S_d·Vᴴ_d = [B, U_d·S_d]·diag(s, …, s, 1, …, 1)·diag(d, −1, …, −1)·[A; Vᴴ_d],

exact and factored (inner dimension 2r), with U_d·S_d·Vᴴ_d recomputed from ``--base`` as PEFT does (a float32
SVD, then float64). Without ``--base`` s·B·diag(d)·A alone is analysed, marked not exact, with a warning.
The float32 rounding of W_trunc itself (full rank, ~eps₃₂·σ₁(W₀)) is not the adapter's and is left out.
"""

from __future__ import annotations

import re
from dataclasses import replace

import torch

from ...core.base import BaseWeights
from ...core.checkpoint import Layer
from ...core.update import FactoredUpdate, upcast
from .reader import invalid_layer

DIAG_KEY = re.compile(r"^(?P<module>.+)\.lora_diag$")


def split(keys: list[str]) -> tuple[dict[str, str], list[str]]:
    """{stored module: key} of the ``lora_diag`` vectors in ``keys``, and the other keys."""
    diagonals, rest = {}, []
    for key in keys:
        match = DIAG_KEY.match(key)
        if match is not None:
            diagonals[match["module"]] = key
        else:
            rest.append(key)
    return diagonals, rest


def kasa_layer(layer: Layer, key: str, diagonal: torch.Tensor, base: BaseWeights | None) -> Layer:
    """The KaSA update of a LoRA layer read as s·B·A (see the module docstring)."""
    update = layer.update
    if not isinstance(update, FactoredUpdate) or layer.kind != "linear":
        if layer.update is None:
            return layer
        return invalid_layer(layer.name, f"{key}: KaSA adapts Linear layers only, found a {layer.kind}", layer.params)
    rank, s = update.inner_dim, update.scalar_scale
    if tuple(diagonal.shape) != (rank,) or not bool(torch.isfinite(diagonal).all()):
        return invalid_layer(layer.name, f"{key}: expected {rank} finite values, found shape {list(diagonal.shape)}")
    params = layer.params + diagonal.numel()
    d = upcast(diagonal)
    if base is None:
        trained = FactoredUpdate(update.left, update.right, core=torch.diag(d), scale=s)
        return replace(layer, update=trained, params=params, family="kasa", exact=False)
    w0 = base.get(layer.name)
    if tuple(w0.shape) != tuple(update.shape) or rank >= min(update.shape):
        return invalid_layer(
            layer.name, f"{key}: the base weight {list(w0.shape)} does not fit a rank-{rank} KaSA of shape "
            f"{list(update.shape)}", params,
        )  # fmt: skip
    u, sigma, vh = torch.linalg.svd(w0.detach().to(torch.float32), full_matrices=False)
    keep = min(update.shape) - rank
    left = torch.cat([upcast(update.left), upcast(u[:, keep:] * sigma[keep:])], dim=1)
    right = torch.cat([upcast(update.right), upcast(vh[keep:])], dim=0)
    scale = torch.cat([torch.full((rank,), float(s), dtype=torch.float64), torch.ones(rank, dtype=torch.float64)])
    core = torch.diag(torch.cat([d, -torch.ones(rank, dtype=torch.float64)]))
    return replace(layer, update=FactoredUpdate(left, right, core=core, scale=scale), params=params, family="kasa")


def warning(estimated: list[str]) -> str:
    return (
        f"KaSA: {len(estimated)} layer(s) analysed as s·B·diag(d)·A alone ({estimated[0]} …): PEFT also drops the r "
        "smallest singular components of the base weight, which needs it; pass --base BASE"
    )


def apply(pairs: list, diagonals: dict[str, str], tensors, base: BaseWeights | None) -> tuple[list, list[str], list]:
    """(the (module, layer) pairs with KaSA's update where a module has a ``lora_diag``, warnings, unused keys)."""
    result, estimated, used = [], [], set()
    for module, layer in pairs:
        key = diagonals.get(module.stored)
        if key is not None:
            used.add(key)
            layer = kasa_layer(layer, key, tensors.get(key), base)
            if not layer.exact and layer.family == "kasa":
                estimated.append(layer.name)
        result.append((module, layer))
    unused = [key for key in diagonals.values() if key not in used]
    return result, [warning(estimated)] if estimated else [], unused
