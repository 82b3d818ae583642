"""rankscope's error types: one base class, each also a built-in type so older ``except`` clauses work.

A library error speaks of the function's arguments (``layers pattern '(' is not a valid regular expression``) and
names them in ``argument=``; a front end re-spells them (:meth:`RankscopeError.spelled`: the CLI writes ``--layers``).
"""

from __future__ import annotations

import re
from collections.abc import Callable


class RankscopeError(Exception):
    """Base class of every error rankscope raises on purpose; its message is one line meant for users.

    ``argument`` names the parameter (or parameters) the message speaks of, spelled as the Python API spells it.
    """

    arguments: tuple[str, ...] = ()
    _after = 0  # where the words of the message start (after a "path: tensor 'key': " prefix)

    def __init__(self, message: str = "", *, argument: str | tuple[str, ...] | None = None) -> None:
        super().__init__(message)
        self.arguments = (argument,) if isinstance(argument, str) else tuple(argument or ())

    def spelled(self, spelling: Callable[[str], str]) -> str:
        """The message with the first whole-word mention of each argument written ``spelling(argument)``."""
        text = str(self)
        head, words = text[: self._after], text[self._after :]
        for name in self.arguments:
            spelled = spelling(name).replace("\\", "\\\\")  # a replacement string: no escapes of its own
            words = re.sub(rf"(?<![\w./-]){re.escape(name)}(?![\w/-])", spelled, words, count=1)
        return head + words


class CheckpointError(RankscopeError, ValueError):
    """A checkpoint cannot be read or analysed: the message names the file and, where known, the tensor."""

    def __init__(
        self,
        message: str,
        *,
        path: object = None,
        key: str | None = None,
        argument: str | tuple[str, ...] | None = None,
    ) -> None:
        where = str(path) if path is not None else ""
        if key:
            where = f"{where}: tensor {key!r}" if where else f"tensor {key!r}"
        text = f"{where}: {message}" if where else message
        super().__init__(one_line(text), argument=argument)
        self._after = len(one_line(f"{where}: ")) if where else 0
        self.path = path
        self.key = key


class UsageProblem(RankscopeError, ValueError):
    """An argument asks for something that cannot be (a bad regex, a negative threshold): exit 2, not 1."""


class UnsupportedAdapterError(CheckpointError):
    """The checkpoint is an adapter type or variant that rankscope does not analyse (yet)."""


def one_line(text: str, limit: int = 400) -> str:
    """Collapse whitespace so a message never spans lines, and cap its length."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"
