"""Figures drawn for a page (the run report, the sweep report): each as inline SVG, and as files under
``figures/`` of the staging folder."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .model import FigureSpec


def inline_and_save(drawn: Sequence[tuple[FigureSpec, object]], folder: Path, formats: Sequence[str]) -> dict[str, str]:
    """``{spec.id: inline SVG}`` of each drawn figure; with ``formats``, each also saved as
    ``folder/figures/<id>.<fmt>`` (the folder made only when there is a figure to put in it)."""
    from ..figures.output import save_figure, svg_text

    svgs = {}
    for spec, fig in drawn:
        svgs[spec.id] = svg_text(fig)
        # the SVG draw ran the constrained layout; the files reuse its positions instead of solving it again per
        # format (as report/bundle.py's render_figures does)
        fig.set_layout_engine("none")
    if formats and drawn:
        (folder / "figures").mkdir()
        for spec, fig in drawn:
            save_figure(fig, folder / "figures" / spec.id, formats)
    return svgs
