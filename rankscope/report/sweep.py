"""The report of a sweep (``rankscope report SWEEP_DIR -o DIR``): a self-contained ``index.html`` over the zoo the
sweep's two tables describe — counts, distributions of utilisation (erank / r) by r, module type and family,
erank against r, the outliers, and a sortable per-checkpoint table — with ``outliers.csv``, ``checkpoints.csv`` and
``figures/``, written all or nothing like a checkpoint's report (report/bundle.py's staging, marker and swap).

Everything shown is read from ``layers.{parquet,csv}`` and ``checkpoints.{parquet,csv}``; nothing is recomputed
from the adapters. Outliers (one row each, a layer may have several): ``dead`` (valid, σ₁ = 0 or numerical rank
0), ``near rank 1`` (erank < 1.5 with r ≥ 8), ``collapsed`` (a composition's ``collapsed`` column true, where the
table has one), ``invalid`` (the layer's error), ``error`` (a checkpoint that failed, its message).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from .. import __version__
from ..core.errors import RankscopeError
from ..core.naming import group_by_module
from ..sweeps.tables import CHECKPOINTS, LAYERS, TABLES, read_frame, records, table_path
from .bundle import check_target, commit_folder, staged_folder
from .csv import table_csv
from .figure_files import inline_and_save
from .html import page_document
from .html.page import esc, figure, kpis, table
from .model import Cell, Column, FigureSpec, Kpi, Row, Table

NEAR_RANK_ONE = 1.5  # erank below this, with r ≥ NEAR_RANK_ONE_MIN_R: the update is close to rank 1
NEAR_RANK_ONE_MIN_R = 8
OUTLIER_COLUMNS = ("id", "layer", "module_type", "what", "r", "erank", "sigma_max", "numerical_rank", "detail")
SUMMARY_COLUMNS = ("id", "status", "family", "base_model", "r", "layers", "invalid_layers", "mean utilization",
                   "mean erank", "seconds", "path")  # fmt: skip


def sweep_table_format(path: str | Path) -> str | None:
    """``parquet`` or ``csv`` when ``path`` is a folder ``rankscope sweep`` wrote (its ``checkpoints`` and
    ``layers`` tables in that format), else None."""
    folder = Path(path)
    if not folder.is_dir():
        return None
    for kind in TABLES:
        if table_path(folder, CHECKPOINTS, kind).is_file() and table_path(folder, LAYERS, kind).is_file():
            return kind
    return None


def read_sweep(path: str | Path) -> tuple[list[dict], list[dict]]:
    """The sweep's (layer rows, checkpoint rows) as dicts, missing values as None."""
    table = sweep_table_format(path)
    if table is None:
        raise RankscopeError(f"{path}: not a sweep folder (no checkpoints and layers tables)")
    layers = records(read_frame(table_path(Path(path), LAYERS, table), table))
    checkpoints = records(read_frame(table_path(Path(path), CHECKPOINTS, table), table))
    return layers, checkpoints


def _true(value: object) -> bool:
    return value is True or (isinstance(value, str) and value.lower() == "true") or (value is not None and value == 1)


def outliers(layers: Sequence[dict], checkpoints: Sequence[dict]) -> list[dict]:
    """One row per outlier (see the module's docstring), layers in table order, failed checkpoints last."""
    found = []
    for row in layers:
        whats = []
        if not _true(row.get("valid")):
            whats.append(("invalid", row.get("error") or ""))
        elif row.get("sigma_max") == 0 or row.get("numerical_rank") == 0:
            whats.append(("dead", "all singular values are zero"))
        else:
            erank, bound = row.get("erank"), row.get("rank_bound")
            if erank is not None and bound is not None and erank < NEAR_RANK_ONE and bound >= NEAR_RANK_ONE_MIN_R:
                whats.append(("near rank 1", f"erank {erank:.3g} of r = {bound}"))
        if _true(row.get("collapsed")):
            whats.append(("collapsed", "composition collapsed"))
        found += [{**{k: row.get(k) for k in OUTLIER_COLUMNS}, "r": row.get("rank_bound"), "what": what,
                   "detail": detail} for what, detail in whats]  # fmt: skip
    for row in checkpoints:
        if row.get("status") == "error":
            found.append({k: None for k in OUTLIER_COLUMNS} | {"id": row.get("id"), "what": "error",
                                                                "detail": row.get("error") or ""})  # fmt: skip
    return found


def _mean(values: Sequence[object]) -> float | None:
    numbers = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v]
    return sum(numbers) / len(numbers) if numbers else None


