"""JSON output: the documents of ``rankscope.analysis.documents``, serialised (no NaN, no Infinity)."""

from __future__ import annotations

import json

from ..analysis.documents import (
    COMPARISON_SCHEMA,
    COMPONENTS_SCHEMA,
    REPORT_SCHEMA,
    SCHEMA,
    comparison_document,
    components_document,
    report_document,
    spectrum_document,
)


def dumps(document: dict) -> str:
    """Serialise with ``allow_nan=False``: a NaN anywhere is a bug, not output."""
    return json.dumps(document, indent=2, allow_nan=False, ensure_ascii=False) + "\n"


__all__ = [
    "COMPARISON_SCHEMA",
    "COMPONENTS_SCHEMA",
    "REPORT_SCHEMA",
    "SCHEMA",
    "comparison_document",
    "components_document",
    "dumps",
    "report_document",
    "spectrum_document",
]
