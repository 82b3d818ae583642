"""DoRA: PEFT LoRA with ``use_dora``, which adds ``<module>.lora_magnitude_vector`` (m) to lora_A/lora_B.

The layer's weight becomes m·V/‖V‖ with V = W0 + s·B·A, the norm taken per row of the analysed (out, in·k…)
matrix — PEFT 0.21's axis: per output row of a Linear (after transposing GPT-2's Conv1D under
``fan_in_fan_out``), per embedding dimension of an Embedding (the norm over the vocabulary), per output
channel of a Conv. So, with c = m/‖W0 + s·B·A‖_row,

    ΔW = diag(c)·(W0 + s·B·A) − W0 = diag(c − 1)·W0 + diag(c)·s·B·A,

which is generally full rank: a dense update that needs the base weights W0 (``--base``). With
``--directional-only`` the directional part s·B·A is analysed alone, as an exact factored update, and labelled
``DORA_DIRECTIONAL``. LoRA's own parsing (keys, r, α, orientation) is reused from :mod:`.lora`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import torch

from ..core.base import BaseWeights, as_matrix
from ..core.checkpoint import Checkpoint, Layer, Skipped
from ..core.errors import CheckpointError
from ..core.update import DenseUpdate, FactoredUpdate, upcast
from . import Format, ReadOptions, lora, register_format
from .common.peft import COMPONENTS, layer_config, nonfinite_problem, truthy
from .common.reader import build_checkpoint
from .common.source import AdapterSource

ALLOW = frozenset({"use_dora", "lora_magnitude_vector"})
DIRECTIONAL_WARNING = (
    "--directional-only: the DoRA magnitude vectors are ignored and s·B·A alone is analysed; the layers' actual "
    "ΔW = diag(m/‖W0 + s·BA‖)·(W0 + s·BA) − W0 is generally full rank (pass --base PATH to analyse it)"
)


def detect(source: AdapterSource) -> bool:
    """A LoRA config with ``use_dora``, or magnitude vectors, in a saved adapter (keys without adapter names)."""
    if source.peft_type not in (None, "LORA"):
        return False
    saved = [parts for parts in map(lora.split_key, source.tensors) if parts is not None and parts.adapter is None]
    if truthy((source.config or {}).get("use_dora")) and saved:
        return True
    return any(parts.attr == "lora_magnitude_vector" for parts in saved)


def dora_delta(
    directional: FactoredUpdate, magnitude: torch.Tensor, base_weight: torch.Tensor, dtype, device
) -> torch.Tensor:
    """ΔW = diag(c − 1)·W0 + diag(c)·D with D = s·B·A and c = m/‖W0 + D‖_row (W0 as the analysed matrix).

    The form with c − 1 avoids forming diag(c)·V − W0, which cancels where c ≈ 1 (a barely trained magnitude).
    """
    w0 = upcast(base_weight, dtype, device)
    update = directional.materialize(dtype, device)
    delta = torch.add(w0, update)  # V = W0 + D, then reused for ΔW: one temporary where there were four
    c = upcast(magnitude.reshape(-1, 1), dtype, device) / torch.linalg.vector_norm(delta, dim=1, keepdim=True)
    return torch.mul(w0, c - 1, out=delta).addcmul_(update, c)


def _missing_base(base: BaseWeights, layer: Layer) -> str | None:
    """Why ``base`` cannot serve ``layer``: None when it has the weight; a shape that differs is an error."""
    key = base.key_for(layer.name)
    if key is None:
        return (
            f"the base model has no weight for layer {layer.name!r} (looked for '{layer.name}.weight' in --base "
            f"{base.path})"
        )
    shape = tuple(base.shape(layer.name))
    if shape != tuple(layer.shape):
        raise CheckpointError(
            f"the weight's shape {list(shape)} does not match the adapter's {list(layer.shape)} for layer "
            f"{layer.name!r} (is base the model this adapter was trained on?)",
            path=base.path,
            key=key,
            argument="base",
        )
    return None


def dora_layer(
    source: AdapterSource, module, layer: Layer, base: BaseWeights | None, config: Mapping | None = None
) -> Layer:
    """``layer`` (LoRA's s·B·A of ``module``) with its magnitude applied against ``base``.

    ``base`` None (``--directional-only``) keeps s·B·A; the magnitude still counts in ``params``. In a diffusers
    pipeline file (one ``config`` per component) a layer of a component without ``use_dora`` is plain LoRA.
    """
    magnitude_key = module.keys.get("magnitude")
    magnitude = source.tensors.get(magnitude_key) if magnitude_key is not None else None
    params = layer.params + (magnitude.numel() if magnitude is not None else 0)
    plain = (
        magnitude is None
        and COMPONENTS in (config or {})
        and not truthy(layer_config(config, layer.name)[0].get("use_dora"))
    )
    if layer.update is None or base is None or plain:
        return replace(layer, params=params)
    rows = layer.update.shape[0]
    if magnitude is None:
        problem = f"{module.keys['A']}: DoRA (use_dora) but this module has no lora_magnitude_vector"
    elif magnitude.numel() != rows:
        problem = (
            f"{magnitude_key}: {magnitude.numel()} magnitudes for a ΔW of {rows} rows (shape {list(magnitude.shape)})"
        )
    elif "bias" in module.keys:
        problem = f"{module.keys['bias']}: a lora_B bias is not part of DoRA (PEFT refuses lora_bias with use_dora)"
    else:
        missing = _missing_base(base, layer)
        problem = nonfinite_problem(magnitude, magnitude_key) or (f"{magnitude_key}: {missing}" if missing else None)
    if problem:
        return replace(layer, update=None, params=params, error=problem)
    directional, kind = layer.update, layer.kind

    def build(dtype, device) -> torch.Tensor:
        return dora_delta(directional, magnitude, as_matrix(base.get(layer.name), kind), dtype, device)

    update = DenseUpdate(shape=directional.shape, build=build, scale=directional.scalar_scale)
    return replace(layer, update=update, params=params)


def read_dora(
    source: AdapterSource, options: ReadOptions, *, base: BaseWeights | None, adapter: str | None = None
) -> Checkpoint:
    """DoRA's layers (of ``adapter``, for a whole model's state dict) against ``base``; under
    ``options.directional_only`` s·B·A alone, and ``base`` is not needed."""
    directional = options.directional_only
    if base is None and not directional:
        raise CheckpointError(
            "DoRA (use_dora) rescales W0 + s·B·A row by row, so its ΔW needs the base model's weights: pass "
            "base=PATH (the base model directory or safetensors file), or directional_only=True to analyse s·B·A "
            "alone",
            path=source.where,
            argument=("base", "directional_only"),
        )
    parsed = lora.parse(source, options, adapter=adapter, allow=ALLOW)
    layers = [
        dora_layer(source, module, layer, None if directional else base, parsed.config)
        for module, layer in parsed.modules
    ]
    skipped = list(parsed.skipped)
    warnings = list(parsed.warnings)
    if directional:
        warnings.insert(0, DIRECTIONAL_WARNING)
        skipped += [
            Skipped(module.keys["magnitude"], "DoRA magnitude vector, not used under --directional-only", True)
            for module, _ in parsed.modules
            if "magnitude" in module.keys
        ]
    return build_checkpoint(
        source,
        family="lora",
        adapter_type="DORA_DIRECTIONAL" if directional else "DORA",
        layers=layers,
        skipped=skipped,
        warnings=warnings,
    )


def read(source: AdapterSource, options: ReadOptions) -> Checkpoint:
    return read_dora(source, options, base=options.base)


register_format(
    Format(
        "dora",
        "PEFT DoRA (LoRA with use_dora; needs --base, or --directional-only)",
        detect,
        read,
        priority=20,
        needs="--base (or --directional-only)",
        spectrum="dense (factored under --directional-only)",
    )
)
