"""The JSON documents (docs/architecture.md, "Contracts"): ``rankscope.spectrum/1``, ``rankscope.components/1``,
``rankscope.compare/1`` and ``rankscope.report/1``, as plain dicts built from the records.

These are data, not renderings: ``Analysis.to_dict`` and ``Comparison.to_dict`` return them, and
``rankscope.report.json.dumps`` only serialises them (``allow_nan=False``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .. import __version__
from .scaling import scaling_text

if TYPE_CHECKING:
    from .comparison import Comparison
    from .records import Analysis

SCHEMA = "rankscope.spectrum/1"


def _finite(value: object) -> object:
    """Replace non-finite floats (which JSON cannot hold) by their string, recursively (configs may hold NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def spectrum_document(analysis: Analysis) -> dict:
    """The whole analysis of one checkpoint as the contract's JSON object."""
    ckpt, options = analysis.checkpoint, analysis.options
    return {
        "schema": SCHEMA,
        "rankscope": __version__,
        "checkpoint": {
            "path": str(ckpt.path),
            "weights_file": str(ckpt.weights_file) if ckpt.weights_file else None,
            "family": ckpt.family,
            "adapter_type": ckpt.adapter_type,
            "config": _finite(ckpt.config),
            "params": ckpt.params,
            "other_adapters": ckpt.other_adapters,
        },
        "scaled": not options.unscaled,
        "scaling": scaling_text(analysis),
        "options": {
            "thresholds": list(options.thresholds),
            "energies": list(options.energies),
            "rel_thresholds": list(options.rel_thresholds),
            "dense": options.dense,
            "dense_dtype": options.dense_dtype if options.dense else None,
            "layers": options.layers,
        },
        "warnings": list(ckpt.warnings) + list(analysis.warnings),
        "notes": list(ckpt.notes) + list(analysis.notes),
        "skipped": [{"key": s.key, "reason": s.reason} for s in ckpt.skipped],
        "not_analysed": [{"module": m.module, "keys": list(m.keys), "reason": m.reason} for m in ckpt.not_analysed],
        "layers": [record.to_dict() for record in analysis.layers],
        "summary": analysis.summary(),
    }


COMPONENTS_SCHEMA = "rankscope.components/1"


def components_document(analysis: Analysis) -> dict:
    """The composed layers only: components, weights, energy shares, alignment, gain (the spectrum contract's
    per-layer composition keys), plus the composition summary."""
    document = spectrum_document(analysis)
    return {
        "schema": COMPONENTS_SCHEMA,
        "rankscope": document["rankscope"],
        "checkpoint": document["checkpoint"],
        "scaled": document["scaled"],
        "scaling": document["scaling"],
        "layers": [layer for layer in document["layers"] if "components" in layer],
        "summary": document["summary"].get("composition"),
    }


COMPARISON_SCHEMA = "rankscope.compare/1"


def comparison_document(comparison: Comparison, *, records: bool = True) -> dict:
    """Matched layers side by side (each checkpoint's compared values, full records under ``records`` unless
    ``records=False``, for a document that holds them elsewhere), the alignment across checkpoints, the
    unmatched layers and the summary with its headlines."""
    checkpoints = []
    for label, analysis in zip(comparison.labels, comparison.analyses, strict=True):
        document = spectrum_document(analysis)
        checkpoints.append(
            {
                "label": label,
                **document["checkpoint"],
                "scaled": document["scaled"],
                "warnings": document["warnings"],
                "not_analysed": document["not_analysed"],
            }
        )
    return {
        "schema": COMPARISON_SCHEMA,
        "rankscope": __version__,
        "labels": comparison.labels,
        "threshold": comparison.threshold,
        "checkpoints": checkpoints,
        "layers": [
            {
                "name": layer.name,
                "module_type": layer.module_type,
                "values": {
                    label: comparison.values(record)
                    for label, record in zip(comparison.labels, layer.records, strict=True)
                },
                "alignment": layer.alignment,
                **(
                    {
                        "records": {
                            label: record.to_dict()
                            for label, record in zip(comparison.labels, layer.records, strict=True)
                        }
                    }
                    if records
                    else {}
                ),
            }
            for layer in comparison.layers
        ],
        "unmatched": comparison.unmatched,
        "warnings": comparison.warnings,
        "summary": comparison.summary(),
    }


REPORT_SCHEMA = "rankscope.report/1"


def report_document(analyses: Sequence[Analysis], labels: Sequence[str], comparison: Comparison | None) -> dict:
    """A report's ``summary.json``. One checkpoint: its ``rankscope.spectrum/1`` document itself. Several:
    ``rankscope.report/1`` holding the ``rankscope.compare/1`` document under ``comparison`` (null where they share
    no layer) and each checkpoint's spectrum document under ``spectra`` (keyed by label)."""
    if len(analyses) == 1:
        return spectrum_document(analyses[0])
    return {
        "schema": REPORT_SCHEMA,
        "rankscope": __version__,
        "contents": "comparison: the rankscope.compare/1 document of the checkpoints, without the per-layer "
        "records (they are in spectra); spectra: each checkpoint's rankscope.spectrum/1 document, keyed by label, "
        "in the order of labels",
        "labels": list(labels),
        "comparison": comparison_document(comparison, records=False) if comparison is not None else None,
        "spectra": {label: spectrum_document(a) for label, a in zip(labels, analyses, strict=True)},
    }
