"""What a reader returns: a checkpoint as a list of per-layer updates, plus everything it did not use."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .naming import layer_name, model_order_key
from .update import Update

if TYPE_CHECKING:
    from .base import BaseWeights


@dataclass(frozen=True)
class Composition:
    """How a layer's components combine: ΔW = Σ_i weights[i]·ΔW_i.

    ``raw_weights`` as stored (logits under softmax normalisation), ``weights`` as applied. ``mode`` is "sum"
    (all active together), "sequential" (boosting rounds, in order) or "router" (HydraLoRA: the uniform
    stand-in for an input-dependent router).
    """

    raw_weights: tuple[float, ...]
    weights: tuple[float, ...]
    mode: str = "sum"
    normalize: str = "none"


@dataclass
class Layer:
    """One adapted module: its update (None when it cannot be analysed, with ``error`` saying why)."""

    name: str
    update: Update | None
    shape: tuple[int, ...]
    params: int
    kind: str = "linear"
    family: str = "lora"
    error: str | None = None
    bias_update: torch.Tensor | None = None  # unscaled (lora_B.bias), applied with ``scale`` like B·A
    # False where ``bias_update`` is the bias change itself, applied without ``scale`` (ComfyUI's diff_b)
    bias_scaled: bool = True
    # the parts this layer's update is composed of (HydraLoRA heads, composition components), each a Layer
    # whose name is its label
    components: list[Layer] | None = None
    composition: Composition | None = None
    # False where the update itself is only an estimate (a randomised init that cannot be recomputed, an init
    # whose factors were never saved): every record of the layer then says ``exact: false``
    exact: bool = True

    @property
    def scale(self) -> float | None:
        return self.update.scalar_scale if self.update is not None else None

    def __repr__(self) -> str:
        what = repr(self.update) if self.update is not None else f"invalid: {self.error}"
        parts = f", {len(self.components)} components" if self.components else ""
        return f"Layer({self.name!r}, {self.family} {self.kind}, shape {list(self.shape)}, {what}{parts})"


@dataclass(frozen=True)
class Skipped:
    """A stored tensor that no layer uses, and why.

    ``expected`` where leaving it out is by design (a value the format resets on save, the router a layer's
    uniform stand-in replaces, a tensor the user asked to leave out): such tensors are never warned about.
    """

    key: str
    reason: str
    expected: bool = False


@dataclass(frozen=True)
class NotAnalysed:
    """A module whose tensors look like adapter weights but that no layer analyses (a warning, never a note)."""

    module: str
    keys: tuple[str, ...]
    reason: str


# key segments that mark adapter weights: factor names of PEFT, kohya, LyCORIS and diffusers, and PEFT's copies
_ADAPTER_PREFIXES = ("lora_", "lycoris_", "hada_", "lokr_", "oft_", "boft_", "vera_", "ia3_", "hra_", "dora_", "glora")
_ADAPTER_SEGMENTS = frozenset(
    {"lora", "lora_linear_layer", "alpha", "diff", "diff_b", "w_norm", "b_norm", "a1", "a2", "b1", "b2"}
    | {"modules_to_save", "ranknum", "vblora_vector_bank", "fourierft_spectrum", "shira_weight", "trainable_tokens"}
)


MODULES_TO_SAVE = (
    "a full copy of a module in modules_to_save (PEFT adds a classifier head there by itself for sequence and "
    "token classification), trained in full: not a low-rank update"
)
# PEFT's save_embedding_layers (on by itself after a vocabulary resize) saves whole embedding tables under the
# module's own name; PEFT loads them over the base model's
SAVED_WEIGHT = (
    "a full weight saved with the adapter (PEFT's save_embedding_layers, e.g. after resizing the vocabulary): "
    "it replaces the base model's when PEFT loads the adapter, not a low-rank update"
)
SAVED_NORM = (
    "a norm's scale saved in full beside the LoRA factors (BFL's Flux control LoRA replaces its query/key norms so): "
    "the norm's new weight, a vector, not a low-rank update"
)
FULL_COPIES = (MODULES_TO_SAVE, SAVED_WEIGHT, SAVED_NORM)


_PROCESSOR_LORA = re.compile(r".+_lora\d*")


def adapter_module(key: str) -> str | None:
    """The module a tensor key belongs to when the key looks like adapter weight, else None.

    ``unet.…to_q.lora.down.weight`` → ``unet.…to_q``; ``lycoris_conv1.diff`` → ``lycoris_conv1``;
    ``…attn1.processor.to_q_lora.up.weight`` → ``…attn1.processor.to_q_lora``; ``…q_proj.weight`` → None.
    """
    segments = key.split(".")
    for i, segment in enumerate(segments):
        processor = _PROCESSOR_LORA.fullmatch(segment) is not None  # to_q_lora, XLabs' qkv_lora1
        if segment.startswith(_ADAPTER_PREFIXES) or segment in _ADAPTER_SEGMENTS or processor:
            # a kohya-style flattened name is itself the module; a factor name ends the module path before it
            keep = i + 1 if i == 0 or processor else i
            return ".".join(segments[:keep])
    return None


def not_analysed(skipped: list[Skipped]) -> list[NotAnalysed]:
    """The unexpected skipped tensors that look like adapter weights, grouped by module (in key order)."""
    modules: dict[str, list[Skipped]] = {}
    for entry in skipped:
        # PEFT saves a modules_to_save copy (or a saved embedding) under the module's own name (``head.weight``):
        # only the reason tells
        copy = entry.reason in FULL_COPIES and "." in entry.key
        module = (
            None if entry.expected else adapter_module(entry.key) or (entry.key.rpartition(".")[0] if copy else None)
        )
        if module is not None:
            modules.setdefault(layer_name(module), []).append(entry)
    return [
        NotAnalysed(module, tuple(e.key for e in entries), "; ".join(dict.fromkeys(e.reason for e in entries)))
        for module, entries in modules.items()
    ]


@dataclass
class Checkpoint:
    """A loaded adapter: where it came from, what it is, and its layers in model order."""

    path: Path
    family: str
    adapter_type: str
    config: dict
    layers: list[Layer]
    skipped: list[Skipped] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # how to read the results, not a problem
    other_adapters: list[str] = field(default_factory=list)
    weights_file: Path | None = None
    shared_params: int = 0
    # the base model's weights (``--base``) where they were given: the analysis measures each update against its W₀
    base: BaseWeights | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.layers.sort(key=lambda layer: model_order_key(layer.name))

    def __repr__(self) -> str:
        return (
            f"Checkpoint({str(self.path)!r}, {self.adapter_type} ({self.family}), {len(self.layers)} layers, "
            f"{self.params:,} params, {len(self.skipped)} skipped, {len(self.not_analysed)} not analysed, "
            f"{len(self.warnings)} warnings)"
        )

    def _repr_html_(self) -> str:
        """A notebook's view: what it is, and its layers by module type (count, shapes, parameters) — a few KB."""
        from html import escape

        from .naming import group_by_module, module_type

        groups = group_by_module(self.layers, lambda layer: layer.name, lambda layer: module_type(layer.name))
        cell = '<td style="text-align:{}">{}</td>'
        rows = "".join(
            "<tr>"
            + cell.format("left", escape(kind))
            + cell.format("right", len(layers))
            + cell.format("left", escape(", ".join(sorted({"×".join(map(str, x.shape)) for x in layers})[:4])))
            + cell.format("right", f"{sum(x.params for x in layers):,}")
            + "</tr>"
            for kind, layers in groups.items()
        )
        head = "".join(f"<th>{title}</th>" for title in ("module", "layers", "shapes", "params"))
        missing = [f"{len(self.not_analysed)} module(s) with adapter weights not analysed"] if self.not_analysed else []
        problems = [*self.warnings[:3], *missing]
        return (
            f"<div><p><b>Checkpoint</b> <code>{escape(str(self.path))}</code> · {escape(self.adapter_type)} "
            f"({escape(self.family)}) · {len(self.layers)} layers · {self.params:,} parameters · "
            f"{len(self.skipped)} tensors not used</p>"
            f'<table style="border-collapse:collapse;font-size:12px"><thead><tr>{head}</tr></thead>'
            f"<tbody>{rows}</tbody></table>"
            + "".join(f'<p style="color:#a33">⚠ {escape(m)}</p>' for m in problems)
            + "</div>"
        )

    @property
    def not_analysed(self) -> list[NotAnalysed]:
        """Modules whose tensors look like adapter weights but are in no layer (see :func:`not_analysed`)."""
        return not_analysed(self.skipped)

    def not_analysed_warning(self) -> str | None:
        """One warning line naming the modules that are not analysed, by reason (None where there are none)."""
        missing = self.not_analysed
        if not missing:
            return None
        by_reason: dict[str, list[str]] = {}
        for item in missing:
            by_reason.setdefault(item.reason, []).append(item.module)
        parts = [f"{listed(modules)} ({reason})" for reason, modules in by_reason.items()]
        return (
            f"{len(missing)} module(s) with adapter weights NOT analysed: {'; '.join(parts)}; "
            "listed under 'not_analysed' in --json, and --strict fails on them"
        )

    @property
    def params(self) -> int:
        """Trainable adapter parameters: per-layer ones plus tensors shared across layers, counted once."""
        return sum(layer.params for layer in self.layers) + self.shared_params

    def select(self, pattern: str | None) -> Checkpoint:
        """A view with only the layers whose name matches ``pattern`` (``re.search``)."""
        if not pattern:
            return self
        regex = re.compile(pattern)
        return replace(self, layers=[layer for layer in self.layers if regex.search(layer.name)])


def listed(names: list[str], most: int = 3, *, counted: str | None = None) -> str:
    """Names for a message: the first ``most`` and how many more (``a, b, c and 4 more``); with ``counted``
    ("layer(s)"), the count first (``7 layer(s): a, b, c and 4 more``)."""
    shown = ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")
    return f"{len(names)} {counted}: {shown}" if counted else shown
