"""The formats registry: one reader per adapter family, each registered through :func:`register_format`.

Adding a family means adding one module to this package with a ``detect`` and a ``read`` function and a
``register_format(Format(...))`` call at its bottom: every module here is imported when the package is.
(Model: PEFT's ``tuners/<method>/`` folders behind ``register_peft_method``.) Detection tries families by
``priority`` (lower first), so a specific family (BoRA: LoRA keys plus ``lora_sigma``) is asked before the
generic one it resembles.
"""

from __future__ import annotations

import importlib
import math
import pkgutil
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..core.base import BaseWeights
from ..core.checkpoint import Checkpoint, Skipped
from ..core.errors import CheckpointError, UnsupportedAdapterError, UsageProblem
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
    trust_pickle: bool = False


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
    compose: Sequence[str] | None = None,
    weights: Sequence[float] | None = None,
    normalize: str = "none",
    mode: str = "sum",
) -> Checkpoint:
    """Read the adapter at ``path`` into a :class:`Checkpoint` of per-layer updates.

    ``path`` is a PEFT adapter directory, a directory of several adapters (``adapter`` picks one by name), a bare
    ``.safetensors``/``.bin`` file, or a composition manifest (``composition.json``, or a directory holding one).
    ``compose`` names adapters of a multi-adapter directory to sum with ``weights`` (``normalize``: "none" or
    "softmax"; ``mode``: "sum" or "sequential"). ``format`` forces a family instead of detecting it. ``base`` is
    the base model (a Hugging Face model directory or a safetensors file) for updates that need it.
    ``trust_pickle`` lets a ``.bin``/``.pt``/``.ckpt`` that ``weights_only`` refuses be unpickled in full:
    only for the user's own files, since unpickling runs code.
    """
    if alpha is not None and not (math.isfinite(alpha) and alpha > 0):
        raise UsageProblem(f"--alpha must be a finite positive number, found {alpha:g}")
    options = ReadOptions(
        alpha=alpha,
        base=BaseWeights(base) if base is not None else None,
        directional_only=directional_only,
        trust_pickle=trust_pickle,
    )
    path = Path(path)
    if path.name == "adapter_config.json" and path.is_file():
        path = path.parent  # the config names its adapter directory
    from ..core.spectrum import single_threaded_ops

    with single_threaded_ops():  # per-tensor checks are small ops: torch's fork-join costs more than it gains
        if compose:
            checkpoint = _compose(path, list(compose), weights, normalize, mode, options)
        else:
            checkpoint = _load(path, adapter, format, options, ())
    warning = checkpoint.not_analysed_warning()
    if warning is not None:
        checkpoint.warnings.append(warning)
    return checkpoint


def _load(path: Path, adapter: str | None, format: str | None, options: ReadOptions, stack: tuple) -> Checkpoint:
    from .composition import manifest_path, read_manifest

    if format is None and adapter is None and path.exists() and manifest_path(path) is not None:
        return read_manifest(path, lambda p, inner: _load(p, None, None, options, inner), stack)
    source = locate(path, adapter, trust_pickle=options.trust_pickle)
    if format is not None:
        if format not in _REGISTRY:
            raise UsageProblem(f"unknown format {format!r} (known: {supported_summary()})")
        fmt = _REGISTRY[format]
    else:
        fmt = detect(source)
    checkpoint = fmt.read(source, options)
    checkpoint.other_adapters = checkpoint.other_adapters or list(source.other_adapters)
    checkpoint.skipped.extend(Skipped(key, reason) for key, reason in source.tensors.ignored.items())
    if not checkpoint.layers:
        raise CheckpointError("no adapted layers found", path=source.weights_path)
    return checkpoint


def _compose(
    path: Path, names: list[str], weights: Sequence[float] | None, normalize: str, mode: str, options: ReadOptions
) -> Checkpoint:
    from .composition import compose_checkpoints, manifest_json

    if weights is None:
        weights = [1.0] * len(names)
    if len(weights) != len(names):
        raise UsageProblem(f"--weights gives {len(weights)} numbers for {len(names)} adapters in --compose")
    checkpoints = [_load(path, name, None, options, ()) for name in names]
    return compose_checkpoints(
        path,
        names,
        checkpoints,
        weights_spec=list(weights),
        normalize=normalize,
        mode=mode,
        config=manifest_json(names, weights, normalize, mode),
    )


def _import_families() -> None:
    """Import every module of this package; each family module registers itself at its bottom."""
    for module in pkgutil.iter_modules(__path__):
        if not module.name.startswith("_"):
            importlib.import_module(f"{__name__}.{module.name}")


_import_families()

__all__ = ["Format", "ReadOptions", "detect", "format_names", "formats", "load", "register_format"]
