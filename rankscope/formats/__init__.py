"""The formats registry: one reader per adapter family, each registered through :func:`register_format`.

Adding a family means adding one module to this package with a ``detect`` and a ``read`` function and a
``register_format(Format(...))`` call at its bottom: every module here is imported when the package is.
(Model: PEFT's ``tuners/<method>/`` folders behind ``register_peft_method``.) Detection tries families by
``priority`` (lower first), so a specific family (BoRA: LoRA keys plus ``lora_sigma``) is asked before the
generic one it resembles.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..base import BaseWeights
from ..checkpoint import Checkpoint, Skipped
from ..errors import CheckpointError, UnsupportedAdapterError
from .source import AdapterSource, locate


@dataclass(frozen=True)
class ReadOptions:
    """What a reader may be told.

    ``alpha`` overrides the LoRA α (for files that do not say); ``base`` gives the base model's weights for
    updates that need them (DoRA, IA3); ``directional_only`` analyses DoRA's s·B·A alone, without its base.
    """

    alpha: float | None = None
    base: BaseWeights | None = None
    directional_only: bool = False


@dataclass(frozen=True)
class Format:
    """A registered adapter family: ``detect`` says whether the files are its, ``read`` turns them into layers."""

    name: str
    description: str
    detect: Callable[[AdapterSource], bool]
    read: Callable[[AdapterSource, ReadOptions], Checkpoint]
    priority: int = 50


_REGISTRY: dict[str, Format] = {}
_NAME = re.compile(r"^[a-z][a-z0-9_-]*$")


def register_format(fmt: Format) -> None:
    """Add a family to the registry (a checked call: names are unique lower-case identifiers)."""
    if not _NAME.match(fmt.name):
        raise ValueError(f"format name {fmt.name!r} must be lower-case letters, digits, '-' or '_'")
    if fmt.name in _REGISTRY:
        raise ValueError(f"format {fmt.name!r} is registered already; pick another name")
    _REGISTRY[fmt.name] = fmt


def format_names() -> list[str]:
    return sorted(_REGISTRY)


def formats() -> list[Format]:
    return [_REGISTRY[name] for name in format_names()]


def supported_summary() -> str:
    return ", ".join(format_names())


def detect(source: AdapterSource) -> Format:
    """The first registered family whose detector accepts ``source``."""
    for fmt in sorted(_REGISTRY.values(), key=lambda f: (f.priority, f.name)):
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
    base: str | Path | None = None,
    directional_only: bool = False,
    trust_pickle: bool = False,
) -> Checkpoint:
    """Read the adapter at ``path`` into a :class:`Checkpoint` of per-layer updates.

    ``path`` is a PEFT adapter directory, a directory of several adapters (``adapter`` picks one by name),
    or a bare ``.safetensors``/``.bin`` file. ``format`` forces a family instead of detecting it. ``base`` is
    the base model (a Hugging Face model directory or a safetensors file) for updates that need it.
    ``trust_pickle`` lets a ``.bin``/``.pt``/``.ckpt`` that ``weights_only`` refuses be unpickled in full:
    only for the user's own files, since unpickling runs code.
    """
    source = locate(path, adapter, trust_pickle=trust_pickle)
    if format is not None:
        if format not in _REGISTRY:
            raise CheckpointError(f"unknown format {format!r} (known: {supported_summary()})")
        fmt = _REGISTRY[format]
    else:
        fmt = detect(source)
    options = ReadOptions(
        alpha=alpha, base=BaseWeights(base) if base is not None else None, directional_only=directional_only
    )
    checkpoint = fmt.read(source, options)
    checkpoint.other_adapters = list(source.other_adapters)
    checkpoint.skipped.extend(Skipped(key, reason) for key, reason in source.tensors.ignored.items())
    if not checkpoint.layers:
        raise CheckpointError("no adapted layers found", path=source.weights_path)
    return checkpoint


def _import_families() -> None:
    """Import every module of this package; each family module registers itself at its bottom."""
    for module in pkgutil.iter_modules(__path__):
        if not module.name.startswith("_"):
            importlib.import_module(f"{__name__}.{module.name}")


_import_families()

__all__ = ["Format", "ReadOptions", "detect", "format_names", "formats", "load", "register_format"]
