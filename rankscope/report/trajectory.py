"""The report of a training run (``rankscope report RUN_DIR -o DIR``): ``index.html`` is the run's trajectory page —
its headlines (settled, saturated), a sortable step table and the trajectory figures — and ``final/`` holds the
usual report of the run's final checkpoint (report/bundle.py's ``write_report``, linked from the page), with
``trajectory.json`` (``rankscope.trajectory/1``, as ``rankscope trajectory --json`` writes it),
``trajectory.csv`` and ``figures/``; the whole folder is written all or nothing (staging, marker, swap).
``rankscope trajectory -o DIR`` writes the same folder without ``final/``.

Every value on the page is read from the trajectory document (``trajectory.document.trajectory_document``)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .. import __version__
from ..trajectory.document import trajectory_table
from .bundle import COMMIT, check_target, commit_folder, staged_folder, write_report
from .csv import table_csv
from .figure_files import inline_and_save
from .html import page_document
from .html.page import esc, figure, kpis, table
from .json import dumps
from .model import Cell, Column, FigureSpec, Kpi, Row, Table

if TYPE_CHECKING:
    from ..analysis.records import Analysis
    from ..trajectory.build import Trajectory

logger = logging.getLogger(__name__)

FINAL = "final"  # the sub-folder holding the final checkpoint's report
STEP_COLUMNS = ("step", "σ > τ (all layers)", "drift vs t−1", "drift vs final", "relative change", "layers")


def trajectory_figures(trajectory: Trajectory) -> tuple[list[tuple[FigureSpec, object]], list[str]]:
    """(spec, Figure) for each trajectory figure that can be drawn, and a warning for each that cannot."""
    from ..figures import trajectory as F
    from ..figures._common import FigureInputError

    tau = trajectory.options.thresholds[0]
    wanted = (  # (file name, `rankscope plot` kind, caption, drawing, full width)
        ("erank_by_step", "trajectory", "erank (mean over the layers of each module type) against step",
         lambda: F.metric_by_step_figure(trajectory, "erank"), False),
        ("count_by_step", "trajectory",
         f"count of σ > τ = {tau:g} (mean over the layers of each module type) against step",
         lambda: F.metric_by_step_figure(trajectory, "count_above"), False),
        ("drift", "drift", "Mean subspace drift against the previous and the final checkpoint, and the mean "
         "relative change ‖ΔWₜ − ΔWₜ₋₁‖_F / ‖ΔWₜ‖_F, against step", lambda: F.drift_figure(trajectory), False),
        ("erank_heatmap", "trajectory-heatmap", "erank of every layer at every step",
         lambda: F.layer_step_heatmap(trajectory, "erank"), True),
    )  # fmt: skip
    drawn, warnings = [], []
    for name, kind, caption, draw, wide in wanted:
        try:
            drawn.append((FigureSpec(name, kind, "trajectory", caption, wide=wide), draw()))
        except FigureInputError as exc:
            warnings.append(f"figure {name} not drawn: {exc}")
    return drawn, warnings


def step_rows(document: dict) -> list[dict]:
    """One row per checkpoint: its step, the count of σ above τ over all layers, and the mean drift and change
    against the previous checkpoint (None at the first step)."""
    drift = {entry["step"]: entry for entry in document["step_drift"]}
    rows = []
    for point, count in zip(document["checkpoints"], document["headlines"]["rank_counts"], strict=True):
        entry = drift.get(point["step"], {})
        rows.append({"step": point["step"], "σ > τ (all layers)": count, "drift vs t−1": entry.get("drift_previous"),
                     "drift vs final": entry.get("drift_final"), "relative change": entry.get("relative_change"),
                     "layers": len(point["layers"])})  # fmt: skip
    return rows


def headline_kpis(document: dict) -> list[Kpi]:
    heads = document["headlines"]
    steps = document["steps"]
    tau = heads["count_threshold"]
    if not heads["drift_available"]:
        settled = Kpi(Cell("—"), "settled", "one checkpoint: no drift" if len(steps) == 1 else "no drift: σ only")
    elif heads["settled_step"] is None:
        settled = Kpi(Cell("not yet"), "settled", f"drift still ≥ {heads['drift_threshold']:g} at the last step")
    else:
        settled = Kpi(Cell(heads["settled_step"], "d"), "settled from step",
                      f"mean subspace drift vs t−1 stays below {heads['drift_threshold']:g}")  # fmt: skip
    if heads["still_growing"]:
        saturated = Kpi(Cell("growing"), "rank", f"the count of σ > {tau:g} rose into the last step")
    else:
        most = max(heads["rank_counts"])
        saturated = Kpi(Cell(heads["saturation_step"], "d"), "rank saturated at step",
                        f"no later step has more σ > {tau:g} ({most} over all layers)")  # fmt: skip
    return [
        Kpi(
            Cell(len(steps), "d"),
            "checkpoints",
            f"steps {steps[0]}–{steps[-1]}" if len(steps) > 1 else f"step {steps[0]}",
        ),
        settled,
        saturated,
    ]


def _step_table(rows: Sequence[dict]) -> Table:
    specs = {"step": "d", "σ > τ (all layers)": "d", "layers": "d"}
    return Table(
        "step-table",
        [Column(c) for c in STEP_COLUMNS],
        [Row([Cell(row[c], specs.get(c, ".4f")) for c in STEP_COLUMNS]) for row in rows],
        "",
    )


def trajectory_page(
    source: str, document: dict, specs, svgs: dict, formats: Sequence[str], final: str | None = None
) -> str:
    """The run's page: headlines, the step table, the figures and, where ``final`` (the final checkpoint's path)
    is given, a link to its report in ``final/``."""
    figs = "".join(figure(spec, svgs[spec.id], n, formats) for n, spec in enumerate(specs, 1) if spec.id in svgs)
    notes = "".join(f'<p class="warn">⚠ {esc(w)}</p>' for w in document["warnings"])
    notes += "".join(f'<p class="note">{esc(n)}</p>' for n in document["notes"])
    link = f'<a href="{FINAL}/index.html">Final checkpoint</a>' if final is not None else ""
    about = (
        f"<p>The final checkpoint (<code>{esc(final)}</code>, step {document['steps'][-1]}) has the full report: "
        f'<a href="{FINAL}/index.html">{FINAL}/index.html</a>.</p>'
        if final is not None
        else ""
    )
    body = (
        f"<header><h1>rankscope run report <span>{esc(source)}</span></h1><nav>"
        f'<a href="#summary">Summary</a><a href="#figures">Figures</a><a href="#steps">Steps</a>{link}</nav>'
        f'</header><main><section id="summary"><h2>Trajectory</h2>{kpis(headline_kpis(document))}{notes}'
        f"{about}</section>"
        f'<section id="figures"><h2>Figures</h2><div class="figs">{figs}</div></section>'
        '<section id="steps"><h2>Steps</h2><p class="hint">Drift: 1 − the mean projection overlap of the top '
        "singular subspaces, averaged over the layers; relative change ‖ΔWₜ − ΔWₜ₋₁‖<sub>F</sub> / "
        "‖ΔWₜ‖<sub>F</sub>. Click a header to sort.</p>"
        + table(_step_table(step_rows(document)))
        + f"</section></main><footer>Written by rankscope {esc(__version__)} · "
        '<a href="trajectory.json">trajectory.json</a> · <a href="trajectory.csv">trajectory.csv</a>'
        + (" · figures/" if formats else "")
        + "</footer>"
    )
    return page_document(f"rankscope — run {source}", body)


def write_run_report(
    source: str,
    trajectory: Trajectory,
    document: dict,
    final: Analysis | None,
    out_dir: str | Path,
    *,
    formats: Sequence[str] = ("pdf",),
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
    phase: Callable[[str], None] | None = None,
    final_options: Mapping[str, object] | None = None,
    inputs: Sequence[str | Path] = (),
) -> list[str]:
    """Write the run report (see the module's docstring) to ``out_dir`` all or nothing; returns warnings.
    ``final``: the final checkpoint's analysis, reported in ``final/`` (None: no ``final/``, the folder of
    ``rankscope trajectory -o``). ``final_options``: more keyword arguments of ``write_report`` for that report
    (``suggest_rule``). ``inputs``: the paths the folder may not be written over besides every point's path
    (default: ``source``, which is also the page's title). ``phase(COMMIT)`` comes just before the folder is
    moved into place."""
    phase = phase or (lambda name: None)
    target = check_target(out_dir, [*(inputs or [source]), *(p.path for p in trajectory.points)], force=force)
    with staged_folder(target) as staging:
        warnings = []
        if final is not None:
            # the final checkpoint's report: its own commit is a rename inside the staging folder, not ours
            inner = {"progress": progress, "phase": lambda name: name != COMMIT and phase(name)}
            warnings = write_report([final], staging / FINAL, formats=formats, **inner, **(final_options or {}))
        phase("trajectory figures")
        drawn, left_out = trajectory_figures(trajectory)
        svgs = inline_and_save(drawn, staging, formats)
        phase("writing")
        final_path = final.checkpoint.path if final is not None else None
        files = {
            "index.html": trajectory_page(source, document, [s for s, _ in drawn], svgs, formats, final_path),
            "trajectory.json": dumps(document),
            "trajectory.csv": table_csv(*trajectory_table(trajectory)),
        }
        commit_folder(staging, target, files, phase)
    return warnings + left_out
