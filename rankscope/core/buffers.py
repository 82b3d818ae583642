"""float64 buffers kept by name and grown as needed: scratch memory reused from one step to the next.

A fresh large tensor per step pays its page faults each time (glibc hands large allocations back to the system
on free), and a fresh small one fragments the heap; a buffer that is only grown costs neither after its first use.
"""

from __future__ import annotations

import math

import torch


class ReusedBuffers:
    """Named float64 buffers: :meth:`take` returns a view of ``shape`` on the buffer of that name, grown (and
    replaced) where it is too small or on another device. Views of one name alias: the caller uses one up before
    taking it again."""

    def __init__(self) -> None:
        self._held: dict[object, torch.Tensor] = {}

    def take(self, name: object, shape: tuple[int, ...], device: torch.device | str) -> torch.Tensor:
        numel = math.prod(shape)
        held = self._held.get(name)
        if held is None or held.numel() < numel or held.device != torch.device(device):
            held = self._held[name] = torch.empty(numel, dtype=torch.float64, device=device)
        return held[:numel].view(shape)


__all__ = ["ReusedBuffers"]
