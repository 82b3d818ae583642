"""Which figures a report holds (:func:`figure_specs`), in page order, with unique file-name-safe ids: decided once
from the records, for every renderer (the HTML page, the report folder's figure files)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..figures._common import MAX_FACETS, MAX_LINES
from ..measures.components import off_diagonal_mean
from .model import FigureSpec, layer_names_by_module
from .resize_base import DEFAULT_SUGGEST_RULE, resize_base_specs, suggestion_rule

if TYPE_CHECKING:
    from ..analysis.comparison import Comparison
    from ..analysis.records import Analysis, LayerRecord


def slug(text: str) -> str:
    """A file-name-safe id fragment (checkpoint strings may hold anything)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-.")[:48] or "x"


class _Ids:
    """Unique ids: two module types or labels that slug alike get ``-2``, ``-3`` …"""

    def __init__(self) -> None:
        self.used: set[str] = set()

    def __call__(self, base: str) -> str:
        candidate, n = base, 1
        while candidate in self.used:
            n += 1
            candidate = f"{base}-{n}"
        self.used.add(candidate)
        return candidate


def composed(analysis: Analysis) -> list[LayerRecord]:
    return [record for record in analysis.layers if record.composition is not None]


def _most_aligned(records: list[LayerRecord]) -> LayerRecord | None:
    """The composed layer whose components overlap most (mean off-diagonal |cosine|), for the alignment figure."""
    scored = []
    for record in records:
        if record.alignment:
            score = off_diagonal_mean(
                [[abs(v) if v is not None else None for v in row] for row in record.alignment["cosine"]]
            )
            if score is not None:
                scored.append((score, record))
    return max(scored, key=lambda pair: pair[0])[1] if scored else None


def figure_specs(
    analyses: Sequence[Analysis],
    labels: Sequence[str],
    comparison: Comparison | None = None,
    *,
    suggest_rule: str | None = DEFAULT_SUGGEST_RULE,
) -> list[FigureSpec]:
    """The figures a report holds, in page order. One figure per kind, the checkpoints in panels or overlaid
    (erank and base heatmaps, resize: a panel each, ``members``); a composition's figures carry its checkpoint's
    label in the id when there are several. One spectrum figure per module type (not per layer), so a 224-layer
    report stays small.
    ``suggest_rule``: the rank rule the resize figure marks beside the usual ones (None: no resize figure)."""
    ids = _Ids()
    several = len(analyses) > 1
    tau = analyses[0].options.thresholds[0]

    def tag(label: str) -> tuple[str, str]:
        return (f"-{slug(label)}", f" — {label}") if several else ("", "")

    drawable = [i for i, a in enumerate(analyses) if any(r.valid for r in a.layers)]
    # one heatmap for all the checkpoints, a panel each on one colour scale (issue 14), not one figure each
    specs = [
        FigureSpec(
            ids("erank-heatmap"),
            "erank-heatmap",
            "overview",
            "Effective rank (erank) by layer index and module type" + (", one panel per checkpoint" if several else ""),
            checkpoint=None if several else 0,
            wide=len(drawable) > 2,
            members=tuple(drawable or range(len(analyses))),  # none drawable: the figure's error says why
        )
    ]
    specs += [
        FigureSpec(
            ids("spectrum"),
            "spectrum",
            "overview",
            "Singular values by module type (log scale), thresholds τ and rank bounds marked",
        ),
        FigureSpec(ids("count-above"), "count-above", "overview", f"Singular values above τ = {tau:g} per layer"),
        FigureSpec(ids("energy"), "energy", "overview", "Cumulative energy Σᵢ₌₁ᵏ σᵢ² / Σσ² by module type"),
    ]
    specs += resize_base_specs(analyses, suggestion_rule(suggest_rule), ids, tag, labels)
    for index, (analysis, label) in enumerate(zip(analyses, labels, strict=True)):
        records = composed(analysis)
        if not records:
            continue
        suffix, of = tag(label)
        specs.append(
            FigureSpec(
                ids(f"weights{suffix}"),
                "weights",
                "composition",
                f"Composition weights and energy shares per composed layer{of}",
                checkpoint=index,
                wide=True,
            )
        )
        if any("growth" in record.composition for record in records):
            specs.append(
                FigureSpec(
                    ids(f"growth{suffix}"),
                    "growth",
                    "composition",
                    f"Effective rank as components are added (sequential){of}",
                    checkpoint=index,
                )
            )
        shown = [records[0]]
        most = _most_aligned(records)
        if most is not None and most is not records[0]:
            shown.append(most)
        for record in shown:
            if record.alignment:
                specs.append(
                    FigureSpec(
                        ids(f"alignment-{slug(record.name)}{suffix}"),
                        "alignment",
                        "composition",
                        f"Alignment of the components of {record.name}{of}",
                        checkpoint=index,
                        layer=record.name,
                    )
                )
    if comparison is not None:
        matched = next((layer for layer in comparison.layers if layer.alignment), None)
        if matched is not None:
            first, second = comparison.labels[:2]
            specs.append(
                FigureSpec(
                    ids("subspace-similarity"),
                    "subspace-similarity",
                    "comparison",
                    f"Subspace similarity φ(i, j) of the input (right) singular vectors of "
                    f"{matched.name}: top-i of {first} against top-j of {second}",
                    layer=matched.name,
                )
            )
    modules = layer_names_by_module(analyses)
    # several checkpoints: the overview spectrum already has these panels (one per module type, up to
    # MAX_FACETS), so the modules section would repeat it (issue 15: a figure costs ~1 s to draw and save)
    repeated = several and 1 < len(modules) <= MAX_FACETS and sum(len(a.layers) for a in analyses) > MAX_LINES
    if modules and not repeated:
        specs.append(
            FigureSpec(
                ids("spectrum-modules"),
                "spectrum",
                "modules",
                "Singular values of each module type's layers, one panel per type",
                layers=tuple(name for names in modules.values() for name in names),
                wide=len(modules) > 1,
            )
        )
    return specs
