"""rankscope: how much rank does a low-rank adapter actually use, and where?

>>> import rankscope
>>> ckpt = rankscope.load("examples/checkpoints/tiny-lora")          # doctest: +SKIP
>>> for record in rankscope.analyze(ckpt, thresholds=(0.005,)):     # doctest: +SKIP
...     print(record.name, record.metric("count_above", 0.005), record.metric("erank"))
"""

from __future__ import annotations

__version__ = "0.1.0"

from .analysis import Analysis, AnalysisOptions, LayerRecord, analyze
from .checkpoint import Checkpoint, Layer, Skipped
from .errors import CheckpointError, RankscopeError, UnsupportedAdapterError
from .formats import load
from .update import DenseUpdate, FactoredUpdate

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
    "__version__",
    "analyze",
    "load",
]
