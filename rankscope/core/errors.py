"""rankscope's error types: one base class, each also a built-in type so older ``except`` clauses work.

A library error speaks of the function's arguments (``layers pattern '(' is not a valid regular expression``) and
names them in ``argument=``; a front end re-spells them (:meth:`RankscopeError.spelled`: the CLI writes ``--layers``).
An argument whose name is a common word (``base``, ``to``, ``force``) is best written as a keyword
(``pass base=PATH``, ``use to='peft'``, ``pass force=True``): every keyword form is re-spelled (``--base PATH``,
``--to peft``, ``--force``), and prose such as "the base model" before it is left alone.
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
        """The message with each argument written ``spelling(argument)``: every keyword form ``name=value``
        becomes ``spelling(name) value`` (``name=True``: ``spelling(name)`` alone; quotes dropped), and where there
        is none, the first whole-word mention (not one inside a path or file name: ``runs/base``, ``base.json``)."""
        text = str(self)
        head, words = text[: self._after], text[self._after :]
        for name in self.arguments:
            flag = spelling(name)

            def keyword(match: re.Match, flag: str = flag) -> str:
                value = match.group(1)
                if value[:1] in "'\"" and len(value) > 1 and value[-1] == value[0]:
                    value = value[1:-1]
                return flag if value == "True" else f"{flag} {value}"

            words, count = re.subn(keyword_form(name), keyword, words)
            if not count:
                words = re.sub(mention(name), lambda _, flag=flag: flag, words, count=1)
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


def mention(name: str) -> str:
    """The pattern of a whole-word mention of argument ``name``: not part of a longer word, a path
    (``runs/base``), a flag (``--base``) or a file name (``base.json``); a sentence's full stop may follow."""
    return rf"(?<![\w./-]){re.escape(name)}(?![\w/-]|\.\w)"


def keyword_form(name: str) -> str:
    """The pattern of a keyword form ``name=value``: a quoted value without spaces, or a bare token (a
    sentence's full stop, a comma or a closing parenthesis after it is not part of it)."""
    return rf"(?<![\w./-]){re.escape(name)}=('[^'\s]*'|\"[^\"\s]*\"|[^\s,;:()]*[^\s,;:().])"


def one_line(text: str, limit: int = 400) -> str:
    """Collapse whitespace so a message never spans lines, and cap its length."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"
