"""Axes and layout helpers the figure modules share: new figures and facet grids, legends above the panels, guide
lines, tick formats, series styles. They arrange what ``_common`` picks from the records; matplotlib is imported
inside the functions only."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ._common import LEGEND_ROW, MAX_MARKED_POINTS, FigureInputError, ellipsize
from .style import GUIDE_COLOR, figure_size, marked_points, series_style

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


# -- layout -----------------------------------------------------------------------------------------------
def new_figure(width: str | float, aspect: float) -> Figure:
    """A figure of the given width (column, full, inches) and height = width × aspect, constrained layout."""
    from matplotlib.figure import Figure

    return Figure(figsize=figure_size(width, aspect), layout="constrained")


def facet_grid(count: int, width: str | float) -> tuple[int, int]:
    """(rows, columns) for ``count`` small panels: about 1 in per panel across (3 in a column, 6 at full width)."""
    from .style import figure_width

    most = max(1, min(count, int(figure_width(width) // 1.05)))
    rows = math.ceil(count / most)
    return rows, math.ceil(count / rows)  # balanced: 7 panels in 4 + 3, not 6 + 1


CHAR_INCHES = 0.055 / 7  # inches per point of font size: a DejaVu Sans character of a name, with room to spare


def fitting_chars(inches: float, fontsize: float = 7.0) -> int:
    """How many characters of ``fontsize``-pt text fit in ``inches`` (at least 8): the limit to ``ellipsize`` a
    name to."""
    return max(8, int(inches / (CHAR_INCHES * fontsize)))


def facet_title(ax: Axes, title: str, width: str | float, count: int) -> None:
    """A small panel's title (one of ``count`` in a ``facet_grid`` of ``width``), ellipsized to the panel's width:
    long module types would run into the neighbouring panels' titles."""
    from .style import TEXT_SIZE, figure_width

    _, columns = facet_grid(count, width)
    inches = (figure_width(width) - 0.35) / columns - 0.1  # the y label and tick labels, a gap between panels
    ax.set_title(ellipsize(title, fitting_chars(inches, TEXT_SIZE)))


def facets(fig: Figure, count: int, width, *, sharey: bool = True) -> list[Axes]:
    """``count`` small panels in a balanced grid (``facet_grid``), empty slots hidden, shared axes."""
    rows, columns = facet_grid(count, width)
    grid = fig.subplots(rows, columns, sharex=True, sharey=sharey, squeeze=False)
    axes = [ax for row in grid for ax in row]
    for ax in axes[count:]:
        ax.set_visible(False)
    for i, ax in enumerate(axes[:count]):
        # x tick labels on the lowest panel of each column (sharex hides them above an empty slot too)
        ax.tick_params(labelbottom=i + columns >= count, labelleft=i % columns == 0)
    return axes[:count]


