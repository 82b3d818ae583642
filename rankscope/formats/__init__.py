"""The formats registry: every readable thing is a registered :class:`Format`, each through :func:`register_format`.

A built-in family is one module of this package with a ``detect`` and a ``read`` function and a
``register_format(Format(...))`` call at its bottom; importing the package imports every module here (the
registry's families), never the subpackage :mod:`.common`, which holds the steps the readers share (finding an
adapter's files, grouping keys by module, PEFT's config rules, the LyCORIS maths). (Model: PEFT's
``tuners/<method>/`` folders behind ``register_peft_method``.)

Most formats read one adapter's tensor files (``reads="adapter"``): ``detect`` and ``read`` get the
:class:`~.common.source.AdapterSource` that :func:`~.common.source.locate` found. A format whose input is
another kind of file (``reads="path"``: a composition manifest) gets a :class:`PathSource` instead, and is asked
first, before any adapter files are looked for. Within each kind detection tries formats by ``priority`` (lower
first), so a specific family (BoRA: LoRA keys plus ``lora_sigma``) is asked before the generic one it resembles.

Third-party formats: a distribution declares an entry point in the group ``rankscope.formats`` whose object is a
:class:`Format` (``toy = "rankscope_toy:FORMAT"`` in ``[project.entry-points."rankscope.formats"]``); it is
registered under the Format's own name. An entry point that names a module instead is imported, and that module
registers itself with :func:`register_format` as the built-in families do. Discovery is lazy: it runs once, on
the first listing, detection or format lookup, never on ``import rankscope``; an entry point that fails to load
or register is skipped with a :class:`FormatWarning` naming it.
"""

from __future__ import annotations

import importlib
import math
import pkgutil
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from ..core.base import BaseWeights
from ..core.checkpoint import Checkpoint, Skipped
from ..core.errors import CheckpointError, UnsupportedAdapterError, UsageProblem
from ..core.hub import resolve_adapter
from .common.source import AdapterSource, locate

ENTRY_POINT_GROUP = "rankscope.formats"
READS = ("adapter", "path")  # what a format's detect and read are given: an AdapterSource, or a PathSource


class FormatWarning(UserWarning):
    """A third-party format could not be registered (its entry point is named); the others still work."""


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
class PathSource:
    """The input of a ``reads="path"`` format: the path itself, and how to load the adapters it names.

    ``load(path, stack)`` reads any adapter (or nested input) with the same options; ``stack`` holds the inputs
    being read above this one, so that a reader can refuse a cycle.
    """

    path: Path
    load: Callable[[Path, tuple[Path, ...]], Checkpoint]
    stack: tuple[Path, ...] = ()


@dataclass(frozen=True)
class Format:
    """A registered format: ``detect`` says whether the input is its, ``read`` turns it into layers.

    ``reads`` says what both are given: "adapter" (an :class:`~.common.source.AdapterSource`, the default) or
    "path" (a :class:`PathSource`, for inputs that are not an adapter's tensor files). ``needs`` and ``spectrum``
    are what ``rankscope formats`` lists: what reading the family needs beyond its own files ("nothing",
    "--base", "--base for …") and how its spectrum is computed ("factored", "dense", "Kronecker", "vector", or
    which layers are which); empty where a third-party format does not say.
    """

    name: str
    description: str
    detect: Callable[[Any], bool]
    read: Callable[[Any, ReadOptions], Checkpoint]
    priority: int = 50
    reads: str = "adapter"
    needs: str = ""
    spectrum: str = ""


_REGISTRY: dict[str, Format] = {}
_NAME = re.compile(r"^[a-z][a-z0-9_-]*$")
_discovered = False


def register_format(fmt: Format) -> None:
    """Add a format to the registry: a checked call (unique lower-case names, callables, a known ``reads``)."""
    if not isinstance(fmt, Format):
        raise TypeError(f"register_format takes a rankscope.formats.Format, found {type(fmt).__name__}")
    if not _NAME.match(fmt.name):
        raise ValueError(f"format name {fmt.name!r} must be lower-case letters, digits, '-' or '_'")
    if fmt.name in _REGISTRY:
        raise ValueError(f"format {fmt.name!r} is registered already; pick another name")
    if not (callable(fmt.detect) and callable(fmt.read)):
        raise TypeError(f"format {fmt.name!r}: detect and read must be functions")
    if fmt.reads not in READS:
        raise ValueError(f"format {fmt.name!r}: reads must be one of {', '.join(READS)}, found {fmt.reads!r}")
    _REGISTRY[fmt.name] = fmt


