"""Acting on an analysis: rank suggestions (``suggest``) and adapters written back out (``convert``).

``rules`` parses rank rules and picks per-layer ranks from σ; ``suggest`` turns them into PEFT ``LoraConfig``
fields; ``convert`` takes the truncated SVD of each update from its factored core and splits it into LoRA
factors; ``writers`` writes them as a PEFT folder, a kohya file or a diffusers file.
"""

from __future__ import annotations

from .rules import ACCEPTED, ACCEPTED_FORMS, Rule, parse_rule
from .suggest import SCHEMA, LayerSuggestion, Suggestion, suggest

__all__ = ["ACCEPTED", "ACCEPTED_FORMS", "SCHEMA", "LayerSuggestion", "Rule", "Suggestion", "parse_rule", "suggest"]
