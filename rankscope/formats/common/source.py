"""Finding an adapter's files: a PEFT directory, a multi-adapter directory, or a bare tensor file."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from ...core.errors import CheckpointError
from ...core.hub import resolve_adapter
from ...core.naming import natural_key
from ...core.tensorfile import TENSOR_SUFFIXES, TensorFile, read_json

CONFIG_NAME = "adapter_config.json"
WEIGHT_NAMES = ("adapter_model.safetensors", "adapter_model.bin", "adapter_model.pt")


@dataclass
class AdapterSource:
    """The files of one adapter: its tensors, its config (None for a bare file without one) and siblings.

    What every ``reads="adapter"`` format's ``detect`` and ``read`` are given (:func:`locate` finds it)."""

    path: Path
    weights_path: Path
    tensors: TensorFile
    config_path: Path | None = None
    config: dict | None = None
    other_adapters: list[str] = field(default_factory=list)
    adapter: str | None = None  # --adapter for a single file: a name inside it (a training checkpoint's keys)

    @property
    def where(self) -> Path:
        """The file a config problem is reported against: the config, else the tensor file."""
        return self.config_path or self.weights_path

    @property
    def peft_type(self) -> str | None:
        value = (self.config or {}).get("peft_type")
        return str(value).upper() if value is not None else None


def _adapter_dirs(directory: Path) -> list[str]:
    """Names of the sub-directories that hold an adapter (PEFT saves non-default adapters there)."""
    try:
        children = sorted((child for child in directory.iterdir() if child.is_dir()), key=lambda c: natural_key(c.name))
    except OSError:
        return []
    return [child.name for child in children if (child / CONFIG_NAME).is_file()]


# what training loops save beside a model's weights (accelerate's save_state, the Trainer's checkpoint-N/): never
# the weights themselves
_TRAINING_STATE = re.compile(r"^(optimizer|scheduler|scaler|training_args|rng_state.*|random_states.*)\.\w+$")


def _weights_in(directory: Path) -> Path | None:
    for name in WEIGHT_NAMES:
        if (directory / name).is_file():
            return directory / name
    files = (p for p in directory.iterdir() if p.is_file() and p.suffix in TENSOR_SUFFIXES)
    candidates = sorted(p for p in files if not _TRAINING_STATE.match(p.name))
    return candidates[0] if len(candidates) == 1 else None


def _describe(names: list[str]) -> str:
    return ", ".join(names) if names else "none"


def locate(path: str | Path, adapter: str | None = None, *, trust_pickle: bool = False) -> AdapterSource:
    """Resolve ``path`` (and ``--adapter NAME``) to one adapter's files.

    A directory ``d/`` that PEFT saved several adapters into holds ``default`` in ``d/`` and the others in
    ``d/<name>/``: ``d/`` means the default one, ``adapter`` picks another by name. A hub id
    ``owner/name[@revision]`` that is no local path is fetched first (:func:`~rankscope.core.hub.resolve_adapter`).
    """
    path = Path(resolve_adapter(path, adapter))
    if not path.exists():
        if path.is_symlink():  # exists() follows the link: a loop, or a target that is gone
            raise CheckpointError("a symbolic link that leads nowhere (a loop, or its target is gone)", path=path)
        raise CheckpointError("no such file or directory", path=path)
    if path.is_dir():
        siblings = _adapter_dirs(path)
        if adapter is not None and adapter != "default":
            if adapter not in siblings:
                raise CheckpointError(
                    f"no adapter named {adapter!r} here (adapters: {_describe(_root_and(path, siblings))})",
                    path=path,
                )
            chosen = locate(path / adapter, trust_pickle=trust_pickle)
            chosen.other_adapters = [n for n in _root_and(path, siblings) if n != adapter]
            return chosen
        weights = _weights_in(path)
        if weights is None:
            if siblings:
                raise CheckpointError(
                    f"no adapter at the top of this directory; it holds adapters {_describe(siblings)}: "
                    "pick one with adapter=NAME or give its folder",
                    path=path,
                    argument="adapter",
                )
            raise CheckpointError(
                f"no adapter here: expected {CONFIG_NAME} with one of {', '.join(WEIGHT_NAMES)}, or a single "
                f"tensor file ({', '.join(TENSOR_SUFFIXES)})",
                path=path,
            )
        config_path = path / CONFIG_NAME if (path / CONFIG_NAME).is_file() else None
        return _open(path, weights, config_path, siblings, trust_pickle)
    if path.suffix not in TENSOR_SUFFIXES:
        raise CheckpointError(
            f"not a tensor file: expected one of {', '.join(TENSOR_SUFFIXES)}, or an adapter directory", path=path
        )
    config_path = path.parent / CONFIG_NAME
    source = _open(path, path, config_path if config_path.is_file() else None, [], trust_pickle)
    if adapter is not None:
        # only a whole model's state dict keeps adapter names in its keys (``lin.lora_A.<name>.weight``)
        if not any(f".{adapter}." in f"{key}." for key in source.tensors):
            raise CheckpointError(
                f"no adapter named {adapter!r} in this file: adapter=NAME picks an adapter of a directory, or one "
                f"inside a training checkpoint (keys like '….lora_A.{adapter}.weight')",
                path=path,
                argument="adapter",
            )
        source.adapter = adapter
    return source


def _root_and(path: Path, siblings: list[str]) -> list[str]:
    return (["default"] if _weights_in(path) is not None else []) + siblings


def _open(path: Path, weights: Path, config_path: Path | None, others: list[str], trust_pickle: bool) -> AdapterSource:
    config = read_json(config_path) if config_path is not None else None
    return AdapterSource(
        path=path,
        weights_path=weights,
        tensors=TensorFile(weights, trust_pickle=trust_pickle),
        config_path=config_path,
        config=config,
        other_adapters=others,
    )
