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
import sys
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name → the submodule that defines it
_EXPORTS = {
    "Analysis": "analysis",
    "AnalysisOptions": "analysis",
    "LayerRecord": "analysis",
    "analyze": "analysis",
    "Checkpoint": "core.checkpoint",
    "Layer": "core.checkpoint",
    "Skipped": "core.checkpoint",
    "CheckpointError": "core.errors",
    "RankscopeError": "core.errors",
    "UnsupportedAdapterError": "core.errors",
    "UsageProblem": "core.errors",
    "single_threaded": "core.threads",
    "load": "formats",
    "compare": "analysis",
    "Comparison": "analysis",
    "write_report": "report.bundle",
    "analysis_html": "report.notebook",
    "comparison_html": "report.notebook",
    "alignment_figure": "figures",
    "count_above_figure": "figures",
    "energy_figure": "figures",
    "erank_heatmap_figure": "figures",
    "growth_figure": "figures",
    "save_figure": "figures",
    "spectrum_figure": "figures",
    "subspace_similarity_figure": "figures",
    "weights_figure": "figures",
    "DenseUpdate": "core.update",
    "FactoredUpdate": "core.update",
    "suggest": "resize",
    "Suggestion": "resize",
    "convert": "resize.convert",
    "ConvertedAdapter": "resize.convert",
    "sweep": "sweeps",
}

if TYPE_CHECKING:
    from .analysis import Analysis, AnalysisOptions, Comparison, LayerRecord, analyze, compare
    from .core.checkpoint import Checkpoint, Layer, Skipped
    from .core.errors import CheckpointError, RankscopeError, UnsupportedAdapterError, UsageProblem
    from .core.threads import single_threaded
    from .core.update import DenseUpdate, FactoredUpdate
    from .figures import (
        alignment_figure,
        count_above_figure,
        energy_figure,
        erank_heatmap_figure,
        growth_figure,
        save_figure,
        spectrum_figure,
        subspace_similarity_figure,
        weights_figure,
    )
    from .formats import load
    from .report.bundle import write_report
    from .report.notebook import analysis_html, comparison_html
    from .resize import Suggestion, suggest
    from .resize.convert import ConvertedAdapter, convert
    from .sweeps import sweep


# What a notebook shows for an Analysis or a Comparison is a renderer's output (report/notebook.py), and records
# import no renderer: the façade registers it with IPython's HTML formatter, by class name, so nothing is imported
# until an object is shown. (Checkpoint has its own small, self-contained ``_repr_html_``.)
_NOTEBOOK_DISPLAYS = (
    ("rankscope.analysis.records", "Analysis", "analysis_html"),
    ("rankscope.analysis.comparison", "Comparison", "comparison_html"),
)


def _register_notebook_display() -> None:
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None and hasattr(ipython, "get_ipython") else None
    if shell is None or not hasattr(shell, "display_formatter"):
        return
    formatter = shell.display_formatter.formatters["text/html"]
    for module, cls, function in _NOTEBOOK_DISPLAYS:
        formatter.for_type_by_name(module, cls, lambda obj, name=function: __getattr__(name)(obj))


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
    "Comparison",
    "ConvertedAdapter",
    "DenseUpdate",
    "FactoredUpdate",
    "Layer",
    "LayerRecord",
    "RankscopeError",
    "Skipped",
    "Suggestion",
    "UnsupportedAdapterError",
    "UsageProblem",
    "__version__",
    "alignment_figure",
    "analysis_html",
    "analyze",
    "compare",
    "comparison_html",
    "convert",
    "count_above_figure",
    "energy_figure",
    "erank_heatmap_figure",
    "growth_figure",
    "load",
    "save_figure",
    "single_threaded",
    "spectrum_figure",
    "subspace_similarity_figure",
    "suggest",
    "sweep",
    "weights_figure",
    "write_report",
]

_register_notebook_display()
