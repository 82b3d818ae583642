"""Writing outputs: all or nothing (a temporary file renamed into place), ``-`` for stdout, the usual permissions."""

from __future__ import annotations

import sys
from pathlib import Path

from ..figures.output import set_usual_mode, usual_mode, write_atomically


def write_text(destination: str | Path, text: str) -> None:
    """Write ``text`` to ``destination`` atomically, or to stdout when it is ``-``."""
    if str(destination) == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    write_atomically(destination, text)


__all__ = ["set_usual_mode", "usual_mode", "write_atomically", "write_text"]
