"""Records out: :func:`analyze` turns a checkpoint into an :class:`Analysis`, :func:`compare` two analyses into a
:class:`Comparison`."""

from .analyze import analyze
from .comparison import Comparison, compare
from .options import AnalysisOptions
from .records import Analysis, LayerRecord

__all__ = ["Analysis", "AnalysisOptions", "Comparison", "LayerRecord", "analyze", "compare"]
