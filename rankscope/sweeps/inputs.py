"""What a sweep reads: its inputs (paths, folders searched for adapters, glob patterns, list files) as checkpoints.

A folder is searched recursively; what counts as an adapter is what the formats registry detects
(:func:`rankscope.formats.detect` over :func:`~rankscope.formats.common.source.locate`, path formats such as
composition manifests first). A training run (a Trainer ``output_dir`` with ``checkpoint-N/`` folders) gives
one item per checkpoint with its ``run`` and ``step`` (:func:`rankscope.trajectory.discover.run_checkpoints`).
Something that looks like an adapter but cannot be opened (a damaged file) is kept: the sweep gives it an
error row. Tensor files that are not adapters (a base model's weights) are left out with a warning.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import CheckpointError, RankscopeError, UnsupportedAdapterError, UsageProblem
from ..core.naming import checkpoint_labels, natural_key
from ..core.tensorfile import TENSOR_SUFFIXES
from ..formats import PathSource, detect, detection_order
from ..formats.common.source import CONFIG_NAME, WEIGHT_NAMES, locate
from ..trajectory.discover import run_checkpoints

_GLOB_CHARACTERS = frozenset("*?[")


@dataclass(frozen=True)
class SweepItem:
    """One checkpoint of a sweep: its ``id`` (a short label unique in the sweep), ``path`` (absolute), and for
    the checkpoints of a training run, the ``run`` folder and ``step``."""

    id: str
    path: str
    run: str | None = None
    step: int | None = None


def read_list(path: str | Path) -> list[str]:
    """The inputs a ``--from`` file names: one a line; blank lines and ``#`` comments ignored."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise UsageProblem(f"{path}: cannot read the list ({exc.strerror or exc})", argument="from_list") from exc
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def discover(inputs: Iterable[str | Path], warnings: list[str] | None = None) -> list[SweepItem]:
    """The checkpoints the inputs name, in input order (each folder's finds in natural order), each once.

    ``warnings`` (a list) collects what was left out and why."""
    warnings = warnings if warnings is not None else []
    found: list[tuple[Path, str | None, int | None]] = []
    for given in inputs:
        text = str(given)
        if _GLOB_CHARACTERS & set(text) and not Path(text).exists():
            matches = sorted(glob.glob(text, recursive=True), key=natural_key)
            if not matches:
                warnings.append(f"{text}: the pattern matches nothing")
            for match in matches:
                found.extend(_expand(Path(match), warnings))
        else:
            found.extend(_expand(Path(text), warnings))
    seen: set[Path] = set()
    unique = []
    for path, run, step in found:
        resolved = path.absolute() if path.exists() else path  # not a path here (a hub id): as given, for load
        if resolved not in seen:
            seen.add(resolved)
            unique.append((resolved, run, step))
    labels = checkpoint_labels([path for path, _, _ in unique])
    return [
        SweepItem(id=label, path=str(path), run=run, step=step)
        for label, (path, run, step) in zip(labels, unique, strict=True)
    ]


def _expand(path: Path, warnings: list[str]) -> list[tuple[Path, str | None, int | None]]:
    if not path.exists():
        return [(path, None, None)]  # an error row says so, naming it
    run = run_checkpoints(path) if path.is_dir() else None
    if run is not None:
        return [(checkpoint, str(path.absolute()), step) for step, checkpoint in run]
    verdict = _probe(path)
    if verdict in ("adapter", "manifest", "broken") or (path.is_file() and verdict == "nothing"):
        found = [(path, None, None)]
        if path.is_dir() and verdict == "adapter":  # PEFT keeps a directory's other adapters in <dir>/<name>/
            for child in sorted(path.iterdir(), key=lambda child: natural_key(child.name)):
                if child.is_dir() and (child / CONFIG_NAME).is_file():
                    found.extend(_expand(child, warnings))
        return found
    if path.is_file():
        warnings.append(f"{path}: not an adapter (no adapter tensors recognised); left out")
        return []
    return _search(path, warnings)


def _search(folder: Path, warnings: list[str]) -> list[tuple[Path, str | None, int | None]]:
    """Adapters anywhere under ``folder`` (which is not one itself): its tensor files and its sub-folders."""
    found = []
    try:
        children = sorted(folder.iterdir(), key=lambda child: natural_key(child.name))
    except OSError as exc:
        warnings.append(f"{folder}: cannot list ({exc.strerror or exc}); left out")
        return []
    here = folder.resolve()
    for child in children:
        if child.name.startswith("."):
            continue
        if child.is_symlink() and child.is_dir() and (child.resolve() == here or child.resolve() in here.parents):
            warnings.append(f"{child}: a link back to {child.resolve()} (a cycle); not followed")
            continue
        if child.is_dir() or (child.suffix in TENSOR_SUFFIXES and child.name not in WEIGHT_NAMES):
            found.extend(_expand(child, warnings))
    return found


def _probe(path: Path) -> str:
    """ "adapter" (the registry detects one), "manifest" (a path format's input: a composition), "broken" (it
    looks like one but cannot be read: an error row), "not an adapter" (tensors no format recognises, no adapter
    config) or "nothing" (no adapter files here)."""
    if path.is_dir():
        if is_manifest(path):
            return "manifest"
        if not _holds_weights(path):
            return "nothing"
    try:
        source = locate(path)
    except RankscopeError:
        return "broken" if path.is_file() or (path / CONFIG_NAME).is_file() else "nothing"
    try:
        detect(source)
    except UnsupportedAdapterError:
        return "broken"
    except CheckpointError:
        return "broken" if source.config is not None else "not an adapter"
    return "adapter"


def is_manifest(path: Path) -> bool:
    """Whether a path format (a composition manifest) of the registry takes ``path`` as its input."""
    source = PathSource(Path(path), lambda inner, stack: None)  # detection only: nothing is loaded
    return any(fmt.reads == "path" and fmt.detect(source) for fmt in detection_order())


def _holds_weights(folder: Path) -> bool:
    """Whether ``locate`` would take the folder as one adapter: a PEFT weights file or a single tensor file."""
    try:
        names = [entry.name for entry in os.scandir(folder) if entry.is_file()]
    except OSError:
        return False
    if any(name in WEIGHT_NAMES for name in names):
        return True
    return sum(Path(name).suffix in TENSOR_SUFFIXES for name in names) == 1
