"""Ctrl-C in the CLI: whatever phase is running, the command ends with exit 130 and one line,
"rankscope: interrupted; nothing written".

Python delivers SIGINT as a ``KeyboardInterrupt`` at whatever bytecode the main thread is running; raised inside a
finaliser (``__del__``, a weakref callback, a generator being closed) it is *unraisable*: Python prints
"Exception ignored … KeyboardInterrupt" and the run goes on — and used to write its report with exit 0. So the
handler also records the interrupt: :func:`check`, called at every progress step and phase, raises it again, and
:func:`commit` (the step before outputs are written) refuses to start once one was received. From :func:`commit`
on a Ctrl-C is ignored: the outputs are being moved into place and the run ends normally, so "nothing written" is
never said of a written report. A second Ctrl-C while the first is being handled (waiting for worker threads)
ends the process at once, with the same line.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator

MESSAGE = "rankscope: interrupted; nothing written"


class _State:
    interrupted = False  # a Ctrl-C was received
    committed = False  # outputs are being written: Ctrl-C no longer stops the run
    reported = False  # the message was printed


_state = _State()


def report_interrupt() -> None:
    """The one line on stderr (once)."""
    if not _state.reported:
        _state.reported = True
        try:
            clear = "\r\033[K" if sys.stderr.isatty() else ""  # over a progress line left standing
            sys.stderr.write(clear + MESSAGE + "\n")
            sys.stderr.flush()
        except (OSError, ValueError):
            pass


def _handler(signum, frame) -> None:
    if _state.committed:
        return
    if _state.interrupted:  # again: the first is being handled (or was swallowed and the user insists)
        report_interrupt()
        os._exit(130)
    _state.interrupted = True
    raise KeyboardInterrupt


def _unraisable(previous):
    def hook(unraisable) -> None:
        if isinstance(unraisable.exc_value, KeyboardInterrupt):
            return  # recorded by the handler; check() raises it where it can propagate
        previous(unraisable)

    return hook


@contextlib.contextmanager
def interrupts(*, process: bool = False) -> Iterator[None]:
    """Install the handler for the duration of a command (main thread only; elsewhere nothing changes). After an
    interrupt the handler stays: a Ctrl-C while the interpreter joins worker threads still ends the process.
    ``process``: the command is the whole process (not a test's in-process call): once its outputs are written,
    Ctrl-C stays ignored until the interpreter has exited (else it would die of SIGINT after writing them)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _state.interrupted = _state.committed = _state.reported = False
    previous, previous_hook = signal.signal(signal.SIGINT, _handler), sys.unraisablehook
    sys.unraisablehook = _unraisable(previous_hook)
    try:
        yield
    finally:
        if process and _state.committed:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        elif not _state.interrupted:
            signal.signal(signal.SIGINT, previous)
            sys.unraisablehook = previous_hook


def check() -> None:
    """Raise ``KeyboardInterrupt`` if a Ctrl-C was received but swallowed before it could stop the run."""
    if _state.interrupted and not _state.committed:
        raise KeyboardInterrupt


def exit_if_pending() -> None:
    """Exit 130 with the one line if a Ctrl-C was received and nothing is being written: an error raised after it
    is its consequence (torch turns a KeyboardInterrupt inside some calls into another exception), not the input's."""
    if _state.interrupted and not _state.committed:
        report_interrupt()
        sys.exit(130)


def commit() -> None:
    """The outputs are about to be written: stop here if interrupted, else ignore Ctrl-C from now on."""
    check()
    _state.committed = True


__all__ = ["MESSAGE", "check", "commit", "exit_if_pending", "interrupts", "report_interrupt"]
