"""TrueType embedding in PDFs without a font subset computed per figure.

matplotlib embeds each PDF's fonts as TrueType (``pdf.fonttype`` 42) subset by fontTools to the glyphs that
figure uses; parsing and subsetting DejaVu Sans takes ~0.3 s a PDF, more than drawing the figure. Inside
:func:`shared_subsets` every PDF instead embeds one subset per font of a fixed character set (what rankscope's
figures write: ASCII, Greek, sub- and superscripts, the few symbols) together with the figure's own glyphs —
computed once per process and reused. The embedded font holds a few more glyphs than the figure needs; the PDF
still holds /FontFile2 and the same text, and the same figure still gives the same bytes (the set depends only on
the figure's glyphs, never on what was drawn before). Outside the context matplotlib is unchanged.

A subset is also kept on disk, beside matplotlib's own font cache (``matplotlib.get_cachedir()``), so that the next
process (the next ``rankscope report``) reads it instead of subsetting again (~0.26 s): one file per font file,
its size and modification time, the glyph set and the matplotlib and fontTools versions, checked by a SHA-256 of
its bytes and glyph map when read. A file that is missing, unreadable or fails the check is recomputed and
rewritten; a cache folder that cannot be written costs only the time.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import string
import threading
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

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


_MAGIC = b"rankscope font subset 1\n"
_STORED = 32  # subsets kept on disk (~40 KB each); the oldest go first


def store_folder() -> Path:
    """Where subsets are kept between processes: beside matplotlib's font cache."""
    import matplotlib

    return Path(matplotlib.get_cachedir()) / "rankscope-font-subsets"


def _stored_path(fontfile, wanted: frozenset[int]) -> Path | None:
    import fontTools
    import matplotlib

    try:
        stat = os.stat(str(fontfile))
    except OSError:
        return None
    identity = [matplotlib.__version__, fontTools.version, *_key(fontfile), stat.st_size, stat.st_mtime_ns,
                sorted(wanted)]  # fmt: skip
    digest = hashlib.sha256(json.dumps(identity, default=str).encode()).hexdigest()
    return store_folder() / f"{digest}.bin"


def _read_stored(path: Path | None) -> tuple[bytes, dict] | None:
    """A stored subset's (font bytes, glyph index map), or None where there is none that passes the check."""
    if path is None:
        return None
    try:
        blob = path.read_bytes()
        head, _, rest = blob[len(_MAGIC) :].partition(b"\n")
        header = json.loads(head)
        if not blob.startswith(_MAGIC) or _digest(header["map"], rest) != header["sha256"]:
            return None
        return rest, {int(old): int(new) for old, new in header["map"]}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _digest(pairs: list, data: bytes) -> str:
    """SHA-256 of the glyph index map and the font bytes together: a damaged map fails the check too."""
    return hashlib.sha256(json.dumps(pairs).encode() + b"\n" + data).hexdigest()


def _store(path: Path | None, data: bytes, mapping: dict) -> None:
    if path is None:
        return
    from .output import write_atomically

    pairs = [list(pair) for pair in sorted(mapping.items())]
    header = json.dumps({"sha256": _digest(pairs, data), "map": pairs})
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = sorted(path.parent.glob("*.bin"), key=lambda p: p.stat().st_mtime_ns)
        for old in kept[: max(0, len(kept) - _STORED + 1)]:  # bounded: unusual glyph sets come and go
            old.unlink(missing_ok=True)
        write_atomically(path, _MAGIC + header.encode() + b"\n" + data)
    except (OSError, TypeError, ValueError):  # a cache folder we cannot write: subset again next time
        logger.debug("font subset not stored at %s", path, exc_info=True)


def _subset(original, fontfile, wanted: frozenset[int]) -> tuple[bytes, dict]:
    """The subset's bytes and glyph index map: from the disk where stored, else computed (and stored)."""
    path = _stored_path(fontfile, wanted)
    stored = _read_stored(path)
    if stored is not None:
        return stored
    with original(fontfile, set(wanted)) as result:
        handle = io.BytesIO()
        result.font.save(handle, reorderTables=False)
        data, mapping = handle.getvalue(), dict(result.glyph_index_map)
    _store(path, data, mapping)
    return data, mapping


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
            _CACHE[key] = _subset(original, fontfile, wanted)
        data, mapping = _CACHE[key]
        yield _Subset(data, mapping)

    with _LOCK:
        hook.get_glyphs_subset = cached
        try:
            yield
        finally:
            hook.get_glyphs_subset = original


__all__ = ["COMMON", "shared_subsets"]
