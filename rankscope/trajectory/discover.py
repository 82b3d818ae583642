"""Which checkpoints make up a training run, and at which step each was written.

A run is a transformers ``Trainer`` ``output_dir`` (its ``checkpoint-N/`` folders; the step is
``trainer_state.json``'s ``global_step`` where the folder has one, else ``N``) or a folder of Lightning checkpoints
(``epoch=E-step=N.ckpt``; the step is ``N``). An explicit list of paths is put in natural order
(``500 < 1000 < 1500``) with the last integer in each name as its step.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

from ..core.errors import CheckpointError
from ..core.naming import natural_key

TRAINER_STATE = "trainer_state.json"
_TRAINER_DIR = re.compile(r"^checkpoint-(\d+)$")
_LIGHTNING_FILE = re.compile(r"(?:^|[-_])step=(\d+)(?=[-_.]).*\.ckpt$")
_LAST_INTEGER = re.compile(r"(\d+)(?!.*\d)")


def _trainer_state(folder: Path) -> dict | None:
    """The folder's ``trainer_state.json``, None where it has none (one it cannot read is an error)."""
    state = folder / TRAINER_STATE
    if not (folder.is_dir() and state.is_file()):
        return None
    try:
        found = json.loads(state.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {TRAINER_STATE}: {exc}", path=folder) from exc
    if not isinstance(found, dict):
        raise CheckpointError(f"{TRAINER_STATE} holds no JSON object", path=folder)
    return found


def trainer_step(folder: Path, named: int) -> int:
    """``global_step`` from the folder's ``trainer_state.json`` where present, else ``named`` (from its name)."""
    step = (_trainer_state(folder) or {}).get("global_step")
    if isinstance(step, bool) or not isinstance(step, int):
        return named
    return step


_LIGHTNING_EPOCH = re.compile(r"(?:^|[-_])epoch=(\d+)(?=[-_.])")


def checkpoint_epoch(path: Path) -> float | None:
    """The epoch a checkpoint was written at: ``trainer_state.json``'s ``epoch`` (fractional: 1.5 is halfway
    through the second) in a Trainer folder, Lightning's ``epoch=E`` in a file name; None where neither says."""
    path = Path(path)
    state = _trainer_state(path)
    if state is not None:
        epoch = state.get("epoch")
        return float(epoch) if isinstance(epoch, (int, float)) and not isinstance(epoch, bool) else None
    match = _LIGHTNING_EPOCH.search(path.name) if path.suffix == ".ckpt" else None
    return float(match[1]) if match else None


def run_checkpoints(path: Path) -> list[tuple[int, Path]] | None:
    """The checkpoints of the run in ``path`` as ``(step, checkpoint path)`` in step order; None when ``path`` is
    not a run (a single adapter, a file, a folder with neither ``checkpoint-N/`` folders nor Lightning files).

    Trainer folders win over Lightning files when a folder has both. Ties in step keep natural name order.
    """
    path = Path(path)
    if not path.is_dir():
        return None
    children = sorted(path.iterdir(), key=lambda child: natural_key(child.name))
    trainer = [
        (trainer_step(child, int(match[1])), child)
        for child in children
        if child.is_dir() and (match := _TRAINER_DIR.match(child.name))
    ]
    if trainer:
        return sorted(trainer, key=lambda item: item[0])
    lightning = [
        (int(match[1]), child)
        for child in children
        if child.is_file() and (match := _LIGHTNING_FILE.search(child.name))
    ]
    if lightning:
        return sorted(lightning, key=lambda item: item[0])
    return None


def name_step(path: Path, position: int) -> int:
    """The step a path's name says: Lightning's ``step=N``, Trainer's ``checkpoint-N``, else the last integer in
    the name; ``position`` (its place in the list) when the name has none."""
    name = Path(path).name
    for pattern in (_LIGHTNING_FILE, _TRAINER_DIR):
        if match := pattern.search(name):
            return int(match[1])
    if match := _LAST_INTEGER.search(name):
        return int(match[1])
    return position


def ordered_paths(paths: Sequence[Path]) -> list[tuple[int, Path]]:
    """An explicit list of checkpoints with their steps, in step order: ``global_step`` from a Trainer folder's
    ``trainer_state.json``, else what its name says (:func:`name_step`); paths are first put in natural order
    (``500 < 1000 < 1500``), which decides ties and the positions of names without a number."""
    ordered = sorted((Path(p) for p in paths), key=lambda p: natural_key(str(p)))
    result = []
    for position, path in enumerate(ordered):
        named = name_step(path, position)
        result.append((trainer_step(path, named) if path.is_dir() else named, path))
    return sorted(result, key=lambda item: item[0])  # stable: natural order among equal steps
