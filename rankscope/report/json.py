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

# allow_nan=False: a NaN anywhere is a bug, not output
_RECORD = json.JSONEncoder(allow_nan=False, ensure_ascii=False)


def dumps(document: dict) -> str:
    """Serialise: objects indented by two spaces, a list of objects (the layers, the pairs, the components) one
    compact object per line, everything inside such an object compact. The values are json.dumps'; the layout
    keeps the records to the C encoder (``indent=`` takes the pure-Python one: 0.14 of 0.7 s for 224 layers of a
    three-component composition) and a file one can grep by layer."""
    return "".join(_layout(document, 0)) + "\n"


def _layout(value: object, level: int) -> list[str]:
    if isinstance(value, dict) and value and all(isinstance(key, str) for key in value):
        inner = "\n" + "  " * (level + 1)
        items = (inner + _RECORD.encode(key) + ": " + "".join(_layout(v, level + 1)) for key, v in value.items())
        return ["{", ",".join(items), "\n", "  " * level, "}"]
    if isinstance(value, (list, tuple)) and value and all(isinstance(item, dict) for item in value):
        inner = "\n" + "  " * (level + 1)
        return ["[", ",".join(inner + _RECORD.encode(item) for item in value), "\n", "  " * level, "]"]
    return [_RECORD.encode(value)]


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