def _discover() -> None:
    """Register the formats that installed distributions declare in the ``rankscope.formats`` group (once)."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    from importlib.metadata import entry_points  # here, not at import: discovery must not slow ``--version``

    for entry in entry_points(group=ENTRY_POINT_GROUP):
        try:
            loaded = entry.load()
            if isinstance(loaded, Format):
                register_format(loaded)
            elif not isinstance(loaded, ModuleType):  # a module registered its formats when it was imported
                raise TypeError(f"it names a {type(loaded).__name__}, not a rankscope.formats.Format or a module")
        except Exception as exc:  # a broken plug-in must not take the built-in formats down with it
            message = f"format entry point {entry.name!r} ({entry.value}) skipped: {type(exc).__name__}: {exc}"
            warnings.warn(message, FormatWarning, stacklevel=3)


def detection_order() -> list[Format]:
    """Every registered format in the order detection asks them: path formats first, then by priority."""
    _discover()
    return sorted(_REGISTRY.values(), key=lambda f: (f.reads != "path", f.priority, f.name))


def format_names() -> list[str]:
    _discover()
    return sorted(_REGISTRY)


def formats() -> list[Format]:
    return [_REGISTRY[name] for name in format_names()]


def supported_summary() -> str:
    return ", ".join(format_names())


def get_format(name: str) -> Format:
    """The format registered as ``name``; a :class:`UsageProblem` naming the known ones otherwise."""
    _discover()
    if name not in _REGISTRY:
        raise UsageProblem(f"format {name!r} is unknown (known: {supported_summary()})", argument="format")
    return _REGISTRY[name]


def detect(source: AdapterSource) -> Format:
    """The first registered adapter format whose detector accepts ``source``."""
    for fmt in detection_order():
        if fmt.reads == "adapter" and fmt.detect(source):
            return fmt
    where = source.where
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
    threads: int | None = None,
) -> Checkpoint:
    """Read the adapter at ``path`` into a :class:`Checkpoint` of per-layer updates.

    ``path`` is a PEFT adapter directory, a directory of several adapters (``adapter`` picks one by name), a bare
    ``.safetensors``/``.bin`` file, or a composition manifest (``composition.json``, or a directory holding one).
    ``compose`` names adapters of a multi-adapter directory to sum with ``weights`` (``normalize``: "none" or
    "softmax"; ``mode``: "sum" or "sequential"). ``format`` forces a registered format instead of detecting one
    (checked before any file is read). ``base`` is the base model (a Hugging Face model directory or a
    safetensors file) for updates that need it. ``trust_pickle`` lets a ``.bin``/``.pt``/``.ckpt`` that
    ``weights_only`` refuses be unpickled in full: only for the user's own files, since unpickling runs code.
    ``threads=1`` reads under :func:`rankscope.single_threaded` (per-tensor checks are small ops, which torch's
    fork-join slows on a busy machine; process-wide while it runs); the default changes no thread setting.
    """
    if format is not None:
        get_format(format)  # a misspelt name is a usage problem, whatever the path
    if alpha is not None and not (math.isfinite(alpha) and alpha > 0):
        raise UsageProblem(f"alpha must be a finite positive number, found {alpha:g}", argument="alpha")
    options = ReadOptions(
        alpha=alpha,
        base=BaseWeights(base) if base is not None else None,
        directional_only=directional_only,
        trust_pickle=trust_pickle,
    )
    # a hub id not on disk: its snapshot (an adapter's, or a model's); --compose fetches each adapter it names
    path = Path(path if compose else resolve_adapter(path, adapter))
    if path.name == "adapter_config.json" and path.is_file():
        path = path.parent  # the config names its adapter directory
    from ..core.threads import thread_policy

    with thread_policy(threads):
        if compose:
            checkpoint = _compose(path, list(compose), weights, normalize, mode, options)
        else:
            checkpoint = _load(path, adapter, format, options, ())
    checkpoint.base = checkpoint.base or options.base  # the analysis measures the updates against it
    warning = checkpoint.not_analysed_warning()
    if warning is not None:
        checkpoint.warnings.append(warning)
    return checkpoint


def _load(path: Path, adapter: str | None, format: str | None, options: ReadOptions, stack: tuple) -> Checkpoint:
    forced = get_format(format) if format is not None else None
    nested = PathSource(path, lambda inner_path, inner: _load(inner_path, None, None, options, inner), stack)
    if forced is not None and forced.reads == "path":
        if adapter is not None:
            raise UsageProblem(
                f"adapter picks an adapter of a directory; a {forced.name} input names its own", argument="adapter"
            )
        return forced.read(nested, options)
    if forced is None and adapter is None:  # a path format (a manifest) is asked before adapter files are sought
        for fmt in detection_order():
            if fmt.reads == "path" and fmt.detect(nested):
                return fmt.read(nested, options)
    source = locate(path, adapter, trust_pickle=options.trust_pickle)
    fmt = forced or detect(source)
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
        raise UsageProblem(
            f"weights gives {len(weights)} numbers for {len(names)} adapters in compose",
            argument=("weights", "compose"),
        )
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
    """Import every family module of this package (each registers itself at its bottom); not :mod:`.common`."""
    for module in pkgutil.iter_modules(__path__):
        if not module.ispkg and not module.name.startswith("_"):
            importlib.import_module(f"{__name__}.{module.name}")


_import_families()

__all__ = [
    "ENTRY_POINT_GROUP",
    "Format",
    "FormatWarning",
    "PathSource",
    "ReadOptions",
    "detect",
    "detection_order",
    "format_names",
    "formats",
    "get_format",
    "load",
    "register_format",
]
