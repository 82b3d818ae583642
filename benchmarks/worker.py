"""Measurements that run in a fresh process: ``python benchmarks/worker.py TASK JSON_ARGS`` prints one JSON object.

The driver (``run.py``) starts one worker per task so that every measurement sees the same process state (no
other task's imports, caches or freed memory). Tasks:

- ``inproc``: for ``repeats`` rounds, interleaved: the I/O floor (safetensors reads every tensor, nothing else),
  the floor (read + upcast to float32 + one pass over every element; at 1 thread and at torch's default, the
  faster taken) and the library call ``rankscope.analyze(rankscope.load(path))`` inside ``rankscope.single_threaded()``
  as the CLI runs it (with load and analyse apart).
- ``dense``: ΔW = s·B·A materialised in float64 and ``torch.linalg.svdvals``, per listed module, timed; the
  spectra come back for the σ₁ check against rankscope's.
- ``dense_path``: rankscope's own dense path (``analyze(..., dense=True)``) on the listed modules, per shape.
- ``weightwatcher``: ``WeightWatcher().analyze(model=DIR, peft=True)`` on an adapter directory, timed.
- ``methods``: which QR path rankscope took for each factor of an adapter (CholeskyQR or the fallback).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch


def _tensor_files(path: Path) -> list[Path]:
    return sorted(path.rglob("*.safetensors")) if path.is_dir() else [path]


def _read_all(files: list[Path]) -> int:
    from safetensors import safe_open

    count = 0
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                handle.get_tensor(key)
                count += 1
    return count


def _floor_pass(files: list[Path]) -> float:
    from safetensors import safe_open

    total = 0.0
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118
                total += float(handle.get_tensor(key).float().sum())
    return total


def _timed(function, *args) -> float:
    start = time.perf_counter()
    function(*args)
    return time.perf_counter() - start


def _opted_in(rankscope):
    """The library's single-threaded mode, as the CLI runs it (a rankscope that predates the opt-in, measured with
    --before, always ran so)."""
    import contextlib

    return rankscope.single_threaded() if hasattr(rankscope, "single_threaded") else contextlib.nullcontext()


def inproc(path: str, repeats: int, threads: int | None = None) -> dict:
    import rankscope

    if threads is not None:
        torch.set_num_threads(threads)
    files = _tensor_files(Path(path))
    default_threads = torch.get_num_threads()
    names = ("io", "floor_1", "floor_default", "library", "load", "analyze")
    rows: dict[str, list[float]] = {name: [] for name in names}
    _read_all(files), _floor_pass(files), rankscope.analyze(rankscope.load(path))  # warm the page cache and imports
    for _ in range(repeats):
        rows["io"].append(_timed(_read_all, files))
        torch.set_num_threads(1)
        rows["floor_1"].append(_timed(_floor_pass, files))
        torch.set_num_threads(default_threads)
        rows["floor_default"].append(_timed(_floor_pass, files))
        with _opted_in(rankscope):
            start = time.perf_counter()
            checkpoint = rankscope.load(path)
            loaded = time.perf_counter()
            analysis = rankscope.analyze(checkpoint)
            done = time.perf_counter()
        rows["library"].append(done - start)
        rows["load"].append(loaded - start)
        rows["analyze"].append(done - loaded)
    return {
        "times": rows,
        "layers": len(analysis),
        "threads": default_threads,
        "rankscope": getattr(rankscope, "__file__", "?"),
    }


def _factors(path: Path, module: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    from safetensors import safe_open

    config = json.loads((path / "adapter_config.json").read_text())
    prefix = f"base_model.model.{module}"
    with safe_open(str(path / "adapter_model.safetensors"), framework="pt") as handle:
        a = handle.get_tensor(f"{prefix}.lora_A.weight")
        b = handle.get_tensor(f"{prefix}.lora_B.weight")
    return a, b, config["lora_alpha"] / config["r"]


def dense(path: str, modules: list[str]) -> dict:
    """The dense baseline: materialise ΔW = s·B·A in float64, then all its singular values."""
    out = {}
    for module in modules:
        a, b, scale = _factors(Path(path), module)
        start = time.perf_counter()
        delta = (scale * b.double()) @ a.double()
        sigma = torch.linalg.svdvals(delta)
        seconds = time.perf_counter() - start
        out[module] = {"seconds": seconds, "shape": list(delta.shape), "sigma": sigma[: a.shape[0]].tolist()}
        del delta
    return out


def rankscope_spectra(path: str) -> dict:
    """rankscope's singular values of every layer of ``path`` (for the check against the dense ones)."""
    import rankscope

    return {r.name: r.singular_values for r in rankscope.analyze(rankscope.load(path))}


def dense_path(path: str, modules: list[str], device: str) -> dict:
    """rankscope's own dense path (--dense) on each listed module, one layer per call."""
    import re

    import rankscope

    checkpoint = rankscope.load(path)
    out = {}
    for module in modules:
        start = time.perf_counter()
        with _opted_in(rankscope):
            (record,) = rankscope.analyze(checkpoint, dense=True, device=device, layers=f"^{re.escape(module)}$")
        out[module] = {"seconds": time.perf_counter() - start, "shape": record.matrix_shape, "exact": record.exact}
    return out


def weightwatcher(path: str) -> dict:
    """WeightWatcher's ``analyze(peft=True)`` on the adapter directory ``path`` (forms B·A densely, ignores α/r)."""
    import logging
    import warnings

    try:
        import weightwatcher as ww
    except ImportError as exc:
        return {"missing": f"weightwatcher is not installed ({exc})"}
    logging.disable(logging.WARNING)
    warnings.simplefilter("ignore")
    start = time.perf_counter()
    details = ww.WeightWatcher().analyze(model=path, peft=True)
    seconds = time.perf_counter() - start
    rows = {str(row["name"]): float(row["sv_max"]) for _, row in details.iterrows()}
    return {"seconds": seconds, "sv_max": rows, "version": getattr(ww, "__version__", "?")}


def methods(path: str) -> dict:
    """How many factors took CholeskyQR and how many the Householder fallback."""
    import rankscope
    from rankscope.core.factored import r_factors

    layers = [layer for layer in rankscope.load(path).layers if layer.update is not None]
    factors = [f for layer in layers for f in (layer.update.left, layer.update.right.mT)]
    _, how = r_factors(factors)
    return {name: how.count(name) for name in sorted(set(how))}


TASKS = {
    "inproc": inproc,
    "dense": dense,
    "rankscope_spectra": rankscope_spectra,
    "dense_path": dense_path,
    "weightwatcher": weightwatcher,
    "methods": methods,
}

if __name__ == "__main__":
    task, arguments = sys.argv[1], json.loads(sys.argv[2])
    result = TASKS[task](**arguments)
    sys.stdout.write("\n@@RESULT@@" + json.dumps(result) + "\n")