def legend_above(
    fig: Figure,
    handles: list,
    labels: list[str],
    *,
    title: str | None = None,
    wide: bool = False,
    axes: Sequence[Axes] | None = None,
):
    """One legend for the whole figure, outside the panels (never over the data), and returns it.

    On a figure of its own, the legend goes above the panels in as many columns as the width holds, and the
    figure grows by the legend's extra rows so that a dozen entries do not squash the panels. Drawn into the
    caller's ``axes``, whose figure's size and layout are the caller's, it goes beside the top-right panel.
    """
    if not handles:
        return None
    extra = {}
    if wide:  # (swatch, line) pairs side by side: the bar's hatch and the line's marker and dashes
        from matplotlib.legend_handler import HandlerTuple

        extra = {"handler_map": {tuple: HandlerTuple(ndivide=None, pad=0.4)}, "handlelength": 4.0}
    if axes is not None:
        from matplotlib.transforms import ScaledTranslation

        corner = max(axes, key=lambda a: (round(a.get_position().x1, 3), round(a.get_position().y1, 3)))
        columns = math.ceil(len(labels) / 16)
        # 24 pt right of the edge: room for labels drawn beside it (energy levels, guide_hline side="outside")
        beside = corner.transAxes + ScaledTranslation(24 / 72, 0, fig.dpi_scale_trans)
        return corner.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.0, 1.0), bbox_transform=beside,
                             borderaxespad=0.0, ncols=columns, title=title, **extra)  # fmt: skip
    from .style import figure_width

    width = figure_width(fig.get_figwidth())
    handle = 0.6 if wide else 0.45  # inches: a handle and the spacing around it
    # a label wider than the figure is ellipsized (as heatmap rows), not run off the edge
    labels = [ellipsize(label, fitting_chars(width - handle)) for label in labels]
    longest = max(len(label) for label in labels)
    per_entry = handle + CHAR_INCHES * 7 * longest  # inches: handle, spacing and 7 pt text
    columns = max(1, min(len(labels), int(width // per_entry)))
    rows = math.ceil(len(labels) / columns) + (1 if title else 0)
    fig.set_figheight(fig.get_figheight() + LEGEND_ROW * max(0, rows - 1))  # the usual height holds one row
    return fig.legend(handles, labels, loc="outside upper center", ncols=columns, title=title, **extra)


def axes_given(ax) -> list[Axes] | None:
    """The caller's ``ax=`` as a list (one Axes, or a sequence or array of them); None: make a figure."""
    if ax is None:
        return None
    if hasattr(ax, "plot"):
        return [ax]
    import numpy as np

    axes = list(np.ravel(np.asarray(ax, dtype=object)))
    if not axes or not all(hasattr(a, "plot") for a in axes):
        raise FigureInputError("ax must be a matplotlib Axes or a sequence of them")
    return axes


def check_axes(axes: list[Axes], count: int, what: str) -> list[Axes]:
    """The caller's axes, one per panel the figure draws."""
    if len(axes) != count:
        raise FigureInputError(f"{what} draws {count} panel{'s' if count != 1 else ''} here; ax= gave {len(axes)} axes")
    return axes


def root_figure(ax: Axes) -> Figure:
    """The Figure an Axes is drawn in (the top one, when the axes sit in a SubFigure)."""
    fig = ax.figure
    while getattr(fig, "figure", fig) is not fig:
        fig = fig.figure
    return fig


_SUPERSCRIPT = str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹")


def decade_label(value: float, _position=None) -> str:
    """A log axis' tick label as plain text — ``10⁻³`` for a power of ten, else ``0.02`` — instead of
    matplotlib's mathtext (``$10^{-3}$``), whose parsing was a quarter of drawing a spectrum figure."""
    if not value > 0:
        return ""
    exponent = math.log10(value)
    if abs(exponent - round(exponent)) < 1e-9:
        power = round(exponent)
        return {0: "1", 1: "10"}.get(power, "10" + str(power).translate(_SUPERSCRIPT))
    return f"{value:g}"


def plain_log_axis(axis) -> None:
    """A log-scaled axis labelled by :func:`decade_label`: the decades, and the minor ticks where fewer than two
    decades are in view (as matplotlib's own formatter does). Over more decades the unlabelled minor ticks are
    left out: each is a tick object with lines and a text measured by every layout pass and draw, half of a
    spectrum panel's drawing time (issue 15)."""
    from matplotlib.ticker import FuncFormatter, NullLocator

    low, high = sorted(axis.get_view_interval())
    axis.set_major_formatter(FuncFormatter(decade_label))
    if low > 0 and math.log10(high / low) < 2:
        axis.set_minor_formatter(FuncFormatter(decade_label))
    else:
        axis.set_minor_locator(NullLocator())


def integer_ticks(axis, count: int, *, start: int = 1, most: int = 8) -> None:
    """Ticks at whole numbers from ``start`` to ``count`` (1, 8, 16, … for long ranges), at most ``most``."""
    span = count - start + 1
    if span <= most:
        ticks = list(range(start, count + 1))
    else:
        step = next(s for s in (2, 4, 5, 8, 10, 16, 20, 25, 32, 50, 64, 100, 128, 200, 256, 500, 1000, 10**9)
                    if span / s <= most - 1)  # fmt: skip
        ticks = [start] + [t for t in range(step, count + 1, step) if t > start]
    axis.set_ticks(ticks)
    axis.set_ticks([], minor=True)


def guide_hline(ax: Axes, y: float, text: str, *, side: str = "right", above: bool = True):
    """A thin dashed reference line across the panel, labelled at one end (``side``: left, right, or outside the
    right edge) unless ``text`` is empty (thresholds τ, energy levels); returns the line (a legend handle where
    the label would not fit)."""
    line = ax.axhline(y, color=GUIDE_COLOR, linewidth=0.6, linestyle=(0, (3, 2)), zorder=1)
    if not text:
        return line
    if side == "outside":  # beside the right edge, centred on the line, like a tick label
        x, offset, ha, va = 1.0, (2.0, 0.0), "left", "center"
    else:
        x, offset, ha, va = (
            (0.99 if side == "right" else 0.01),
            (0, 1.5 if above else -1.5),
            side,
            "bottom" if above else "top",
        )
    ax.annotate(
        text,
        xy=(x, y),
        xycoords=("axes fraction", "data"),
        xytext=offset,
        textcoords="offset points",
        ha=ha,
        va=va,
        fontsize=7,
        color=GUIDE_COLOR,
    )
    return line


def guide_vline(ax: Axes, x: float, text: str):
    """A thin dotted vertical reference line labelled at the top unless ``text`` is empty (rank bounds)."""
    line = ax.axvline(x, color=GUIDE_COLOR, linewidth=0.6, linestyle=(0, (1, 1.5)), zorder=1)
    if not text:
        return line
    ax.annotate(
        text,
        xy=(x, 1.0),
        xycoords=("data", "axes fraction"),
        xytext=(-1.5, -1),
        textcoords="offset points",
        ha="right",
        va="top",
        fontsize=7,
        color=GUIDE_COLOR,
    )
    return line


def empty_note(ax: Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", fontsize=7, color=GUIDE_COLOR)


def style_for(index: int, points: int) -> dict:
    """The ``index``-th series' style for a line of ``points`` points: its marker on every point when few, on
    evenly spaced ones when many (the HTML's plots mark the same points: ``style.marked_points``)."""
    style = series_style(index)
    if points > MAX_MARKED_POINTS:
        style["markevery"] = marked_points(points, MAX_MARKED_POINTS)
    return style
