"""What the report adds from ``resize`` and ``--base``: each layer's suggested rank under a rank rule
(``rankscope suggest``'s :func:`~rankscope.resize.suggest.suggest`, default ``energy:0.95``) and, for analyses
made with ``--base``, each layer's measures against its base weight (the records' ``base`` objects), as layer-table
columns and figure specs. The values are decided here, once, for the report model; renderers only lay them out.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

from ..figures.resize import DEFAULT_RULES
from ..resize.rules import parse_rule
from ..resize.suggest import suggest
from .model import Cell, Column, FigureSpec

if TYPE_CHECKING:
    from ..analysis.records import Analysis, LayerRecord

DEFAULT_SUGGEST_RULE = "energy:0.95"


def suggestion_rule(rule: str | None) -> str | None:
    """The rule in its canonical spelling (``"energy:0.95"``); None for no suggestion (``None`` or ``"none"``).
    A rule that does not parse raises :class:`~rankscope.core.errors.UsageProblem` naming the accepted forms."""
    if rule is None or str(rule).strip().lower() == "none":
        return None
    return str(parse_rule(rule))


def suggested_ranks(analyses: Sequence[Analysis], rule: str | None) -> list[dict[str, int]]:
    """Per checkpoint, layer name → the rank ``rule`` keeps (valid layers only); empty without a rule."""
    if rule is None:
        return []
    return [{layer.name: layer.rank for layer in suggest(analysis, rule).layers} for analysis in analyses]


def measured_against_base(analyses: Sequence[Analysis]) -> bool:
    """Whether any layer of any checkpoint was measured against ``--base`` (its record has a ``base`` object)."""
    return any(record.base is not None for analysis in analyses for record in analysis.layers)


def extra_columns(rule: str | None, base: bool) -> list[Column]:
    """The layer table's columns after the metrics: the suggested rank, then the measures against the base."""
    columns = [Column("suggested r", short="sugg. r")] if rule is not None else []
    if base:
        columns += [
            Column("‖ΔW‖/‖W₀‖", short="rel. ΔW"),
            Column("σ₁/σ₁(W₀)", short="rel. σ₁"),
            Column("amplification", short="ampl."),
            Column("intruders"),
        ]
    return columns


def extra_cells(record: LayerRecord, ranks: Mapping[str, int] | None, base: bool) -> list[Cell]:
    """One layer's cells for :func:`extra_columns` (``ranks``: its checkpoint's suggested ranks, None: no rule)."""
    cells = [Cell(ranks.get(record.name), "d")] if ranks is not None else []
    if base:
        fields = record.base or {}
        intruders = fields.get("intruders")
        count = intruders["count"] if intruders is not None else None
        cells += [
            Cell(fields.get("relative_update"), ".3g"),
            Cell(fields.get("relative_sigma_max"), ".3g"),
            Cell(fields.get("amplification"), ".3g"),
            Cell(count, "d", shown=f"{count}/{intruders['top_k']}" if intruders is not None else None),
        ]
    return cells


def resize_base_specs(
    analyses: Sequence[Analysis],
    rule: str | None,
    ids: Callable[[str], str],
    tag: Callable[[str], tuple[str, str]],
    labels: Sequence[str],
) -> list[FigureSpec]:
    """The energy kept against total rank for the rules (with the report's own; none without one), and, where
    layers were measured against a base, the relative update and intruder heatmaps: one figure of each for all
    the checkpoints that have something to draw (a panel each; ``checkpoint`` set when that is one)."""
    specs = []
    rules = tuple(dict.fromkeys([*DEFAULT_RULES, rule])) if rule is not None else ()
    drawable = [i for i, a in enumerate(analyses) if any(record.valid for record in a.layers)]
    based = [i for i in drawable if any(r.valid and r.base is not None for r in analyses[i].layers)]

    def one(kind: str, members: list[int], caption: str) -> None:
        if not members:
            return
        alone = len(members) == 1
        suffix, of = tag(labels[members[0]]) if alone else ("", "")
        specs.append(FigureSpec(ids(f"{kind}{suffix}"), kind, "overview", caption + of,
                                checkpoint=members[0] if alone else None,
                                wide=len(members) > 2, rules=rules if kind == "resize" else (),
                                members=tuple(members)))  # fmt: skip

    if rules:
        one("resize", drawable, f"Energy kept against total rank: the best at each size, rank rules (the report's: "
            f"{rule}) and the adapter's present size")  # fmt: skip
    one("base-heatmap", based, "Against the base: relative update ‖ΔW‖_F/‖W₀‖_F and intruder dimensions by layer "
        "index and module type")  # fmt: skip
    return specs


__all__ = [
    "DEFAULT_SUGGEST_RULE",
    "extra_cells",
    "extra_columns",
    "measured_against_base",
    "resize_base_specs",
    "suggested_ranks",
    "suggestion_rule",
]
