"""Writing outputs: all or nothing (a temporary file renamed into place), ``-`` for stdout."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path


def write_text(destination: str | Path, text: str) -> None:
    """Write ``text`` to ``destination`` atomically, or to stdout when it is ``-``."""
    if str(destination) == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    path = Path(destination)
    directory = path.parent if str(path.parent) else Path(".")
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp makes private files; outputs get the usual mode
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current
