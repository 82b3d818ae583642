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

Exit 130, never death by SIGINT (rc -2 to a parent), once the line is printed: under ``python -m`` CPython (since 3.8;
checked on 3.10 to 3.13) re-kills itself with SIGINT at exit if a ``KeyboardInterrupt`` ever left code compiled from a
*string* (``exec``/``eval`` of source: every ``@dataclass`` and ``namedtuple`` made while modules import), even when
the program caught it and called ``sys.exit(130)``; a Ctrl-C landing while a phase imports its modules did that.
:func:`report_interrupt` clears that record; from the interpreter's exit functions on (the worker threads joined)
a further Ctrl-C is ignored, since the handlers are gone by the time the modules are torn down.
"""

from __future__ import annotations

import atexit
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
    process = False  # the command is the whole process (not a test's in-process call)


_state = _State()


def report_interrupt() -> None:
    """The one line on stderr (once); from here the run ends with exit 130 (every caller exits so)."""
    _forget_string_eval_interrupt()
    if not _state.reported:
        _state.reported = True
        if _state.process:  # after the threads are joined (a second Ctrl-C there still ends it: the handler)
            atexit.register(signal.signal, signal.SIGINT, signal.SIG_IGN)
        try:
            clear = "\r\033[K" if sys.stderr.isatty() else ""  # over a progress line left standing
            sys.stderr.write(clear + MESSAGE + "\n")
            sys.stderr.flush()
        except (OSError, ValueError):
            pass


def _forget_string_eval_interrupt() -> None:
    """Clear CPython's record that a ``KeyboardInterrupt`` left string-compiled code (``run_eval_code_obj`` sets
    it; ``Py_RunMain`` then ends a ``-m`` run by SIGINT whatever the exit code). Every string eval resets it as it
    starts, and this one ends normally; no public API does it (the flag is not reachable from Python)."""
    exec("", {})  # an empty module, run for its side effect on that flag


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
    _state.process = process
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
