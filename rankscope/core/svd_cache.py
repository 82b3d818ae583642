"""An on-disk cache of base-weight decompositions, reused across the adapters of one base.

The base model's SVDs (σ and left singular vectors of W₀, for intruder dimensions) are the costly part of the
base-aware metrics, and they depend on the base alone: each is stored once, as a safetensors file (never a
pickle), under ``$RANKSCOPE_CACHE/svd`` (``$RANKSCOPE_CACHE`` default: the user cache directory,
``~/.cache/rankscope`` on Linux). An entry is keyed by the base file's resolved path, size and modification time
(ns), the tensor's key, its dtype and what was computed, so rewriting or touching the base file makes its entries
unreachable (they age out). Entries are written atomically (a temporary file renamed into place); the total size
stays under ``$RANKSCOPE_CACHE_SIZE`` (bytes, or with a K/M/G suffix; default 2G), the least recently used entries
removed first. An unreadable entry is removed and recomputed. ``rankscope cache info`` / ``rankscope cache
clear`` show and empty it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import UsageProblem

CACHE_VERSION = 1
DEFAULT_LIMIT = 2 << 30
_SUFFIX = ".safetensors"
_ENTRY = re.compile(r"^[0-9a-f]{64}\.safetensors$")
_PARTIAL = re.compile(r"^\.partial-.*\.safetensors$")
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def cache_directory() -> Path:
    """``$RANKSCOPE_CACHE``, else the platform's user cache directory + ``rankscope``."""
    configured = os.environ.get("RANKSCOPE_CACHE")
    if configured:
        return Path(configured).expanduser()
    if sys.platform == "win32":
        root = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
    elif sys.platform == "darwin":
        root = Path.home() / "Library" / "Caches"
    else:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "rankscope"


def cache_limit() -> int:
    """The size limit in bytes: ``$RANKSCOPE_CACHE_SIZE`` (``500M``, ``4G``, a number of bytes), default 2 GiB."""
    text = os.environ.get("RANKSCOPE_CACHE_SIZE", "").strip().upper().removesuffix("B").removesuffix("I")
    if not text:
        return DEFAULT_LIMIT
    number, unit = (text[:-1], text[-1]) if text[-1:] in _UNITS else (text, "")
    try:
        limit = int(float(number) * _UNITS[unit])
    except ValueError:
        limit = -1
    if limit < 0:
        raise UsageProblem(f"RANKSCOPE_CACHE_SIZE {text!r} is not a size such as 500M or 4G")
    return limit


@dataclass(frozen=True)
class CacheKey:
    """What identifies one cached decomposition: the file (resolved path, size, mtime), tensor, dtype and what."""

    path: str
    size: int
    mtime_ns: int
    tensor: str
    dtype: str
    what: str

    @classmethod
    def of(cls, file: str | Path, tensor: str, dtype: torch.dtype | str, what: str) -> CacheKey:
        resolved = Path(file).resolve()
        stat = resolved.stat()
        return cls(str(resolved), stat.st_size, stat.st_mtime_ns, tensor, str(dtype).removeprefix("torch."), what)

    def digest(self) -> str:
        text = json.dumps({"version": CACHE_VERSION, **self.__dict__}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()


class SVDCache:
    """Cached tensors by :class:`CacheKey` in ``directory`` (default :func:`cache_directory`), within ``limit``
    bytes; ``hits`` and ``misses`` count this object's look-ups."""

    def __init__(self, directory: str | Path | None = None, limit: int | None = None) -> None:
        # a folder of its own, so that clearing never touches other files under $RANKSCOPE_CACHE
        self.directory = Path(directory) if directory is not None else cache_directory() / "svd"
        self.limit = cache_limit() if limit is None else limit
        self.hits = 0
        self.misses = 0

    def _file(self, key: CacheKey) -> Path:
        return self.directory / f"{key.digest()}{_SUFFIX}"

    def load(self, key: CacheKey) -> dict[str, torch.Tensor] | None:
        """The tensors stored under ``key``, or None (an entry that cannot be read is removed)."""
        from safetensors.torch import load_file

        file = self._file(key)
        if not file.is_file():
            return None
        try:
            tensors = load_file(file)
        except Exception:  # a truncated or foreign file: not ours to trust, recomputed instead
            file.unlink(missing_ok=True)
            return None
        with contextlib.suppress(OSError):
            os.utime(file)  # recently used: evicted last
        return tensors

    def store(self, key: CacheKey, tensors: dict[str, torch.Tensor]) -> None:
        """Write ``tensors`` under ``key`` atomically, then trim the cache to its limit; an entry larger than the
        limit, or a directory that cannot be written, is silently not cached (the result is still returned)."""
        from safetensors.torch import save_file

        size = sum(t.numel() * t.element_size() for t in tensors.values())
        if size > self.limit:
            return
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            handle, temporary = tempfile.mkstemp(dir=self.directory, prefix=".partial-", suffix=_SUFFIX)
            os.close(handle)
            try:
                contiguous = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
                save_file(contiguous, temporary, metadata={"key": json.dumps(key.__dict__, sort_keys=True)})
                os.replace(temporary, self._file(key))
            finally:
                Path(temporary).unlink(missing_ok=True)
        except OSError:
            return
        self._trim()

    def cached(self, key: CacheKey, compute: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """The tensors under ``key``, computed (and stored) by ``compute()`` where the cache has none."""
        found = self.load(key)
        if found is not None:
            self.hits += 1
            return found
        self.misses += 1
        tensors = compute()
        self.store(key, tensors)
        return tensors

    def entries(self) -> list[Path]:
        if not self.directory.is_dir():
            return []
        return [p for p in self.directory.iterdir() if _ENTRY.match(p.name)]

    def info(self) -> dict:
        """Where the cache is, how many entries it holds, their total size and the limit."""
        entries = self.entries()
        return {
            "directory": str(self.directory),
            "entries": len(entries),
            "bytes": sum(_size(p) for p in entries),
            "limit": self.limit,
        }

    def clear(self) -> int:
        """Remove every entry (and left-over partial files); returns how many entries were removed."""
        if not self.directory.is_dir():
            return 0
        removed = 0
        for path in self.directory.iterdir():
            if _ENTRY.match(path.name) or _PARTIAL.match(path.name):
                removed += bool(_ENTRY.match(path.name))
                path.unlink(missing_ok=True)
        return removed

    def _trim(self) -> None:
        entries = sorted(self.entries(), key=_mtime)
        total = sum(_size(p) for p in entries)
        for path in entries:
            if total <= self.limit:
                break
            total -= _size(path)
            path.unlink(missing_ok=True)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _mtime(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return 0


__all__ = ["CACHE_VERSION", "DEFAULT_LIMIT", "CacheKey", "SVDCache", "cache_directory", "cache_limit"]
