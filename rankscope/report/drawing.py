"""A report's figures drawn: each slot's figure as inline SVG and as the bytes of its files.

Three ways, the same bytes: one process draws them in turn; :func:`~rankscope.core.forked.forked_map` shares
them with helpers forked once the analysis is done (``processes``); or helpers forked before the analysis
(:class:`~rankscope.core.forked.ForkedHelpers`, what ``rankscope report`` starts) have imported matplotlib and
laid out their fonts (:func:`prepare_to_draw`) while this process analysed on one core, and are sent the slots
and the analyses' records (:func:`for_drawing`: the checkpoints' tensors stay here) — this process meanwhile
writes the tables. The only mathematics a figure needs beyond the records, the subspace-similarity grids, is
done here first (:func:`similarity_grids`).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from ..core.errors import RankscopeError
from .model import FigureSpec

if TYPE_CHECKING:
    from ..analysis.records import Analysis
    from ..core.forked import ForkedHelpers

logger = logging.getLogger(__name__)

Drawn = tuple[dict[str, str], list[str]]  # (inline SVG by slot id, warnings of figures left out)


def _figure(slot: FigureSpec, analyses: Sequence[Analysis], labels: Sequence[str], grids: Mapping | None = None):
    """Draw one slot with rankscope.figures (None when there is nothing to draw); ``grids``: the φ grids of
    subspace-similarity slots by slot id, as :func:`similarity_grids` computes them (else computed here)."""
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
        grid = grids[slot.id] if grids is not None and slot.id in grids else _similarity_grid(slot, analyses)
        if isinstance(grid, Exception):
            raise grid
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


def _similarity_grid(slot: FigureSpec, analyses: Sequence[Analysis]):
    from ..measures.components import subspace_similarity_grid

    updates = [next(layer.update for layer in a.checkpoint.layers if layer.name == slot.layer) for a in analyses[:2]]
    return subspace_similarity_grid(*updates, side="right").numpy()  # float64 on the CPU; sent without torch


def similarity_grids(slots: Sequence[FigureSpec], analyses: Sequence[Analysis]) -> dict[str, object]:
    """The φ grid of each subspace-similarity slot, by slot id (what :func:`_figure` cannot take from records);
    where computing one raised, the exception, which drawing the slot raises (its warning says so)."""
    grids: dict[str, object] = {}
    for slot in slots:
        if slot.kind == "subspace-similarity":
            try:
                grids[slot.id] = _similarity_grid(slot, analyses)
            except Exception as exc:  # the figure's problem, reported as _render_slot reports any
                grids[slot.id] = exc
    return grids


def for_drawing(analysis: Analysis) -> Analysis:
    """``analysis`` without its checkpoint's layers and base weights: what the figures read (records, path,
    adapter type), small enough to send to another process."""
    return replace(analysis, checkpoint=replace(analysis.checkpoint, layers=[], base=None))


def _render_slot(
    slot: FigureSpec, analyses: Sequence[Analysis], labels: Sequence[str], formats: Sequence[str],
    grids: Mapping | None = None,
) -> tuple[str | None, dict[str, bytes], str | None]:  # fmt: skip
    """One slot's (inline SVG, files' bytes by format, warning): (None, {}, None) when there is nothing to draw,
    (None, {}, warning) when it could not be drawn."""
    from ..figures.output import page_and_files

    try:
        fig = _figure(slot, analyses, labels, grids)
        if fig is None:
            return None, {}, None
        svg, files = page_and_files(fig, formats)
        return svg, files, None
    except RankscopeError as exc:
        return None, {}, f"figure {slot.id} left out: {exc}"
    except Exception as exc:  # a drawing bug costs one figure, not the report; the warning says so
        logger.debug("figure %s failed", slot.id, exc_info=True)
        return None, {}, f"figure {slot.id} left out: {type(exc).__name__}: {exc}"


def _render_at(slots, analyses, labels, formats, grids, index: int):
    """:func:`_render_slot` of ``slots[index]``: module level, so that helpers can be sent it pickled."""
    return _render_slot(slots[index], analyses, labels, formats, grids)


def prepare_to_draw() -> None:
    """What a process pays before its first figure, paid ahead: matplotlib's modules and rankscope.figures
    imported, one small figure drawn as SVG and PDF (fonts found and loaded, the PDF font subset computed)."""
    from .. import figures  # noqa: F401 - every figure module, as the pieces will use them
    from ..figures._axes import new_figure
    from ..figures.output import page_and_files

    fig = new_figure("column", 0.5)
    ax = fig.subplots()
    ax.plot([1, 2, 3], [3, 1, 2], label="σ₁ ≈ 0.5")
    ax.set(title="effective rank", xlabel="index i", ylabel="σ_i")
    ax.legend(title="median of 2 layers")
    page_and_files(fig, ("pdf",))


def start_drawing(
    analyses: Sequence[Analysis],
    labels: Sequence[str],
    slots: Sequence[FigureSpec],
    folder: Path | None,
    formats: Sequence[str],
    *,
    processes: int = 1,
    helpers: ForkedHelpers | None = None,
) -> Callable[[Callable[[int, int], None] | None], Drawn]:
    """Start drawing ``slots``; returns ``finish(progress)``, which waits for them, writes each figure's files
    as ``folder/<id>.<fmt>`` and returns (inline SVGs, warnings). With ``helpers`` (prepared, not yet started)
    they draw while the caller goes on; else everything happens in ``finish``, by ``processes`` processes."""
    from ..core.forked import forked_map
    from ..figures.output import write_rendered

    formats = tuple(formats) if folder is not None else ()
    grids = similarity_grids(slots, analyses)
    results = None
    if helpers is not None:
        work = functools.partial(_render_at, list(slots), [for_drawing(a) for a in analyses], list(labels), formats,
                                 grids)  # fmt: skip
        try:
            helpers.start(work, len(slots))
            results = helpers.results
        except Exception:  # something in the records will not pickle (PicklingError, TypeError, RecursionError, …)
            logger.debug("figures drawn here: the work could not be sent", exc_info=True)
            helpers.close()

    def finish(progress: Callable[[int, int], None] | None = None) -> Drawn:
        done = None if progress is None else lambda finished: progress(finished, len(slots))
        if results is not None:
            drawn = results(done)
        else:
            if processes > 1:  # imported once, before the helpers fork, rather than once in each
                import matplotlib.backends.backend_pdf
                import matplotlib.backends.backend_svg  # noqa: F401

                from .. import figures  # noqa: F401
            drawn = forked_map(lambda index: _render_slot(slots[index], analyses, labels, formats, grids),
                               len(slots), processes=processes, done=done)  # fmt: skip
        svgs, warnings = {}, []
        for slot, (svg, files, warning) in zip(slots, drawn, strict=True):
            if warning is not None:
                warnings.append(warning)
            elif svg is not None:
                svgs[slot.id] = svg
                if files:
                    write_rendered(folder / slot.id, files)
        return svgs, warnings

    return finish


def render_figures(
    analyses: Sequence[Analysis],
    labels: Sequence[str],
    slots: Sequence[FigureSpec],
    folder: Path | None,
    formats: Sequence[str],
    *,
    progress: Callable[[int, int], None] | None = None,
    processes: int = 1,
) -> Drawn:
    """Each slot's figure as inline SVG (and saved as ``folder/<id>.<fmt>``); plus a warning per figure that
    could not be drawn — the report goes on without it. ``processes`` > 1 draws them in that many processes
    (:func:`~rankscope.core.forked.forked_map`: this one and forked helpers; the same bytes as one process)."""
    return start_drawing(analyses, labels, slots, folder, formats, processes=processes)(progress)


__all__ = ["for_drawing", "prepare_to_draw", "render_figures", "similarity_grids", "start_drawing"]