def checkpoint_summary(layers: Sequence[dict], checkpoints: Sequence[dict]) -> list[dict]:
    """Per checkpoint: its table row's identity, counts and seconds, and the means of utilisation and erank over
    its valid layers."""
    by_id: dict[object, list[dict]] = {}
    for row in layers:
        if _true(row.get("valid")):
            by_id.setdefault(row.get("id"), []).append(row)
    out = []
    for row in checkpoints:
        mine = by_id.get(row.get("id"), [])
        means = {"mean utilization": _mean([r.get("utilization") for r in mine]),
                 "mean erank": _mean([r.get("erank") for r in mine])}  # fmt: skip
        out.append({**{k: row.get(k) for k in SUMMARY_COLUMNS}, **means})
    return out


def _groups(layers: Sequence[dict], key: str) -> dict[str, list[float]]:
    """Utilisation of the valid layers, grouped by ``key`` (r numerically, module types in model order)."""
    valid = [row for row in layers if _true(row.get("valid")) and row.get("utilization") is not None]
    if key == "module_type":
        grouped = group_by_module(valid, lambda row: str(row.get("layer")), lambda row: str(row.get("module_type")))
        return {name: [row["utilization"] for row in rows] for name, rows in grouped.items()}
    if key == "r":
        values = sorted({row["rank_bound"] for row in valid if row.get("rank_bound") is not None})
        return {f"{r:g}": [row["utilization"] for row in valid if row.get("rank_bound") == r] for r in values}
    groups: dict[str, list[float]] = {}
    for row in valid:
        groups.setdefault(str(row.get(key)), []).append(row["utilization"])
    return dict(sorted(groups.items()))


FIGURES = (
    ("utilization_by_r", "r", "Utilisation (erank / r) of every layer, by its rank bound r"),
    ("utilization_by_module", "module_type", "Utilisation (erank / r) of every layer, by module type"),
    ("utilization_by_family", "family", "Utilisation (erank / r) of every layer, by adapter family"),
)


def sweep_figures(layers: Sequence[dict]) -> list[tuple[FigureSpec, object]]:
    """The page's figures, each (spec, matplotlib Figure); a figure with nothing to draw is left out."""
    from ..figures._common import FigureInputError
    from ..figures.zoo import distribution_figure, erank_scatter_figure

    labels = {"r": "rank bound r", "module_type": "module type", "family": "family"}
    out = []
    for name, key, caption in FIGURES:
        try:
            fig = distribution_figure(_groups(layers, key), value_label="erank / r", group_label=labels[key])
        except FigureInputError:
            continue
        out.append((FigureSpec(name, "zoo-distribution", "sweep", caption), fig))
    valid = [row for row in layers if _true(row.get("valid"))]
    order = list(_groups(layers, "module_type"))
    try:
        fig = erank_scatter_figure([r.get("rank_bound") for r in valid], [r.get("erank") for r in valid],
                                   [str(r.get("module_type")) for r in valid], order=order)  # fmt: skip
        out.append((FigureSpec("erank_vs_r", "zoo-scatter", "sweep", "erank of every layer against its rank bound r "
                               "(jittered on r; dashed: erank = r, the bound)"), fig))  # fmt: skip
    except FigureInputError:
        pass
    return out


def _cell(value: object) -> Cell:
    """A text cell (a missing value empty)."""
    return Cell("" if value is None else str(value))


def _table(table_id: str, rows: Sequence[dict], columns: Sequence[str], numeric: Sequence[str], caption: str) -> Table:
    specs = {c: (".4g" if c in ("erank", "sigma_max", "mean utilization", "mean erank", "seconds") else "g")
             for c in numeric}  # fmt: skip
    model_rows = []
    for row in rows:
        cells = [Cell(row.get(c), specs[c]) if c in numeric else _cell(row.get(c)) for c in columns]
        model_rows.append(Row(cells, search=" ".join(str(row.get(c) or "") for c in columns).lower()))
    return Table(table_id, [Column(c, numeric=c in numeric) for c in columns], model_rows, caption)


def _counts(layers: Sequence[dict], checkpoints: Sequence[dict], found: Sequence[dict]) -> list[Kpi]:
    status = [row.get("status") for row in checkpoints]
    duplicates = sum(1 for row in checkpoints if row.get("duplicate_of"))
    families = sorted({str(row.get("family")) for row in checkpoints if row.get("family") is not None})
    bases = sorted({str(row.get("base_model")) for row in checkpoints if row.get("base_model") is not None})
    mean_util = _mean([row.get("utilization") for row in layers if _true(row.get("valid"))])
    return [
        Kpi(
            Cell(len(checkpoints), "d"),
            "checkpoints",
            f"{status.count('ok')} ok, {status.count('error')} failed, {duplicates} duplicates",
        ),
        Kpi(Cell(len(layers), "d"), "layer rows", f"{sum(1 for r in layers if not _true(r.get('valid')))} invalid"),
        Kpi(Cell(mean_util, ".0%"), "mean utilisation", "erank / r over the valid layers"),
        Kpi(Cell(len(found), "d"), "outliers", ", ".join(sorted({o["what"] for o in found})) or "none"),
        Kpi(Cell(len(families), "d"), "families", ", ".join(families)),
        Kpi(Cell(len(bases), "d"), "base models", ", ".join(bases) or "not named in the configs"),
    ]


