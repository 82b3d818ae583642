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
from .definitions import definitions
from .drawing import start_drawing
from .html import render_page
from .json import dumps
from .markdown import comparison_markdown, notes_markdown, spectrum_markdown
from .model import Report
from .output import set_usual_mode
from .resize_base import DEFAULT_SUGGEST_RULE

if TYPE_CHECKING:
    from ..analysis.comparison import Comparison
    from ..analysis.records import Analysis
    from ..core.forked import ForkedHelpers

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
    if report is not None and report.no_comparison is not None:
        parts.append(f"## Comparison\n\n{report.no_comparison}\n")
    rule = report.suggestion_rule if report is not None else None
    suggested = report.suggested if report is not None and rule is not None else [None] * len(analyses)
    parts += [spectrum_markdown(analysis, ranks, rule) for analysis, ranks in zip(analyses, suggested, strict=True)]
    notes = [n for index, analysis in enumerate(analyses) for n in checkpoint_notes(analysis, index)]
    parts += [text for text in [notes_markdown(notes, labels)] if text]
    if report is not None:
        parts.append("## Definitions\n\n" + "".join(f"- **{term}**: {text}\n" for term, text in definitions(report)))
    return "\n".join(parts)


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
    helpers: ForkedHelpers | None = None,
) -> list[str]:
    """Write the report of ``analyses`` (one checkpoint, or several compared) to the folder ``out_dir``.

    ``formats``: the figure files to write under ``figures/`` (any of pdf, png, svg; empty for none — the page
    has its figures inline either way). ``phase(name)`` is called as each of :data:`PHASES` starts (the last,
    ``COMMIT``, just before the finished folder is renamed into place); ``progress(done, total)`` within the
    comparison and the figures. ``suggest_rule``: the rank rule of the layers' suggested ranks and of the resize
    figure (``rankscope suggest``'s rules; None or ``"none"``: neither). Returns warnings (figures that could
    not be drawn). ``processes``: how many processes draw the figures (1: this one only; the CLI gives one per
    core). ``helpers``: :class:`~rankscope.core.forked.ForkedHelpers` forked earlier and prepared with
    :func:`~rankscope.report.drawing.prepare_to_draw` draw them instead (the CLI's, forked before the analysis).
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
        finish = start_drawing(analyses, labels, report.figures, staging / "figures", formats,
                               processes=processes, helpers=helpers)  # fmt: skip
        # the tables need no figure: written while helpers draw (before the figures where this process draws)
        files = {
            "summary.json": dumps(report_document(analyses, labels, comparison)),
            "layers.csv": report_csv(analyses, labels, report),
            "summary.md": report_markdown(analyses, comparison, labels, report),
        }
        svgs, warnings = finish(progress)
        phase("writing")
        files["index.html"] = render_page(report, svgs, figure_formats=formats, companions=True)
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
