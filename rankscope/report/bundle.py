"""A report folder — ``index.html``, ``layers.csv``, ``summary.json``, ``summary.md``, ``figures/`` — written all
or nothing.

Everything is written into a temporary folder beside the target, which is then renamed into place: an error or
Ctrl-C leaves the old report (or nothing), never half of a new one. A folder holds a ``.rankscope-report``
marker; an existing folder without one is not replaced unless ``force`` is given, and no folder that holds the
working directory, the user's home or an input checkpoint is ever replaced.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .. import __version__
from ..analysis.documents import report_document
from ..core.errors import RankscopeError
from ..core.naming import checkpoint_labels
from .build import build_report, checkpoint_notes
from .csv import layers_csv
from .csv import text_cell as csv_text
from .html import render_page
from .json import dumps
from .markdown import comparison_markdown, notes_markdown, spectrum_markdown
from .model import FigureSpec, Report
from .output import set_usual_mode
from .resize_base import DEFAULT_SUGGEST_RULE

if TYPE_CHECKING:
    from ..analysis.comparison import Comparison
    from ..analysis.records import Analysis

logger = logging.getLogger(__name__)

MARKER = ".rankscope-report"
FIGURE_FORMATS = ("pdf", "png", "svg")
COMMIT = "moving into place"
PHASES = ("comparing", "figures", "writing", COMMIT)  # what write_report reports to ``phase``


def check_target(out_dir: str | Path, inputs: Sequence[str | Path] = (), *, force: bool = False) -> Path:
    """The folder a report may be written to, or a one-line error saying why not.

    Refused always: a path that is a file, or a folder holding the working directory, the home directory, a
    filesystem root or one of ``inputs``. Refused without ``force``: a non-empty folder that rankscope did not
    write (no marker file).
    """
    target = Path(out_dir)
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise RankscopeError(f"{target}: exists and is not a report folder; choose another out_dir", argument="out_dir")
    resolved = target.resolve()
    guarded = [Path.cwd().resolve(), Path.home().resolve(), *(Path(p).resolve() for p in inputs)]
    for path in guarded:
        if resolved == path or resolved in path.parents:
            raise RankscopeError(f"{target}: refusing to write a report over a folder that holds {path}")
    if resolved == Path(resolved.anchor):
        raise RankscopeError(f"{target}: refusing to write a report over a filesystem root")
    if target.is_dir() and not force and not (target / MARKER).is_file() and any(target.iterdir()):
        raise RankscopeError(
            f"{target}: the folder exists and was not written by rankscope report; pass force=True to replace it",
            argument="force",
        )
    return target


def report_csv(analyses: Sequence[Analysis], labels: Sequence[str], report: Report | None = None) -> str:
    """One checkpoint: ``layers_csv``. Several: one row per (checkpoint, layer), a ``checkpoint`` column first,
    the union of the metric columns (blank where a checkpoint lacks one). With ``report``, its suggested ranks."""
    rule = report.suggestion_rule if report is not None else None
    suggested = report.suggested if report is not None and rule is not None else [None] * len(analyses)
    if len(analyses) == 1:
        return layers_csv(analyses[0], suggested[0], rule)
    columns: list[str] = []
    rows: list[dict] = []
    for label, analysis, ranks in zip(labels, analyses, suggested, strict=True):
        reader = csv.DictReader(io.StringIO(layers_csv(analysis, ranks, rule)))
        for name in reader.fieldnames or []:
            if name not in columns:
                columns.append(name)
        rows += [{"checkpoint": csv_text(label), **row} for row in reader]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, ["checkpoint", *columns], restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def report_markdown(
    analyses: Sequence[Analysis], comparison: Comparison | None, labels: Sequence[str], report: Report | None = None
) -> str:
    """The comparison (if any), each checkpoint's tables (with ``report``'s suggested ranks), then the warnings
    and notes labelled by checkpoint."""
    parts = [comparison_markdown(comparison)] if comparison is not None else []
    rule = report.suggestion_rule if report is not None else None
    suggested = report.suggested if report is not None and rule is not None else [None] * len(analyses)
    parts += [spectrum_markdown(analysis, ranks, rule) for analysis, ranks in zip(analyses, suggested, strict=True)]
    notes = [n for index, analysis in enumerate(analyses) for n in checkpoint_notes(analysis, index)]
    parts += [text for text in [notes_markdown(notes, labels)] if text]
    return "\n".join(parts)


def _figure(slot: FigureSpec, analyses: Sequence[Analysis], labels: Sequence[str]):
    """Draw one slot with rankscope.figures (None when there is nothing to draw)."""
    from .. import figures as F

    # figures with a panel per checkpoint: full width when there are more than two
    members = slot.members if slot.members is not None else (slot.checkpoint,) if slot.checkpoint is not None else ()
    chosen, names = [analyses[i] for i in members], [labels[i] for i in members]
    width = "full" if slot.wide else "column"
    if slot.kind == "erank-heatmap":
        # one colour scale for every checkpoint: the same colour is the same erank in each panel
        low, high = F.heatmap_limits(analyses)
        return F.erank_heatmap_figure(chosen, names, vmin=low, vmax=high, width=width)
    if slot.kind == "count-above":
        return F.count_above_figure(analyses, labels)
    if slot.kind == "energy":
        return F.energy_figure(analyses, labels)
    if slot.kind == "weights":
        return F.weights_figure(analyses[slot.checkpoint])
    if slot.kind == "growth":
        return F.growth_figure(analyses[slot.checkpoint])
    if slot.kind == "resize":
        return F.resize_figure(chosen, slot.rules, labels=names, width=width)
    if slot.kind == "base-heatmap":
        return F.base_heatmap_figure(chosen, names, width=width)
    if slot.kind == "alignment":
        record = next(r for r in analyses[slot.checkpoint].layers if r.name == slot.layer)
        return F.alignment_figure(record)
    if slot.kind == "subspace-similarity":
        from ..measures.components import subspace_similarity_grid

        updates = [
            next(layer.update for layer in a.checkpoint.layers if layer.name == slot.layer) for a in analyses[:2]
        ]
        grid = subspace_similarity_grid(*updates, side="right")
        return F.subspace_similarity_figure(grid, labels[:2], title=slot.layer)
    if slot.kind == "spectrum" and slot.layers is None:
        return F.spectrum_figure(analyses, labels)
    if slot.kind == "spectrum":
        # the layers valid in every checkpoint that has them; the modules section's: a panel per module type
        having = [(a, label) for a, label in zip(analyses, labels, strict=True)
                  if any(r.name in slot.layers for r in a.layers)]  # fmt: skip
        valid = [name for name in slot.layers
                 if all(any(r.name == name and r.valid for r in a.layers) for a, _ in having)]  # fmt: skip
        if not valid:
            return None
        draw = F.module_spectra_figure if slot.section == "modules" else F.spectrum_figure
        return draw([a for a, _ in having], [label for _, label in having], layers=valid, width=width)
    raise ValueError(f"unknown figure kind {slot.kind!r}")


def render_figures(
    analyses: Sequence[Analysis],
    labels: Sequence[str],
    slots: Sequence[FigureSpec],
    folder: Path | None,
    formats: Sequence[str],
    *,
    progress: Callable[[int, int], None] | None = None,
    processes: int = 1,
) -> tuple[dict[str, str], list[str]]:
    """Each slot's figure as inline SVG (and saved as ``folder/<id>.<fmt>``); plus a warning per figure that
    could not be drawn — the report goes on without it. ``processes`` > 1 draws them in that many processes
    (:func:`~rankscope.core.forked.forked_map`: this one and forked helpers; the same bytes as one process)."""
    from ..core.forked import forked_map
    from ..figures.output import write_rendered

    formats = tuple(formats) if folder is not None else ()
    if processes > 1:  # imported once, before the helpers fork, rather than once in each
        import matplotlib.backends.backend_pdf
        import matplotlib.backends.backend_svg  # noqa: F401

        from .. import figures  # noqa: F401

    done = None if progress is None else lambda finished: progress(finished, len(slots))
    drawn = forked_map(lambda index: _render_slot(slots[index], analyses, labels, formats), len(slots),
                       processes=processes, done=done)  # fmt: skip
    svgs, warnings = {}, []
    for slot, (svg, files, warning) in zip(slots, drawn, strict=True):
        if warning is not None:
            warnings.append(warning)
        elif svg is not None:
            svgs[slot.id] = svg
            if files:
                write_rendered(folder / slot.id, files)
    return svgs, warnings


def _render_slot(
    slot: FigureSpec, analyses: Sequence[Analysis], labels: Sequence[str], formats: Sequence[str]
) -> tuple[str | None, dict[str, bytes], str | None]:
    """One slot's (inline SVG, files' bytes by format, warning): (None, {}, None) when there is nothing to draw,
    (None, {}, warning) when it could not be drawn."""
    from ..figures.output import page_and_files

    try:
        fig = _figure(slot, analyses, labels)
        if fig is None:
            return None, {}, None
        svg, files = page_and_files(fig, formats)
        return svg, files, None
    except RankscopeError as exc:
        return None, {}, f"figure {slot.id} left out: {exc}"
    except Exception as exc:  # a drawing bug costs one figure, not the report; the warning says so
        logger.debug("figure %s failed", slot.id, exc_info=True)
        return None, {}, f"figure {slot.id} left out: {type(exc).__name__}: {exc}"


def write_report(
    analyses: Sequence[Analysis],
    out_dir: str | Path,
    *,
    labels: Sequence[str] | None = None,
    formats: Sequence[str] = ("pdf",),
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
    phase: Callable[[str], None] | None = None,
    suggest_rule: str | None = DEFAULT_SUGGEST_RULE,
    processes: int = 1,
) -> list[str]:
    """Write the report of ``analyses`` (one checkpoint, or several compared) to the folder ``out_dir``.

    ``formats``: the figure files to write under ``figures/`` (any of pdf, png, svg; empty for none — the page
    has its figures inline either way). ``phase(name)`` is called as each of :data:`PHASES` starts (the last,
    ``COMMIT``, just before the finished folder is renamed into place); ``progress(done, total)`` within the
    comparison and the figures. ``suggest_rule``: the rank rule of the layers' suggested ranks and of the resize
    figure (``rankscope suggest``'s rules; None or ``"none"``: neither). Returns warnings (figures that could
    not be drawn). ``processes``: how many processes draw the figures (1: this one only; the CLI gives one per
    core).
    """
    phase = phase or (lambda name: None)
    from ..analysis.comparison import compare

    if not analyses:
        raise RankscopeError("a report needs at least one checkpoint")
    formats = tuple(dict.fromkeys(f.lower() for f in formats))
    unknown = [f for f in formats if f not in FIGURE_FORMATS]
    if unknown:
        raise RankscopeError(f"figure format {unknown[0]!r} is not one of {', '.join(FIGURE_FORMATS)}")
    labels = list(labels) if labels is not None else checkpoint_labels([a.checkpoint.path for a in analyses])
    if len(labels) != len(analyses) or len(set(labels)) != len(labels):
        raise RankscopeError(f"need {len(analyses)} distinct labels, got {labels}")
    target = check_target(out_dir, [a.checkpoint.path for a in analyses], force=force)
    comparison, unshared = None, []
    if len(analyses) > 1:
        shared = set.intersection(*({record.name for record in a} for a in analyses))
        if shared:
            phase("comparing")
            comparison = compare(analyses, labels, progress=progress)
        else:  # adapters of different models: each is still reported
            unshared = [f"no layer is shared by all of {', '.join(labels)}: each is reported on its own, no comparison"]
    with staged_folder(target) as staging:
        (staging / "figures").mkdir()
        report = build_report(analyses, labels, comparison, suggest_rule=suggest_rule)
        phase("figures")
        svgs, warnings = render_figures(analyses, labels, report.figures, staging / "figures", formats,
                                        progress=progress, processes=processes)  # fmt: skip
        phase("writing")
        files = {
            "summary.json": dumps(report_document(analyses, labels, comparison)),
            "layers.csv": report_csv(analyses, labels, report),
            "summary.md": report_markdown(analyses, comparison, labels, report),
            "index.html": render_page(report, svgs, figure_formats=formats, companions=True),
        }
        if not any((staging / "figures").iterdir()):  # --figures none, or nothing to draw: no empty folder
            (staging / "figures").rmdir()
        commit_folder(staging, target, files, phase)
    return (comparison.warnings if comparison is not None else unshared) + warnings


_MARKER_HEAD = "written by rankscope {version} report; `rankscope report … -o` may replace these entries:"
# what reports wrote before the marker listed its entries
_EARLIER_ENTRIES = frozenset({"index.html", "summary.json", "summary.md", "layers.csv", "figures"})


@contextlib.contextmanager
def staged_folder(target: Path) -> Iterator[Path]:
    """A temporary folder beside ``target`` to write a report into; :func:`commit_folder` puts it in place. If
    anything fails (or Ctrl-C) it is removed, leaving the old folder or none; an OSError becomes one line."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    except OSError as exc:
        raise RankscopeError(f"{target}: cannot write the report ({exc.strerror or exc})") from exc
    try:
        set_usual_mode(staging, 0o777)
        yield staging
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(exc, OSError):
            raise RankscopeError(f"{target}: cannot write the report ({exc.strerror or exc})") from exc
        raise