def sweep_page(sweep_dir: str, layers, checkpoints, found, summary, svgs: dict, specs, formats) -> str:
    """The sweep report as one HTML document (the checkpoint report's style sheet, script and page shell)."""
    numeric_out = ("r", "erank", "sigma_max", "numerical_rank")
    numeric_sum = ("r", "layers", "invalid_layers", "mean utilization", "mean erank", "seconds")
    outlier_table = _table("outlier-table", found, OUTLIER_COLUMNS, numeric_out, "")
    summary_table = _table("checkpoint-table", summary, SUMMARY_COLUMNS, numeric_sum, "")
    figs = "".join(figure(spec, svgs[spec.id], n, formats) for n, spec in enumerate(specs, 1) if spec.id in svgs)
    links = " · ".join(f'<a href="{name}">{name}</a>' for name in ("outliers.csv", "checkpoints.csv"))
    body = (
        f"<header><h1>rankscope sweep report <span>{esc(sweep_dir)}</span></h1><nav>"
        '<a href="#summary">Summary</a><a href="#figures">Figures</a><a href="#outliers">Outliers</a>'
        '<a href="#checkpoints">Checkpoints</a></nav></header><main>'
        f'<section id="summary"><h2>Summary</h2>{kpis(_counts(layers, checkpoints, found))}</section>'
        f'<section id="figures"><h2>Figures</h2><div class="figs">{figs}</div></section>'
        '<section id="outliers"><h2>Outliers</h2><p class="hint">Dead: σ₁ = 0 (or numerical rank 0); near rank 1: '
        f"erank &lt; {NEAR_RANK_ONE:g} with r ≥ {NEAR_RANK_ONE_MIN_R}; collapsed compositions; invalid layers; "
        "checkpoints that failed. Click a header to sort, type to filter.</p>"
        + _filter("outlier-table", "filter outliers (id, layer, kind)", len(found))
        + table(outlier_table)
        + '</section><section id="checkpoints"><h2>Checkpoints</h2><p class="hint">One row per checkpoint of the '
        "sweep; means over its valid layers. Click a header to sort.</p>"
        + _filter("checkpoint-table", "filter checkpoints", len(summary))
        + table(summary_table)
        + f"</section></main><footer>Written by rankscope {esc(__version__)} from {esc(sweep_dir)} · {links}"
        + (" · figures/" if formats else "")
        + "</footer>"
    )
    return page_document(f"rankscope — sweep {sweep_dir}", body)


def _filter(table_id: str, placeholder: str, total: int) -> str:
    from .html.page import filter_box

    return filter_box(table_id, placeholder, total)


def write_sweep_report(
    sweep_dir: str | Path,
    out_dir: str | Path,
    *,
    formats: Sequence[str] = ("pdf",),
    force: bool = False,
    phase: Callable[[str], None] | None = None,
) -> dict:
    """Write the sweep report of ``sweep_dir`` to ``out_dir`` all or nothing; returns counts for the closing line
    (``checkpoints``, ``layers``, ``outliers``)."""
    phase = phase or (lambda name: None)
    target = check_target(out_dir, [sweep_dir], force=force)
    layers, checkpoints = read_sweep(sweep_dir)
    found = outliers(layers, checkpoints)
    summary = checkpoint_summary(layers, checkpoints)
    with staged_folder(target) as staging:
        phase("figures")
        drawn = sweep_figures(layers)
        svgs = inline_and_save(drawn, staging, formats)
        phase("writing")
        files = {
            "index.html": sweep_page(
                str(sweep_dir), layers, checkpoints, found, summary, svgs, [spec for spec, _ in drawn], formats
            ),
            "outliers.csv": table_csv(OUTLIER_COLUMNS, [[o.get(c) for c in OUTLIER_COLUMNS] for o in found]),
            "checkpoints.csv": table_csv(SUMMARY_COLUMNS, [[s.get(c) for c in SUMMARY_COLUMNS] for s in summary]),
        }
        commit_folder(staging, target, files, phase)
    return {"checkpoints": len(checkpoints), "layers": len(layers), "outliers": len(found)}
