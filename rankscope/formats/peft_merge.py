"""PEFT's long tail (OFT, BOFT, HRA, VBLoRA, FourierFT, …): ΔW = W_merged − W0 from PEFT's own ``merge()``.

A PEFT adapter directory whose ``peft_type`` no native reader claims (this format is asked last) is read through
the installed ``peft`` (the extra ``rankscope[peft]``) and the base model (``--base``), one module at a time:
its base layer is rebuilt in float64 from the base weights, wrapped in the tuner's own layer with the adapter's
config and tensors, merged by that layer, and ΔW = W_merged − W0 is a dense update (its bias change, where the
merge moves the bias, is the layer's bias update). The layer's own ``merge()`` is used, not
``get_delta_weight``: for OFT and BOFT that returns the rotation R (W' = W0·R), and RoAd, GLoRA, IA3 have none.

Cost per layer: PEFT's merge on an m×n float64 copy (for rotations an n×n product, O(m·n²)), done once at read
time (to check the file against PEFT and to learn whether the tuner stays in float64) and once when the update
is decomposed; nothing is kept between layers. A tuner that computes in float32 inside ``merge()`` (a cast in
its code) gives ``exact: false`` with a warning naming the dtype. Tuners with no static ΔW are refused with why.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import ModuleType

import torch

from ..core.base import BaseWeights, as_matrix
from ..core.checkpoint import Checkpoint, Layer
from ..core.errors import CheckpointError, UnsupportedAdapterError
from ..core.naming import layer_name
from ..core.update import DenseUpdate
from . import Format, ReadOptions, register_format
from .common.peft import skip_reason, trained_bias, truthy
from .common.peft_model import read_whole
from .common.peft_tuner import (
    PEFT_PREFIX,
    BaseLayout,
    Merged,
    base_module,
    guessed_module,
    import_peft,
    kind_of,
    matrix_shape,
    merged_delta,
    peft_config,
)
from .common.reader import build_checkpoint, invalid_layer, nonfinite_among, skipped_keys
from .common.source import AdapterSource

FAMILY = "peft-merge"
# PEFT tuners whose change to the model is not a fixed change of a weight, by why each has nothing to analyse
_NO_STATIC_DELTA_BY_REASON = {
    "it learns virtual token embeddings prepended to the input": ("PROMPT_TUNING", "MULTITASK_PROMPT_TUNING"),
    "it learns a prompt encoder whose virtual tokens are prepended to the input": ("P_TUNING",),
    "it learns key/value prefixes prepended in every attention layer": ("PREFIX_TUNING",),
    "it learns gated prompts added to the attention of the top layers": ("ADAPTION_PROMPT",),
    "it learns context-aware prompt tokens prepended to the input": ("CPT",),
    "it learns a key/value cache prefix prepended in every attention layer": ("CARTRIDGE",),
    "its update is routed by the input (a learned router mixes the experts per token)": ("LILY",),
    "its update is routed by the task (a learned router mixes the skills per task)": ("POLY",),
    "its update is routed by the input (a learned classifier mixes the LoRA experts per token)": ("XLORA",),
    "its update is a gated side network of the input, not a change of a weight": ("SHADOW",),
    "it trains biases only (no weight changes)": ("BEFT",),
}
NO_STATIC_DELTA = {kind: why for why, kinds in _NO_STATIC_DELTA_BY_REASON.items() for kind in kinds}
# tuners whose layers index state shared across the whole model (one trained vector, a joint decomposition): a
# layer cannot be rebuilt alone, so these are read by building the whole base model (common/peft_model.py)
WHOLE_MODEL = {
    "TINYLORA": "its layers share trained vectors (tinylora_v.<i>) assigned across the whole model",
    "UNILORA": "all its layers index one shared trained vector (unilora_theta_d) laid out over the whole model",
    "FROD": "its projections come from a joint decomposition of every layer of a kind (frod_s_indices.<kind>)",
}


def detect(source: AdapterSource) -> bool:
    """Any PEFT config that reaches this format: every native reader is asked first."""
    return source.peft_type is not None


def _peft(source: AdapterSource):
    peft_type = source.peft_type
    why = NO_STATIC_DELTA.get(peft_type)
    if why is not None:
        raise UnsupportedAdapterError(f"{peft_type} has no static weight update to analyse: {why}", path=source.where)
    peft = import_peft(peft_type)
    if peft_type not in {t.value for t in peft.PeftType}:
        raise UnsupportedAdapterError(
            f"adapter type {peft_type!r} is not supported (not a PEFT {peft.__version__} tuner either)",
            path=source.where,
        )
    return peft


def _group(source: AdapterSource, prefix: str) -> tuple[dict[str, list[str]], list[str], list[str]]:
    """Stored keys by module path (PEFT's spelling, without ``base_model.model.``): the segments before the first
    one that starts with the tuner's prefix (``oft_R``, ``hra_u``); the adapter's shared tensors, outside the
    model's modules (VBLoRA's ``base_model.vblora_vector_bank``), given to every module; and the keys of the model's
    modules that are no tuner's (a ``modules_to_save`` copy, an embedding table PEFT saves beside its adapter, a
    trained bias), which no layer reads."""
    modules: dict[str, list[str]] = {}
    shared: list[str] = []
    other: list[str] = []
    for key in source.tensors:
        segments = key.removeprefix(PEFT_PREFIX).split(".")
        at = next((i for i, s in enumerate(segments) if s.startswith(prefix)), None)
        if not key.startswith(PEFT_PREFIX) or at == 0:
            shared.append(key)
        elif at is None:
            other.append(key)
        else:
            modules.setdefault(".".join(segments[:at]), []).append(key)
    return modules, shared, other


@dataclass(frozen=True)
class _Reading:
    """What every layer of one adapter is read with."""

    peft: ModuleType
    config: object  # PEFT's config object
    source: AdapterSource
    base: BaseWeights
    layout: BaseLayout
    prefix: str  # the tuner's parameter prefix (``oft_``)
    shared: dict[str, torch.Tensor]  # the adapter's tensors of no module (VBLoRA's vector bank)

    @property
    def shared_names(self) -> frozenset[str]:
        return frozenset(key.rsplit(".", 1)[-1] for key in self.shared)


def _trained_bias(reading: _Reading, path: str, name: str, other: set[str]) -> tuple[str, torch.Tensor] | None:
    """The key and tensor of the module's :func:`~.common.peft.trained_bias` (either spelling PEFT saves), or None."""
    for key in (f"{PEFT_PREFIX}{path}.base_layer.bias", f"{PEFT_PREFIX}{path}.bias"):
        if key in other:
            saved = trained_bias(reading.source.config or {}, reading.source.tensors, key, reading.base, name)
            if saved is not None:
                return key, saved
    return None


