"""TrueType embedding in PDFs without a font subset computed per figure.

matplotlib embeds each PDF's fonts as TrueType (``pdf.fonttype`` 42) subset by fontTools to the glyphs that
figure uses; parsing and subsetting DejaVu Sans takes ~0.3 s a PDF, more than drawing the figure. Inside
:func:`shared_subsets` every PDF instead embeds one subset per font of a fixed character set (what rankscope's
figures write: ASCII, Greek, sub- and superscripts, the few symbols) together with the figure's own glyphs —
computed once per process and reused. The embedded font holds a few more glyphs than the figure needs; the PDF
still holds /FontFile2 and the same text, and the same figure still gives the same bytes (the set depends only on
the figure's glyphs, never on what was drawn before). Outside the context matplotlib is unchanged.
"""

from __future__ import annotations

import contextlib
import io
import re
import string
import threading
from collections.abc import Iterator

# every superscript digit (log-axis labels: 10⁻⁴) and the Latin ligatures text shaping substitutes ("effective"
# is drawn with ﬀ): a glyph outside the set costs a subset of its own (~0.3 s), once per distinct figure glyph set
COMMON = string.printable.strip() + " αβγδεθκλμνπρστφχψωΔΣΦΨΩ‖·×÷−±≈≤≥→←…—–’“”°⁰¹²³⁴⁵⁶⁷⁸⁹ⁱ⁻⁺₀₁₂₃₄₅₆₇₈₉ᵢⱼₖ√∞∑ﬀﬁﬂﬃﬄ"
_CACHE: dict[tuple, tuple[bytes, dict]] = {}
_COMMON_GLYPHS: dict[tuple, frozenset[int]] = {}
_LOCK = threading.Lock()  # the patch is process-wide while held: one PDF save at a time swaps it


class _SavedFont:
    """What matplotlib's ``font_as_file`` and ``with subset.font`` need of a fontTools font: saved bytes."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def save(self, handle: io.BytesIO, reorderTables: bool = False) -> None:
        handle.write(self.data)

    def __enter__(self) -> _SavedFont:
        return self

    def __exit__(self, *exc) -> None:
        return None


class _Subset:
    def __init__(self, data: bytes, glyph_index_map: dict) -> None:
        self.font = _SavedFont(data)
        self.glyph_index_map = glyph_index_map


def _key(fontfile) -> tuple:
    return (str(fontfile), getattr(fontfile, "face_index", 0))


def _common_glyphs(fontfile) -> frozenset[int]:
    key = _key(fontfile)
    if key not in _COMMON_GLYPHS:
        from matplotlib.font_manager import get_font

        font = get_font(fontfile)
        _COMMON_GLYPHS[key] = frozenset(g for g in (font.get_char_index(ord(c)) for c in COMMON) if g)
    return _COMMON_GLYPHS[key]


@contextlib.contextmanager
def shared_subsets() -> Iterator[None]:
    """Within this context, PDF saves embed the cached subsets (see the module docstring). A matplotlib without
    the private hook this uses (``backends._backend_pdf_ps.get_glyphs_subset``) is left as it is."""
    import matplotlib

    # the hook's signature (glyph indices in, a context manager out) is matplotlib 3.11's; older ones take
    # characters and return a font, so they keep their own subsetting
    if tuple(int(p) for p in re.findall(r"\d+", matplotlib.__version__)[:2]) < (3, 11):
        yield
        return
    try:
        from matplotlib.backends import _backend_pdf_ps as hook
    except ImportError:  # pragma: no cover - a matplotlib without the module: plain subsetting
        yield
        return
    original = getattr(hook, "get_glyphs_subset", None)
    if original is None:  # pragma: no cover
        yield
        return

    @contextlib.contextmanager
    def cached(fontfile, glyphs):
        wanted = frozenset(int(g) for g in glyphs) | _common_glyphs(fontfile)
        key = (*_key(fontfile), wanted)
        if key not in _CACHE:
            if len(_CACHE) >= 64:  # figures with unusual glyphs (labels in other scripts): keep it bounded
                _CACHE.clear()
            with original(fontfile, set(wanted)) as result:
                handle = io.BytesIO()
                result.font.save(handle, reorderTables=False)
                _CACHE[key] = (handle.getvalue(), dict(result.glyph_index_map))
        data, mapping = _CACHE[key]
        yield _Subset(data, mapping)

    with _LOCK:
        hook.get_glyphs_subset = cached
        try:
            yield
        finally:
            hook.get_glyphs_subset = original


__all__ = ["COMMON", "shared_subsets"]
