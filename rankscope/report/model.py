"""The report model: plain data that every renderer turns into bytes.

Built once from the records (``Analysis``, ``Comparison``) by :mod:`rankscope.report.build`; the renderers
(terminal, Markdown, HTML, figures) only lay it out. A table is columns and rows of typed cells — each cell keeps
its exact value (HTML sorts by it, CSV writes it) and the format it is shown in, so that one formatter,
:func:`number`, writes every number of every output.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..core.naming import group_by_module, model_order_key
from ..figures._common import cumulative_energy

if TYPE_CHECKING:
    from ..analysis.comparison import Comparison
    from ..analysis.records import Analysis, LayerRecord


def number(value: float | int | None, spec: str = ".3g") -> str:
    """A number as shown: ``—`` for a missing value, ``nan``/``inf`` as such, else ``format(value, spec)``."""
    if value is None:
        return "—"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return format(value, spec)


@dataclass(frozen=True)
class Shares:
    """Weights or energy shares of a composition's components, drawn as one stacked bar (|x_i| / Σ|x|)."""

    values: tuple[float | None, ...]
    names: tuple[str, ...]
    what: str


@dataclass(frozen=True)
class Cell:
    """One table cell: its exact ``value`` and the format ``spec`` it is shown in (empty: text)."""

    value: float | int | str | Shares | None
    spec: str = ""
    shown: str | None = None  # text shown instead of the formatted value (an m×n shape sorted by its size)

    @property
    def numeric(self) -> bool:
        return bool(self.spec)

    @property
    def text(self) -> str:
        if self.shown is not None:
            return self.shown
        if self.spec:
            return number(self.value, self.spec)  # type: ignore[arg-type]
        return "—" if self.value is None else str(self.value)


@dataclass(frozen=True)
class Column:
    """A column: its title, whether it holds numbers, and a short title for narrow outputs (the terminal)."""

    title: str
    numeric: bool = True
    short: str | None = None


@dataclass
class Row:
    """A row of cells; ``total`` for the overall row under per-module ones; ``layer`` names the layer it is about;
    ``search`` is the text a filter matches."""

    cells: list[Cell]
    total: bool = False
    layer: str | None = None
    search: str = ""
    empty: bool = False  # no valid layer behind it: a compact output (Markdown) leaves it out


@dataclass
class Table:
    id: str
    columns: list[Column]
    rows: list[Row]
    caption: str = ""


@dataclass(frozen=True)
class FigureSpec:
    """One figure of the report: ``id`` is also its file name under ``figures/``; ``kind`` one of
    ``rankscope.figures.KINDS``; ``checkpoint`` an index into the analyses (None: all of them overlaid);
    ``layers`` the layer names it covers (None: all); ``layer`` the one layer it shows; ``rules`` the rank rules
    a ``resize`` figure marks; ``members`` the checkpoints of a figure with one panel per checkpoint."""

    id: str
    kind: str
    section: str  # "overview", "composition", "comparison", "modules"
    caption: str
    checkpoint: int | None = None
    module: str | None = None
    layers: tuple[str, ...] | None = None
    layer: str | None = None
    wide: bool = False
    rules: tuple[str, ...] = ()
    members: tuple[int, ...] | None = None  # the checkpoints drawn, one panel each (None: as ``checkpoint`` says)


@dataclass(frozen=True)
class Note:
    """A message tied to the checkpoint it is about (``checkpoint`` an index; None: the report as a whole).
    ``level``: ``warning``, ``invalid`` (``layer`` is the invalid layer, ``text`` its error) or ``note``."""

    text: str
    level: str = "warning"
    checkpoint: int | None = None
    layer: str | None = None


@dataclass(frozen=True)
class Kpi:
    value: Cell
    label: str
    detail: str = ""


@dataclass
class CheckpointView:
    """One checkpoint's summary card: who it is, its key numbers, its problems and its table by module type."""

    label: str
    path: str
    adapter_type: str
    family: str
    scaling: str
    exactness: str
    kpis: list[Kpi]
    usage: tuple[float, tuple[str, float], tuple[str, float]] | None  # mean utilisation, least and most used type
    notes: list[Note]
    skipped: list[tuple[str, str]]
    config: list[tuple[str, str]]
    modules: Table


@dataclass(frozen=True)
class SeriesView:
    """One checkpoint's layer in a per-layer plot: σ_i, the cumulative energy, and its series style index."""

    label: str
    style: int
    sigma: tuple[float, ...]
    energy: tuple[float, ...]
    rank_bound: int


@dataclass
class LayerEntry:
    """A layer in one checkpoint: its record (None where the checkpoint lacks it) and its style index."""

    label: str
    style: int
    record: LayerRecord
    components: Table | None = None
    cosine: Table | None = None


@dataclass
class LayerDetail:
    name: str
    anchor: str
    module: str
    entries: list[LayerEntry]
    series: list[SeriesView]


@dataclass
class CompositionView:
    label: str
    checkpoint: int
    stats: dict
    kpis: list[Kpi]
    components: list[str]
    table: Table


@dataclass
class ComparisonView:
    headlines: list[str]
    alignment: dict
    unmatched: dict[str, list[str]]
    modules: Table
    layers: Table


@dataclass
class Report:
    """Everything a report shows, in page order; the records stay reachable for renderers that draw them."""

    labels: list[str]
    analyses: list[Analysis]
    comparison: Comparison | None
    title: str
    checkpoints: list[CheckpointView]
    figures: list[FigureSpec]
    modules: dict[str, list[str]]  # module type → layer names, canonical order
    anchors: dict[str, str]
    layers: Table
    details: list[LayerDetail]
    compositions: list[CompositionView]
    comparison_view: ComparisonView | None
    energies: tuple[float, ...]
    thresholds: tuple[float, ...]
    notes: list[Note] = field(default_factory=list)
    suggestion_rule: str | None = None  # the rank rule of the layer table's suggested ranks (None: not shown)
    suggested: list[dict[str, int]] = field(default_factory=list)  # per checkpoint: layer → suggested rank
    against_base: bool = False  # some layer was measured against --base: the table has the base columns
    no_comparison: str | None = None  # several checkpoints but no comparison: why (said where it would stand)


def layer_names_by_module(analyses: Sequence[Analysis]) -> dict[str, list[str]]:
    """Module type → the names of that type (union over the checkpoints, in model order)."""
    module_of: dict[str, str] = {}
    for analysis in analyses:
        for record in analysis.layers:
            module_of.setdefault(record.name, record.module_type)
    return group_by_module(sorted(module_of, key=model_order_key), str, module_of.__getitem__)


__all__ = ["cumulative_energy", "layer_names_by_module", "number"]
