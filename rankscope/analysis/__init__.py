"""Records out: :func:`analyze` turns a checkpoint into an :class:`Analysis`, :func:`compare` two analyses into a
:class:`Comparison`."""

from .analyze import Analysis, AnalysisOptions, LayerRecord, analyze
from .comparison import Comparison, compare

__all__ = ["Analysis", "AnalysisOptions", "Comparison", "LayerRecord", "analyze", "compare"]
