"""Progress on stderr for work that takes more than a moment (nothing when stderr is not a terminal).

:class:`Progress` is one status line over the phases of a command ("loading b (2/3)", "analysing b (2/3)",
"comparing", "figures", "writing"): each phase is shown as it starts, with a bar once it reports steps.
:class:`ProgressBar` is a single phase's bar. Both are also the place a caller's ``check`` runs at every step
(the CLI's Ctrl-C check), whether or not anything is drawn.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

_WIDTH = 30


class ProgressBar:
    """Call with (done, total); draws only after ``delay`` seconds and only on a terminal."""

    def __init__(
        self,
        label: str,
        *,
        stream: TextIO | None = None,
        delay: float = 0.5,
        enabled: bool = True,
        check: Callable[[], None] | None = None,
    ) -> None:
        self.label = label
        self.stream = stream or sys.stderr
        self.enabled = enabled and _is_terminal(self.stream)
        self.start = time.monotonic()
        self.delay = delay
        self.drawn = False
        self.check = check

    def __call__(self, done: int, total: int) -> None:
        if self.check is not None:
            self.check()
        if not self.enabled or time.monotonic() - self.start < self.delay:
            return
        filled = int(_WIDTH * done / total) if total else _WIDTH
        self._draw(f"{self.label} [{'█' * filled}{' ' * (_WIDTH - filled)}] {done}/{total}")

    def _draw(self, text: str) -> None:
        self.stream.write(f"\r{text}\033[K")
        self.stream.flush()
        self.drawn = True

    def close(self) -> None:
        if self.drawn:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self.drawn = False


class Progress(ProgressBar):
    """One status line over a command's phases: :meth:`phase` names the phase now running (drawn at once on a
    terminal); calling the object with (done, total) draws that phase's bar."""

    def __init__(
        self, *, stream: TextIO | None = None, enabled: bool = True, check: Callable[[], None] | None = None
    ) -> None:
        super().__init__("", stream=stream, delay=0.0, enabled=enabled, check=check)

    def phase(self, label: str) -> None:
        if self.check is not None:
            self.check()
        self.label = label
        if self.enabled:
            self._draw(f"{label} …")


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


__all__ = ["Progress", "ProgressBar"]
