"""Saving figures: deterministic bytes (no dates, no creator strings, fixed SVG ids), written all-or-nothing.

PDF and SVG carry no metadata that changes between runs, so the same figure gives the same bytes; PNG is drawn
by Agg at 300 dpi without a ``Software`` chunk. Every requested format is rendered in memory first and then
each file is written to a temporary name beside its target and renamed into place: an error leaves no file.
:func:`write_atomically` and :func:`set_usual_mode` are the one way rankscope writes files (the report too).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ..core.errors import RankscopeError
from ._text_layout import shared_layouts
from .fonts import shared_subsets
from .style import paper_style

if TYPE_CHECKING:
    from matplotlib.figure import Figure

FORMATS = ("pdf", "png", "svg")
PNG_DPI = 300
_METADATA = {
    "pdf": {"Creator": None, "Producer": None, "CreationDate": None, "ModDate": None},
    "svg": {"Creator": None, "Date": None, "Format": None, "Type": None},
    "png": {"Software": None},
}
_PROLOG = re.compile(r"\A\s*(<\?xml[^>]*\?>\s*)?(<!DOCTYPE[^>]*>\s*)?", re.DOTALL)


def figure_bytes(fig: Figure, fmt: str) -> bytes:
    """The figure rendered as ``fmt`` (pdf, png or svg), deterministically."""
    if fmt not in FORMATS:
        raise ValueError(f"figure format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    buffer = io.BytesIO()
    # font embedding, SVG ids and dpi are read when saving; PDFs embed the process' shared font subsets
    with (
        paper_style(),
        settled_positions(fig),
        shared_layouts(),
        shared_subsets() if fmt == "pdf" else contextlib.nullcontext(),
    ):
        fig.savefig(buffer, format=fmt, dpi=PNG_DPI, metadata=_METADATA[fmt])
    return buffer.getvalue()


@contextlib.contextmanager
def settled_positions(fig: Figure) -> Iterator[None]:
    """While saving, switch off two of matplotlib's per-draw placements where they cannot move anything (issue
    15: ~20 % of drawing a figure of many panels, since each runs once per Axes in every layout pass and draw):

    - an empty axis label is still placed beside the tick labels, which measures them all again: it is pinned;
    - a title is moved above any tick labels at the top of its Axes, measuring the y axis once per title: where
      the Axes has nothing at its top (no ticks or labels there, no inset Axes, which that update places) the
      title stays at y = 1 plus the usual pad, where it already is.

    What is drawn does not change (tested pixel for pixel against matplotlib's own placement), and on exit the
    figure is as it was: a label or top ticks added before the next save are placed automatically again."""
    undo = []
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            if not axis.label.get_text() and getattr(axis, "_autolabelpos", False):
                undo.append((axis, "_autolabelpos", True))
                axis._autolabelpos = False  # what set_label_coords sets, without moving the (empty) label
        ticks = ax.xaxis.get_tick_params()
        top = ticks.get("top") or ticks.get("labeltop") or ax.xaxis.get_label_position() == "top"
        # matplotlib's switch (None or True: automatic) is the one set_title(..., y=1.0) turns off
        automatic = getattr(ax, "_autotitlepos", False)
        if not (top or ax.child_axes) and automatic in (None, True):
            undo.append((ax, "_autotitlepos", automatic))
            ax._autotitlepos = False
    try:
        yield
    finally:
        for owner, name, value in undo:
            setattr(owner, name, value)


def svg_text(fig: Figure) -> str:
    """The figure as SVG markup to inline in HTML: no XML prolog, no DOCTYPE; same figure, same text."""
    text = figure_bytes(fig, "svg").decode("utf-8")
    return _PROLOG.sub("", text, count=1)


def output_paths(path: str | Path, formats: Sequence[str]) -> list[Path]:
    """``fig.pdf`` for ``pdf`` from ``fig`` or ``fig.pdf`` (or ``fig.png``); a path's own suffix is kept when it
    names the format (``FIG.PDF`` stays as it is)."""
    path = Path(path)
    suffix = path.suffix.lower()
    out = []
    for fmt in formats:
        if suffix == f".{fmt}":
            out.append(path)
        elif suffix[1:] in FORMATS:
            out.append(path.with_suffix(f".{fmt}"))
        else:
            out.append(path.with_name(f"{path.name}.{fmt}"))
    return out


def usual_mode(mode: int = 0o666) -> int:
    """``mode`` less the process umask: what ``open()`` would give a new file (0o777 for a folder)."""
    mask = os.umask(0)
    os.umask(mask)
    return mode & ~mask


def set_usual_mode(path: Path, mode: int = 0o666) -> None:
    """mkdtemp and mkstemp make private (0700, 0600) paths; an output gets the usual ones."""
    path.chmod(usual_mode(mode))


def write_atomically(path: str | Path, data: bytes | str) -> None:
    """Write ``data`` to ``path`` through a temporary file beside it, renamed into place (``str`` as UTF-8, newlines
    as given): an error leaves the old file or none. Raises ``OSError``."""
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data.encode("utf-8") if isinstance(data, str) else data)
        set_usual_mode(Path(temporary))
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _write_figure(path: Path, data: bytes) -> None:
    try:
        write_atomically(path, data)
    except OSError as exc:
        raise RankscopeError(f"{path}: cannot write ({exc.strerror or exc})") from exc


def save_figure(fig: Figure, path: str | Path, formats: Sequence[str] = ("pdf", "png")) -> list[Path]:
    """Write ``fig`` once per format beside ``path`` (``out/spectrum`` → ``out/spectrum.pdf``, ``.png``) and return
    the paths written. All formats are rendered before any file is written."""
    formats = [f.lower().lstrip(".") for f in formats]
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ValueError(f"figure formats must be among {', '.join(FORMATS)}, got {list(formats)}")
    return write_rendered(path, {fmt: figure_bytes(fig, fmt) for fmt in formats})


def write_rendered(path: str | Path, rendered: dict[str, bytes]) -> list[Path]:
    """Write each ``format → bytes`` of ``rendered`` beside ``path`` as :func:`save_figure` names them."""
    targets = output_paths(path, list(rendered))
    for target, data in zip(targets, rendered.values(), strict=True):
        _write_figure(target, data)
    return targets


def page_and_files(fig: Figure, formats: Sequence[str]) -> tuple[str, dict[str, bytes]]:
    """The figure as inline SVG and as the bytes of each of ``formats``. The SVG draw solves the constrained
    layout; the files reuse its positions instead of solving it again per format (a third of each later save)."""
    svg = svg_text(fig)
    fig.set_layout_engine("none")
    return svg, {fmt: figure_bytes(fig, fmt) for fmt in formats}


__all__ = [
    "FORMATS",
    "figure_bytes",
    "output_paths",
    "page_and_files",
    "save_figure",
    "set_usual_mode",
    "svg_text",
    "write_atomically",
    "write_rendered",
]