def _layer(reading: _Reading, path: str, keys: list[str], other: set[str]) -> tuple[Layer, set]:
    """One module's ΔW from PEFT's merge of its layer, built from the base weight and the trained bias where the
    file saved one (a merge may move the bias: GLoRA's b·(1 + D) + E + W₀·C); its Δb = b_merged − b₀. The trained
    bias's key, once used, leaves ``other``."""
    source, base = reading.source, reading.base
    name, family = layer_name(path), source.peft_type.lower()
    own = {key: source.tensors.get(key) for key in keys}
    params = sum(t.numel() for t in own.values())
    problem = nonfinite_among(own.items())
    if problem is None and base.key_for(name) is None:
        problem = (
            f"{keys[0]}: the base model has no weight for layer {name!r} (looked for '{name}.weight' in {base.path})"
        )
    if problem:
        return invalid_layer(name, problem, params, family=family), set()
    shape = tuple(base.shape(name))
    if len(shape) < 2:  # a norm's scale: a vector update, which this dense path does not read
        return invalid_layer(name, f"{keys[0]}: the base weight of {name!r} is 1-D, not a matrix", params), set()
    has_bias = base.key_for(name, "bias") is not None
    template = reading.layout.module(name)
    if template is None or tuple(getattr(template, "weight", torch.empty(0)).shape) != shape:
        embedding = any(f".{reading.prefix}embedding_" in key for key in keys)  # oft_embedding_R, hira_embedding_A
        template = guessed_module(name, shape, has_bias, truthy(source.config.get("fan_in_fan_out")), embedding)
    kind = kind_of(template)
    trained = _trained_bias(reading, path, name, other)
    start_bias = trained[1] if trained is not None else (base.get(name, "bias") if has_bias else None)

    def merge() -> Merged:
        module = base_module(template, base.get(name), start_bias)
        tensors = {**own, **reading.shared}
        return merged_delta(
            reading.peft, reading.config, path, module, tensors,
            prefix=reading.prefix, shared=reading.shared_names, where=source.where,
        )  # fmt: skip

    first = merge()  # at read time: PEFT checks the file, and says whether it stays in float64

    def build(dtype, device) -> torch.Tensor:
        return as_matrix(merge().delta, kind).to(dtype=dtype, device=device)

    update = DenseUpdate(matrix_shape(kind, shape), build)
    bias_change = first.bias_delta  # b_merged − the merge's starting bias
    if trained is not None:
        other.discard(trained[0])
        params += trained[1].numel()
        total = trained[1].double() - base.get(name, "bias").double()
        total = total + bias_change if bias_change is not None else total
        bias_change = total if bool(total.any()) else None
    layer = Layer(name, update, shape, params, kind=kind, family=family, exact=not first.narrow)
    layer.bias_update, layer.bias_scaled = bias_change, False  # the change itself, not scaled
    return layer, first.narrow


