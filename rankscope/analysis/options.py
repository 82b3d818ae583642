"""How to analyse: :class:`AnalysisOptions`, checked when made (a bad value is a :class:`UsageProblem`)."""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field

from ..core.dense import DEFAULT_MEMORY_BUDGET
from ..core.errors import UsageProblem
from ..measures import base_relative as BR
from ..measures import metrics as M


def default_max_memory() -> int | None:
    """Half of the machine's physical memory (None where the platform does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (ValueError, OSError, AttributeError):
        return None


@dataclass(frozen=True)
class AnalysisOptions:
    """How to analyse: metric parameters, scaling, the dense path and a layer filter."""

    thresholds: tuple[float, ...] = M.DEFAULT_THRESHOLDS
    energies: tuple[float, ...] = M.DEFAULT_ENERGIES
    rel_thresholds: tuple[float, ...] = M.DEFAULT_REL_THRESHOLDS
    unscaled: bool = False
    dense: bool = False
    dense_dtype: str = "float64"
    device: str = "auto"
    layers: str | None = None
    memory_budget: int = DEFAULT_MEMORY_BUDGET
    collapse_threshold: float = 0.9
    max_memory: int | None = field(default_factory=lambda: default_max_memory())
    # a truncated spectrum of the top K σ of each dense layer wider than K + 10 (core.lowrank); None: exact
    top_k: int | None = None
    # against --base (measures.base_relative): intruder dimensions on (True), off (False), or where cheap (None:
    # min(m, n) ≤ 2048 on the CPU, every layer on CUDA); among the top intruder_k with threshold intruder_epsilon;
    # amplification_k caps the amplification factor's k for updates without a rank bound (full fine-tunes)
    intruders: bool | None = None
    # False: a base (--base) only forms the updates that need it (DoRA, IA3, OFT, full fine-tunes) and no layer is
    # measured against it — the spectrum alone, one dense SVD per dense layer
    base_measures: bool = True
    intruder_k: int = BR.DEFAULT_INTRUDER_K
    intruder_epsilon: float = BR.DEFAULT_INTRUDER_EPSILON
    amplification_k: int = BR.DEFAULT_AMPLIFICATION_K

    def __post_init__(self) -> None:
        for name in ("thresholds", "energies", "rel_thresholds"):  # a single number is a one-item tuple
            value = getattr(self, name)
            object.__setattr__(self, name, (float(value),) if isinstance(value, (int, float)) else tuple(value))
        for p in self.energies:
            if not 0.0 < p <= 1.0:
                raise UsageProblem(f"energies: energy fraction {p} is not in (0, 1]", argument="energies")
        for value in self.thresholds:
            if not math.isfinite(value) or value < 0:
                raise UsageProblem(f"thresholds: threshold {value} must be a finite number ≥ 0", argument="thresholds")
        for value in self.rel_thresholds:  # σ > ρ·σ₁ counts nothing from ρ = 1 on
            if not 0 <= value < 1:
                raise UsageProblem(f"rel_thresholds: ratio {value} must be in [0, 1)", argument="rel_thresholds")
        top_k = self.top_k
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise UsageProblem(f"top_k must be a whole number ≥ 1, found {top_k!r}", argument="top_k")
        if not isinstance(self.base_measures, bool):
            raise UsageProblem(f"base_measures must be True or False, found {self.base_measures!r}",
                               argument="base_measures")  # fmt: skip
        for name in ("intruder_k", "amplification_k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UsageProblem(f"{name} must be a whole number ≥ 1, found {value!r}", argument=name)
        if not (isinstance(self.intruder_epsilon, (int, float)) and 0 < self.intruder_epsilon <= 1):
            raise UsageProblem(
                f"intruder_epsilon must be a cosine in (0, 1], found {self.intruder_epsilon!r}",
                argument="intruder_epsilon",
            )
        if self.layers:
            try:
                re.compile(self.layers)
            except re.error as exc:
                message = f"layers {self.layers!r} is not a valid regular expression ({exc})"
                raise UsageProblem(message, argument="layers") from exc


__all__ = ["AnalysisOptions", "default_max_memory"]
