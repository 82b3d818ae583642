"""A figure of one panel: the caller's single Axes (``ax=``) or a new figure holding one."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._axes import axes_given, check_axes, new_figure, root_figure

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


def one_axes(ax, width: str | float, aspect: float, what: str) -> tuple[Figure, Axes]:
    """(figure, axes) to draw ``what`` into: ``ax`` and its root figure when given (exactly one Axes), else a new
    figure of ``width`` × ``width·aspect`` with one panel."""
    given = axes_given(ax)
    if given is not None:
        (axes,) = check_axes(given, 1, what)
        return root_figure(axes), axes
    fig = new_figure(width, aspect)
    return fig, fig.subplots()