def commit_folder(
    staging: Path, target: Path, files: Mapping[str, str], phase: Callable[[str], None] | None = None
) -> None:
    """Write ``files`` (name → text) and the marker listing every top-level entry into ``staging``, then rename it
    to ``target`` (``phase(COMMIT)`` just before)."""
    entries = sorted({*files, *(entry.name for entry in staging.iterdir())})
    for name, text in {**files, MARKER: marker_text(entries)}.items():
        (staging / name).write_text(text, encoding="utf-8", newline="")
    if phase is not None:
        phase(COMMIT)
    swap_into_place(staging, target)


def marker_text(entries: Sequence[str]) -> str:
    return _MARKER_HEAD.format(version=__version__) + "\n" + "".join(f"{entry}\n" for entry in entries)


def _rankscope_entries(folder: Path) -> frozenset[str]:
    """The top-level entries of ``folder`` that a rankscope report wrote (its marker lists them)."""
    try:
        lines = (folder / MARKER).read_text(encoding="utf-8").splitlines()
    except OSError:
        return frozenset()
    listed = frozenset(line for line in lines[1:] if line and "/" not in line)
    return (listed or _EARLIER_ENTRIES) | {MARKER}


def swap_into_place(staging: Path, target: Path) -> None:
    """Put ``staging`` where ``target`` is; the old folder is restored if the rename fails. Entries of the old
    folder that rankscope did not write (a user's own notes beside the report) move into the new one."""
    if not target.exists():
        os.rename(staging, target)
        return
    old = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.old")
    os.rename(target, old)
    try:
        os.rename(staging, target)
    except BaseException:
        os.rename(old, target)
        raise
    ours = _rankscope_entries(old)
    kept = []
    for entry in old.iterdir():
        if entry.name not in ours:
            if (target / entry.name).exists():
                kept.append(entry.name)  # a name the new report writes too: --force replaces it
                continue
            os.rename(entry, target / entry.name)
    if kept:
        logger.info("replaced %s in %s (--force)", ", ".join(sorted(kept)), target)
    shutil.rmtree(old, ignore_errors=True)
