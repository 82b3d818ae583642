"""Text layouts measured once per save instead of at every layout pass and draw.

matplotlib lays out a text artist (``Text._get_layout``: font lookup, the font's height tables, each line's
metrics) each time it is measured — every tick label once per constrained-layout pass, again for the tight
bounding boxes and again when drawn — without keeping the result. Inside :func:`shared_layouts` a layout is kept
for the rest of the save, keyed by what it depends on: the renderer, the dpi, the string, the font properties,
rotation, alignments and line spacing. A wrapped text (whose lines depend on where it stands) is always laid out
anew. The layout is what matplotlib computes; the same figure gives the same bytes (tested).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

_LOCK = threading.RLock()  # the patch is process-wide while held: one save at a time (a nested one inside it)


def _key(text, renderer) -> tuple | None:
    if text.get_wrap():
        return None
    props = text._fontproperties
    font = (tuple(props.get_family()), props.get_style(), props.get_variant(), props.get_weight(),
            props.get_stretch(), props.get_size_in_points(), props.get_file(), props.get_math_fontfamily())  # fmt: skip
    return (id(renderer), text.get_figure(root=True).dpi, text.get_text(), font, text.get_rotation(),
            text.get_rotation_mode(), text._horizontalalignment, text._verticalalignment, text._get_multialignment(),
            text._linespacing, text.get_usetex(), text._parse_math)  # fmt: skip


@contextlib.contextmanager
def shared_layouts() -> Iterator[None]:
    """Within this context every text layout is computed once per distinct key (see the module docstring)."""
    from matplotlib.text import Text

    original = Text.__dict__.get("_get_layout")
    if original is None:  # pragma: no cover - a matplotlib without the method: nothing to share
        yield
        return
    layouts: dict[tuple, tuple] = {}
    renderers = []  # held until the save ends, so that no renderer's id is reused for another within it

    def get_layout(self, renderer):
        try:
            key = _key(self, renderer)
        except (AttributeError, TypeError):  # pragma: no cover - another matplotlib's attributes: lay out as usual
            key = None
        if key is None:
            return original(self, renderer)
        found = layouts.get(key)
        if found is None:
            renderers.append(renderer)
            found = layouts[key] = original(self, renderer)
        bbox, lines, descent = found
        return bbox.frozen(), lines, descent

    with _LOCK:
        Text._get_layout = get_layout
        try:
            yield
        finally:
            Text._get_layout = original


__all__ = ["shared_layouts"]
