"""Building composed layers — Σ_i w_i·ΔW_i over components that share a module — for the readers that need it
(composition manifests, BoostLoRA single files, ``--compose``)."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

from .checkpoint import Composition, Layer
from .errors import CheckpointError
from .formed import weighted_sum

NORMALIZATIONS = ("none", "softmax")
MODES = ("sum", "sequential")


def normalize_weights(raw: Sequence[float], normalize: str) -> tuple[float, ...]:
    """The weights as applied: as stored (``none``) or softmax(raw) (``softmax``: the stored values are logits)."""
    if normalize == "none":
        return tuple(float(w) for w in raw)
    if normalize == "softmax":
        top = max(raw)
        exps = [math.exp(float(w) - top) for w in raw]
        return tuple(e / sum(exps) for e in exps)
    raise ValueError(f"normalize must be one of {', '.join(NORMALIZATIONS)}, not {normalize!r}")


def layer_weights(spec: object, layer: str, count: int, *, where: object) -> tuple[float, ...]:
    """Raw weights for ``layer`` from a manifest's ``weights``: a list of k numbers, or
    ``{"default": [...], "per_layer": {"<regex>": [...]}}`` where the first regex that matches the layer name
    (PEFT-style suffix match: ``re.match(rf"(.*\\.)?({regex})$", name)``) wins."""
    chosen = spec
    if isinstance(spec, Mapping):
        chosen = spec.get("default")
        for pattern, values in (spec.get("per_layer") or {}).items():
            try:
                if re.match(rf"(.*\.)?({pattern})$", layer):
                    chosen = values
                    break
            except re.error as exc:
                raise CheckpointError(f"weights pattern {pattern!r} is not a valid regex ({exc})", path=where) from exc
        if chosen is None:
            raise CheckpointError(
                f"no weights for layer {layer!r}: no per_layer pattern matches and no default", path=where
            )
    if not isinstance(chosen, Sequence) or isinstance(chosen, str):
        raise CheckpointError(f"weights must be a list of numbers, found {chosen!r}", path=where)
    if len(chosen) != count:
        raise CheckpointError(f"{len(chosen)} weights for {count} components (layer {layer!r})", path=where)
    values = []
    for value in chosen:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise CheckpointError(f"weight {value!r} is not a finite number", path=where)
        values.append(float(value))
    return tuple(values)


def compose_layer(
    name: str,
    components: Sequence[Layer],
    raw_weights: Sequence[float],
    *,
    weights: Sequence[float] | None = None,
    normalize: str = "none",
    mode: str = "sum",
) -> Layer:
    """One layer whose update is Σ_i w_i·ΔW_i over ``components`` (each named by its label).

    ``weights`` are the applied weights when they are not simply ``normalize_weights(raw_weights, normalize)``
    (a layer that only some components adapt takes its share of weights normalised over all of them).
    """
    weights = tuple(weights) if weights is not None else normalize_weights(raw_weights, normalize)
    composition = Composition(tuple(float(w) for w in raw_weights), weights, mode=mode, normalize=normalize)
    first = components[0]
    params = sum(c.params for c in components)
    broken = next((c for c in components if c.update is None), None)
    if broken is not None:
        return Layer(name, None, first.shape, params, kind=first.kind, family="composition",
                     error=f"component {broken.name}: {broken.error}", components=list(components),
                     composition=composition)  # fmt: skip
    shapes = {c.update.shape for c in components}
    if len(shapes) > 1:
        detail = ", ".join(f"{c.name} {list(c.update.shape)}" for c in components)
        return Layer(name, None, first.shape, params, kind=first.kind, family="composition",
                     error=f"components of different shapes: {detail}", components=list(components),
                     composition=composition)  # fmt: skip
    update = weighted_sum([c.update for c in components], weights)
    return Layer(
        name,
        update,
        first.shape,
        params,
        kind=first.kind,
        family="composition",
        components=list(components),
        composition=composition,
    )
