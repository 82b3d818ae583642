"""Run rankscope on one (mutated) checkpoint and classify the outcome.

The only acceptable outcomes: a correct analysis (every valid layer's numbers finite), or rankscope's own
error type with a one-line message. Anything else — another exception type, a multi-line message, a hang —
is a failure.
"""

from __future__ import annotations

import math
import signal
from dataclasses import dataclass
from pathlib import Path

import rankscope
from rankscope.core.errors import RankscopeError


@dataclass(frozen=True)
class Outcome:
    kind: str  # "analysed", "refused" (RankscopeError) or "failure"
    detail: str


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout


def _finite(value: object) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    if isinstance(value, list):
        return all(_finite(v) for v in value)
    return True


def run(path: Path, *, timeout: int = 20) -> Outcome:
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(timeout)
    try:
        analysis = rankscope.analyze(rankscope.load(path, threads=1), device="cpu", threads=1)  # as the CLI runs
        for record in analysis:
            if record.valid and not (_finite(record.metrics) and _finite(record.singular_values)):
                return Outcome("failure", f"non-finite numbers in valid layer {record.name}")
        return Outcome("analysed", f"{len(analysis)} layers, {len(analysis.invalid)} invalid")
    except RankscopeError as exc:
        message = str(exc)
        if "\n" in message or not message:
            return Outcome("failure", f"RankscopeError message is not one line: {message!r}")
        return Outcome("refused", message)
    except _Timeout:
        return Outcome("failure", f"no answer within {timeout} s")
    except Exception as exc:  # the point of the harness: anything else is a bug
        return Outcome("failure", f"{type(exc).__name__}: {exc}")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
