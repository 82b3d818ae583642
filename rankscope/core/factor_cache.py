"""The R factors the factored path computed, kept per stored factor for whoever asks next (``compare``'s and a
composition's alignment after the spectra): ``FACTOR_CACHE``, re-exported by ``core.factored``."""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict

import torch


def _version(tensor: torch.Tensor) -> int | None:
    try:
        return int(tensor._version)
    except RuntimeError:  # inference tensors have no version counter: not cached
        return None


class FactorCache:
    """(R, method) per stored tensor and key (which side, blocks, device, tolerance: the caller's). Keyed by the
    tensor's identity and checked against its version counter (an in-place change is a miss); an entry goes when
    its tensor is freed, the oldest go beyond ``budget`` bytes."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self._entries: OrderedDict[tuple, tuple] = OrderedDict()
        self._bytes = 0
        self._lock = threading.RLock()  # a weakref callback may run while the lock is held, in the same thread

    def get(self, tensor: torch.Tensor, key: tuple) -> tuple[torch.Tensor, str] | None:
        full = (id(tensor), *key)
        with self._lock:
            entry = self._entries.get(full)
            if entry is None or entry[0]() is not tensor or entry[1] != _version(tensor):
                return None
            self._entries.move_to_end(full)
            return entry[2], entry[3]

    def put(self, tensor: torch.Tensor, key: tuple, r: torch.Tensor, method: str) -> None:
        version = _version(tensor)
        if version is None:
            return
        full = (id(tensor), *key)
        size = r.numel() * r.element_size()

        def forget(ref, full=full) -> None:
            with self._lock:
                entry = self._entries.get(full)
                if entry is not None and entry[0] is ref:
                    self._drop(full)

        with self._lock:
            if full in self._entries:
                self._drop(full)
            self._entries[full] = (weakref.ref(tensor, forget), version, r, method, size)
            self._bytes += size
            while self._bytes > self.budget and self._entries:
                self._drop(next(iter(self._entries)))

    def _drop(self, full: tuple) -> None:
        self._bytes -= self._entries.pop(full)[4]

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0


FACTOR_CACHE = FactorCache(budget=128 << 20)

__all__ = ["FACTOR_CACHE", "FactorCache"]
