"""Reading tensors from checkpoint files, lazily where the format allows.

safetensors files are opened with ``safe_open`` and read one tensor at a time; ``.bin``/``.pt``/``.pth``/
``.ckpt`` files are untrusted pickles and go only through ``torch.load(..., weights_only=True)``.
Every failure becomes a one-line :class:`CheckpointError` naming the file (and tensor).
"""

from __future__ import annotations

import json
import math
import pickle
import re
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch

from .errors import CheckpointError, one_line

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
TENSOR_SUFFIXES = SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES
# how torch's weights_only unpickler says it blocked a global ("Unsupported global: GLOBAL io.open …",
# "Trying to load unsupported GLOBAL posix.system …"), as opposed to bytes it cannot parse ("Unsupported operand")
_REFUSED_GLOBAL = re.compile(r"unsupported global", re.IGNORECASE)


class TensorFile:
    """A read-only mapping of tensor names to tensors in one file, plus its string metadata."""

    def __init__(self, path: Path, *, trust_pickle: bool = False) -> None:
        self.path = Path(path)
        self.trust_pickle = trust_pickle
        self._metadata: dict[str, str] = {}
        self._tensors: dict[str, torch.Tensor] | None = None
        self._handle = None
        self.ignored: dict[str, str] = {}
        if self.path.suffix in SAFETENSORS_SUFFIXES:
            self._open_safetensors()
        else:
            self._load_pickle()

    # -- opening --------------------------------------------------------------------------------------
    def _open_safetensors(self) -> None:
        from safetensors import safe_open

        try:
            self._handle = safe_open(str(self.path), framework="pt", device="cpu")
            self._metadata = dict(self._handle.metadata() or {})
            self._keys = list(self._handle.keys())
        except FileNotFoundError as exc:
            raise CheckpointError("file not found", path=self.path) from exc
        except Exception as exc:  # safetensors raises SafetensorError, OSError, … for damaged files
            raise CheckpointError(f"not a valid safetensors file ({one_line(exc, 200)})", path=self.path) from exc

    def _load_pickle(self) -> None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                obj = torch.load(str(self.path), map_location="cpu", weights_only=not self.trust_pickle)
        except FileNotFoundError as exc:
            raise CheckpointError("file not found", path=self.path) from exc
        except pickle.UnpicklingError as exc:
            raise self._unpickling_error(exc) from exc
        except Exception as exc:  # RuntimeError, EOFError, KeyError, UnicodeDecodeError, … on damaged files
            raise CheckpointError(
                f"cannot read this file as a torch checkpoint ({type(exc).__name__}: {one_line(exc, 160)})",
                path=self.path,
            ) from exc
        self._tensors = self._tensor_mapping(obj)
        self._keys = list(self._tensors)

    def _unpickling_error(self, exc: pickle.UnpicklingError) -> CheckpointError:
        """weights_only refusing a global (an object that is not a tensor), or a damaged / non-torch pickle."""
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        refused = next((line for line in lines if _REFUSED_GLOBAL.search(line)), None)
        if refused is None or self.trust_pickle:
            detail = next((line for line in lines if "unsupported" in line.lower()), lines[0] if lines else "")
            return CheckpointError(
                f"cannot read this file as a torch checkpoint (UnpicklingError: {one_line(detail, 160)})",
                path=self.path,
            )
        return CheckpointError(
            "refused to unpickle: the file holds objects other than tensors, and rankscope loads pickles "
            f"only with weights_only=True ({one_line(refused, 160)}); if this is "
            "your own file, trust_pickle=True loads it in full (unpickling runs code)",
            path=self.path,
            argument="trust_pickle",
        )

    def _tensor_mapping(self, obj: object) -> dict[str, torch.Tensor]:
        if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
            for key, value in obj.items():  # epoch, optimizer state, hyper-parameters …: listed, not dropped
                if key != "state_dict":
                    self.ignored[str(key)] = f"beside the state_dict ({type(value).__name__})"
            obj = obj["state_dict"]  # Lightning and many training loops nest the weights here
        if not isinstance(obj, Mapping):
            raise CheckpointError(
                f"expected a mapping of tensor names to tensors, found {type(obj).__name__}", path=self.path
            )
        tensors: dict[str, torch.Tensor] = {}
        for key, value in obj.items():
            if isinstance(value, torch.Tensor) and isinstance(key, str):
                tensors[key] = value
            else:
                self.ignored[str(key)] = f"not a tensor ({type(value).__name__})"
        if not tensors:
            raise CheckpointError("the file holds no tensors", path=self.path)
        return tensors

    # -- access ---------------------------------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self._keys)

    def __iter__(self):
        return iter(self._keys)

    def __contains__(self, key: str) -> bool:
        return key in self._keys

    def metadata(self) -> dict[str, str]:
        return dict(self._metadata)

    def shape(self, key: str) -> tuple[int, ...]:
        if self._tensors is not None:
            return tuple(self._tensors[key].shape)
        try:
            return tuple(self._handle.get_slice(key).get_shape())
        except Exception as exc:
            raise CheckpointError(f"cannot read its shape ({one_line(exc, 160)})", path=self.path, key=key) from exc

    def numel(self, key: str) -> int:
        """Elements of ``key``'s tensor, from its header (the tensor is not read)."""
        return math.prod(self.shape(key))

    def get(self, key: str) -> torch.Tensor:
        if self._tensors is not None:
            return self._tensors[key]
        try:
            return self._handle.get_tensor(key)
        except Exception as exc:
            raise CheckpointError(f"cannot read it ({one_line(exc, 160)})", path=self.path, key=key) from exc


def read_json(path: Path) -> dict:
    """Parse a JSON object from ``path``; a one-line error names the file and the position."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CheckpointError("not UTF-8 text", path=path) from exc
    except OSError as exc:
        raise CheckpointError(f"cannot read ({exc.strerror or exc})", path=path) from exc
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}", path=path) from exc
    if not isinstance(value, dict):
        raise CheckpointError(f"expected a JSON object, found {type(value).__name__}", path=path)
    return value
