"""rankscope's error types: one base class, each also a built-in type so older ``except`` clauses work."""

from __future__ import annotations


class RankscopeError(Exception):
    """Base class of every error rankscope raises on purpose; its message is one line meant for users."""


class CheckpointError(RankscopeError, ValueError):
    """A checkpoint cannot be read or analysed: the message names the file and, where known, the tensor."""

    def __init__(self, message: str, *, path: object = None, key: str | None = None) -> None:
        where = str(path) if path is not None else ""
        if key:
            where = f"{where}: tensor {key!r}" if where else f"tensor {key!r}"
        text = f"{where}: {message}" if where else message
        super().__init__(one_line(text))
        self.path = path
        self.key = key


class UsageProblem(RankscopeError, ValueError):
    """An option asks for something that cannot be (a bad regex, a negative threshold): exit 2, not 1."""


class UnsupportedAdapterError(CheckpointError):
    """The checkpoint is an adapter type or variant that rankscope does not analyse (yet)."""


def one_line(text: str, limit: int = 400) -> str:
    """Collapse whitespace so a message never spans lines, and cap its length."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"
