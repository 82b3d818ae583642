"""rankscope: how much rank does a low-rank adapter actually use, and where?

>>> import rankscope
>>> ckpt = rankscope.load("examples/checkpoints/tiny-lora")          # doctest: +SKIP
>>> for record in rankscope.analyze(ckpt, thresholds=(0.005,)):     # doctest: +SKIP
...     print(record.name, record.metric("count_above", 0.005), record.metric("erank"))

The names below are imported on first use (PEP 562), so ``import rankscope`` and ``rankscope --version`` do not
import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name → the submodule that defines it
_EXPORTS = {
    "Analysis": "analysis",
    "AnalysisOptions": "analysis",
    "LayerRecord": "analysis",
    "analyze": "analysis",
    "Checkpoint": "checkpoint",
    "Layer": "checkpoint",
    "Skipped": "checkpoint",
    "CheckpointError": "errors",
    "RankscopeError": "errors",
    "UnsupportedAdapterError": "errors",
    "UsageProblem": "errors",
    "load": "formats",
    "DenseUpdate": "update",
    "FactoredUpdate": "update",
}

if TYPE_CHECKING:
    from .analysis import Analysis, AnalysisOptions, LayerRecord, analyze
    from .checkpoint import Checkpoint, Layer, Skipped
    from .errors import CheckpointError, RankscopeError, UnsupportedAdapterError, UsageProblem
    from .formats import load
    from .update import DenseUpdate, FactoredUpdate


def __getattr__(name: str) -> object:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'rankscope' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = [
    "Analysis",
    "AnalysisOptions",
    "Checkpoint",
    "CheckpointError",
    "DenseUpdate",
    "FactoredUpdate",
    "Layer",
    "LayerRecord",
    "RankscopeError",
    "Skipped",
    "UnsupportedAdapterError",
    "UsageProblem",
    "__version__",
    "analyze",
    "load",
]
