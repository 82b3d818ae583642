"""Figures drawn for a page (the run report, the sweep report): each as inline SVG, and as files under
``figures/`` of the staging folder."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .model import FigureSpec


def inline_and_save(drawn: Sequence[tuple[FigureSpec, object]], folder: Path, formats: Sequence[str]) -> dict[str, str]:
    """``{spec.id: inline SVG}`` of each drawn figure; with ``formats``, each also saved as
    ``folder/figures/<id>.<fmt>`` (the folder made only when there is a figure to put in it)."""
    from ..figures.output import page_and_files, write_rendered

    svgs, rendered = {}, {}
    for spec, fig in drawn:
        svgs[spec.id], rendered[spec.id] = page_and_files(fig, formats)
    if formats and drawn:
        (folder / "figures").mkdir()
        for spec, _ in drawn:
            write_rendered(folder / "figures" / spec.id, rendered[spec.id])
    return svgs
