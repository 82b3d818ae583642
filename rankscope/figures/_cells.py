"""Cell values of a heatmap as one artist.

A heatmap's values were one ``Text`` artist per cell: a figure of eleven checkpoints held ~400, and each Text
lays itself out anew on every layout pass and draw (font lookup, line metrics, bounding box), half of drawing a
heatmap (issue 15). :class:`CellLabels` draws the same strings, centred in their cells as ``Text(ha="center",
va="center")`` centres them, measuring each distinct string once per renderer. It sits inside its Axes, so it
takes no part in the layout.
"""

from __future__ import annotations

from collections.abc import Sequence

from matplotlib.artist import Artist


class CellLabels(Artist):
    """``texts[i]`` centred at data point (``xs[i]``, ``ys[i]``) in ``colors[i]``, at ``fontsize`` points.

    Vertical centring is Text's: the box is the font's line (its ascender and descender, or the string's own
    extent where larger), centred on the point; the baseline sits at the box's bottom plus its descent."""

    zorder = 3  # as Text

    def __init__(self, xs: Sequence[float], ys: Sequence[float], texts: Sequence[str], colors: Sequence,
                 *, fontsize: float, transform) -> None:  # fmt: skip
        super().__init__()
        from matplotlib.font_manager import FontProperties

        if not len(xs) == len(ys) == len(texts) == len(colors):
            raise ValueError("CellLabels needs one x, y, text and colour per label")
        self.xs, self.ys, self.texts, self.colors = list(xs), list(ys), list(texts), list(colors)
        self.prop = FontProperties(size=fontsize)  # the rcParams' family, as a Text made now would have
        self.set_transform(transform)
        self.set_in_layout(False)

    def _line_metrics(self, dpi: float) -> tuple[float, float]:
        """The font's ascent and descent in pixels, from its OS/2 or hhea table, as ``Text._get_layout`` reads them."""
        from matplotlib.font_manager import findfont, get_font

        font = get_font(findfont(self.prop))
        scale = self.prop.get_size_in_points() * dpi / 72 / font.get_sfnt_table("head")["unitsPerEm"]
        for table_name, ascent_key, descent_key in (("OS/2", "sTypoAscender", "sTypoDescender"),
                                                    ("hhea", "ascent", "descent")):  # fmt: skip
            table = font.get_sfnt_table(table_name)
            if table is not None:
                return table[ascent_key] * scale, -table[descent_key] * scale
        return 0.0, 0.0

    def draw(self, renderer) -> None:
        if not self.get_visible() or not self.texts:
            return
        import matplotlib
        import numpy as np

        dpi = self.get_figure(root=True).dpi
        line_ascent, line_descent = self._line_metrics(dpi)
        points = self.get_transform().transform(np.column_stack([self.xs, self.ys]))
        flip = renderer.get_canvas_width_height()[1] if renderer.flipy() else None  # as Text.draw: top-down y
        sizes: dict[str, tuple[float, float, float]] = {}
        renderer.open_group("text", self.get_gid())
        gc = renderer.new_gc()
        gc.set_alpha(self.get_alpha())
        gc.set_url(self.get_url())
        gc.set_antialiased(matplotlib.rcParams["text.antialiased"])
        self._set_gc_clip(gc)
        for (x, y), text, color in zip(points, self.texts, self.colors, strict=True):
            if text not in sizes:
                sizes[text] = renderer.get_text_width_height_descent(text, self.prop, ismath=False)
            width, height, descent = sizes[text]
            ascent, descent = max(height - descent, line_ascent), max(descent, line_descent)
            gc.set_foreground(color)
            baseline = y - (ascent + descent) / 2 + descent
            if flip is not None:
                baseline = flip - baseline
            renderer.draw_text(gc, x - width / 2, baseline, text, self.prop, 0.0, ismath=False)
        gc.restore()
        renderer.close_group("text")
        self.stale = False
