"""The base model's weights, read lazily: only the tensors an update needs (DoRA, IA3).

A Hugging Face model directory (``model.safetensors``, or shards listed in ``model.safetensors.index.json``,
or ``pytorch_model.bin``), or one tensor file. A layer ``model.layers.0.self_attn.q_proj`` finds its weight
under ``model.layers.0.self_attn.q_proj.weight`` (DESIGN.md, "Names of layers").
"""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import CheckpointError
from .naming import layer_name
from .tensorfile import TENSOR_SUFFIXES, TensorFile, read_json

_INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_SINGLE_NAMES = ("model.safetensors", "pytorch_model.bin")


class BaseWeights:
    """Base-model tensors by layer name, opened on first use."""

    def __init__(self, path: str | Path, *, files: dict[str, Path] | None = None) -> None:
        self.path = Path(path)
        self._files: dict[Path, TensorFile] = {}
        self._key_to_file: dict[str, Path] = files or self._index()
        self._by_name = _names(self._key_to_file)

    @classmethod
    def from_tensor_file(cls, tensors: TensorFile) -> BaseWeights:
        """Base weights that live in the same file as the adapter (training checkpoints)."""
        base = cls(tensors.path, files=dict.fromkeys(tensors.keys(), tensors.path))
        base._files[tensors.path] = tensors
        return base

    def _index(self) -> dict[str, Path]:
        path = self.path
        if not path.exists():
            raise CheckpointError("base model: no such file or directory", path=path)
        if path.is_file():
            if path.suffix not in TENSOR_SUFFIXES:
                raise CheckpointError(
                    f"base model: expected a directory or a {'/'.join(TENSOR_SUFFIXES)} file", path=path
                )
            return dict.fromkeys(self._open(path).keys(), path)
        for name in _INDEX_NAMES:
            if (path / name).is_file():
                weight_map = read_json(path / name).get("weight_map")
                if not isinstance(weight_map, dict):
                    raise CheckpointError("base model index has no 'weight_map' object", path=path / name)
                return {str(k): path / str(v) for k, v in weight_map.items()}
        for name in _SINGLE_NAMES:
            if (path / name).is_file():
                return dict.fromkeys(self._open(path / name).keys(), path / name)
        candidates = sorted(p for p in path.iterdir() if p.suffix in TENSOR_SUFFIXES)
        if len(candidates) == 1:
            return dict.fromkeys(self._open(candidates[0]).keys(), candidates[0])
        raise CheckpointError(
            f"base model: no {' or '.join(_SINGLE_NAMES)} (or an index of shards) in this directory", path=path
        )

    def _open(self, path: Path) -> TensorFile:
        if path not in self._files:
            self._files[path] = TensorFile(path)
        return self._files[path]

    def key_for(self, layer: str, suffix: str = "weight") -> str | None:
        """The stored key of ``layer``'s tensor, or None.

        Keys are compared as layer names (PEFT's ``base_model.model.`` prefix, ``module.``/``_orig_mod.``
        segments and a ``.base_layer`` wrapper dropped), so a PEFT-wrapped state dict serves as a base too; a
        base whose names carry an extra leading part matches where exactly one name ends in ``.<layer>``.
        """
        wanted = f"{layer}.{suffix}"
        if wanted in self._by_name:
            return self._by_name[wanted]
        matches = [key for name, key in self._by_name.items() if name.endswith(f".{wanted}")]
        return matches[0] if len(matches) == 1 else None

    def _require(self, layer: str, suffix: str) -> str:
        key = self.key_for(layer, suffix)
        if key is None:
            raise CheckpointError(
                f"base model has no tensor for layer {layer!r}", path=self.path, key=f"{layer}.{suffix}"
            )
        return key

    def shape(self, layer: str, suffix: str = "weight") -> tuple[int, ...]:
        """The shape of ``layer``'s base tensor, read from the header without loading it."""
        key = self._require(layer, suffix)
        return self._open(self._key_to_file[key]).shape(key)

    def get(self, layer: str, suffix: str = "weight") -> torch.Tensor:
        """``layer``'s base tensor; a one-line error names the base and the key looked for."""
        key = self._require(layer, suffix)
        return self._open(self._key_to_file[key]).get(key)


def _names(keys: dict[str, Path]) -> dict[str, str]:
    """Stored keys by their layer-name form ``<layer>.<suffix>`` (the first key wins where two collide)."""
    names: dict[str, str] = {}
    for key in keys:
        module, dot, suffix = key.rpartition(".")
        if dot:
            names.setdefault(f"{layer_name(module.removesuffix('.base_layer'))}.{suffix}", key)
    return names


def as_matrix(weight: torch.Tensor, kind: str) -> torch.Tensor:
    """A base weight as the analysed (out, in·k…) matrix of a layer of ``kind``.

    GPT-2's Conv1D stores (in, out) and an embedding (V, d): both are transposed (the analysed matrix of an
    embedding is (d, V), as for its LoRA update); a conv's (out, in, *k) is flattened to (out, in·∏k).
    """
    if kind in ("conv1d_gpt2", "embedding"):
        return weight.T
    return weight.reshape(weight.shape[0], -1)
