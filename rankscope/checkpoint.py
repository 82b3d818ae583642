"""What a reader returns: a checkpoint as a list of per-layer updates, plus everything it did not use."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from .naming import natural_key
from .update import Update


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
    # the parts this layer's update is composed of (HydraLoRA heads, composition components), each a Layer
    # whose name is its label
    components: list[Layer] | None = None
    composition: Composition | None = None

    @property
    def scale(self) -> float | None:
        return self.update.scalar_scale if self.update is not None else None


@dataclass(frozen=True)
class Skipped:
    """A stored tensor that no layer uses, and why."""

    key: str
    reason: str


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

    def __post_init__(self) -> None:
        self.layers.sort(key=lambda layer: natural_key(layer.name))

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