def read(source: AdapterSource, options: ReadOptions) -> Checkpoint:
    peft = _peft(source)
    peft_type = source.peft_type
    if peft_type in WHOLE_MODEL:  # PEFT loads the adapter into the whole float64 base model and merges it
        return read_whole(peft, source, options.base, FAMILY, WHOLE_MODEL[peft_type])
    if options.base is None:
        raise CheckpointError(
            f"{peft_type}'s ΔW is read from PEFT's merge into the base weights (W_merged − W0): pass base=PATH "
            "(the base model directory or safetensors file)",
            path=source.where,
            argument="base",
        )
    try:
        config = peft_config(peft, source.config)
    except (TypeError, ValueError, ImportError) as exc:  # ImportError: AdaMSS's config needs scikit-learn
        raise CheckpointError(
            f"PEFT {peft.__version__} cannot read this {peft_type} config: {exc}", path=source.where
        ) from exc
    from peft.mapping import PEFT_TYPE_TO_PREFIX_MAPPING

    prefix = PEFT_TYPE_TO_PREFIX_MAPPING[peft_type]
    modules, shared_keys, other = _group(source, prefix)
    shared = {key: source.tensors.get(key) for key in shared_keys}
    reading = _Reading(peft, config, source, options.base, BaseLayout(options.base.path), prefix, shared)
    layers, narrow, unused = [], set(), set(other)
    for path, keys in modules.items():
        layer, narrower = _layer(reading, path, keys, unused)
        layers.append(layer)
        narrow |= narrower
    warnings = []
    if narrow:
        dtypes = ", ".join(sorted(str(d).removeprefix("torch.") for d in narrow))
        warnings.append(
            f"PEFT {peft.__version__}'s {peft_type} merge computes in {dtypes} (a cast inside its code) although the "
            "layer is float64: its ΔW carries that precision (exact: false)"
        )
    notes = [f"ΔW = W_merged − W0 from PEFT {peft.__version__}'s own {peft_type} merge() on a float64 copy (dense)"]
    if reading.layout.problem:
        notes.append(
            f"base layer classes told by their weights (the base config did not build: {reading.layout.problem})"
        )
    return build_checkpoint(
        source,
        family=peft_type.lower(),
        adapter_type=peft_type,
        layers=layers,
        skipped=skipped_keys(
            [key for key in other if key in unused], lambda key: skip_reason(key, source.config, peft_type)
        ),
        warnings=warnings,
        notes=notes,
        config={**(source.config or {}), "reader": {"format": FAMILY, "peft": peft.__version__}},
        shared_params=sum(math.prod(t.shape) for t in shared.values()),
    )


register_format(
    Format(
        FAMILY,
        "PEFT tuners no native reader has (OFT, BOFT, HRA, VBLoRA, FourierFT, …) through PEFT's own merge(); "
        "needs --base and the peft extra; dense",
        detect,
        read,
        priority=1000,
        needs="--base and the peft extra (TinyLoRA, UniLoRA, FRoD: --base a model directory with config.json)",
        spectrum="dense",
    )
)
