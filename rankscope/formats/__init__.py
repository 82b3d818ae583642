"""The formats registry: one reader per adapter family, each registered through :func:`register_format`.

Adding a family means adding one module here with a detector and a reader, and one ``register_format``
call at the bottom of this file. (Model: PEFT's ``tuners/<method>/`` folders behind ``register_peft_method``.)
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..checkpoint import Checkpoint, Skipped
from ..errors import CheckpointError, UnsupportedAdapterError
from .source import AdapterSource, locate


@dataclass(frozen=True)
class ReadOptions:
    """What a reader may be told: ``alpha`` overrides the LoRA α (for files that do not say)."""

    alpha: float | None = None


@dataclass(frozen=True)
class Format:
    """A registered adapter family: ``detect`` says whether the files are its, ``read`` turns them into layers."""

    name: str
    description: str
    detect: Callable[[AdapterSource], bool]
    read: Callable[[AdapterSource, ReadOptions], Checkpoint]


_REGISTRY: dict[str, Format] = {}
_NAME = re.compile(r"^[a-z][a-z0-9_-]*$")


def register_format(fmt: Format) -> None:
    """Add a family to the registry; detection tries families in registration order."""
    if not _NAME.match(fmt.name):
        raise ValueError(f"format name {fmt.name!r} must be lower-case letters, digits, '-' or '_'")
    if fmt.name in _REGISTRY:
        raise ValueError(f"format {fmt.name!r} is registered already; pick another name")
    _REGISTRY[fmt.name] = fmt


def format_names() -> list[str]:
    return list(_REGISTRY)


def supported_summary() -> str:
    return ", ".join(_REGISTRY)


def detect(source: AdapterSource) -> Format:
    """The first registered family whose detector accepts ``source``."""
    for fmt in _REGISTRY.values():
        if fmt.detect(source):
            return fmt
    where = source.config_path or source.weights_path
    if source.peft_type is not None:
        raise UnsupportedAdapterError(
            f"adapter type {source.peft_type!r} is not supported (supported: {supported_summary()})", path=where
        )
    sample = ", ".join(repr(k) for k in source.tensors.keys()[:3])
    raise CheckpointError(
        f"no adapter tensors recognised (first keys: {sample or 'none'}; supported: {supported_summary()})",
        path=source.weights_path,
    )


def load(
    path: str | Path,
    *,
    adapter: str | None = None,
    alpha: float | None = None,
    format: str | None = None,
) -> Checkpoint:
    """Read the adapter at ``path`` into a :class:`Checkpoint` of per-layer updates.

    ``path`` is a PEFT adapter directory, a directory of several adapters (``adapter`` picks one by name),
    or a bare ``.safetensors``/``.bin`` file. ``format`` forces a family instead of detecting it.
    """
    source = locate(path, adapter)
    if format is not None:
        if format not in _REGISTRY:
            raise CheckpointError(f"unknown format {format!r} (known: {supported_summary()})")
        fmt = _REGISTRY[format]
    else:
        fmt = detect(source)
    checkpoint = fmt.read(source, ReadOptions(alpha=alpha))
    checkpoint.other_adapters = list(source.other_adapters)
    checkpoint.skipped.extend(Skipped(key, reason) for key, reason in source.tensors.ignored.items())
    if not checkpoint.layers:
        raise CheckpointError("no adapted layers found", path=source.weights_path)
    return checkpoint


from . import lora  # noqa: E402  (the registrations need the definitions above)

register_format(Format("lora", "PEFT LoRA / rsLoRA (Linear, Conv1D, Embedding, Conv)", lora.detect, lora.read))

__all__ = ["Format", "ReadOptions", "detect", "format_names", "load", "register_format"]
