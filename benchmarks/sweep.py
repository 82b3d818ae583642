"""Sweep throughput: N small adapters serially, on the local process pool and on a local Ray runtime.

    python benchmarks/sweep.py                 # 1,000 adapters; pool and Ray at 1, 2, … up to the CPU count
    python benchmarks/sweep.py --count 200     # a shorter run
    python benchmarks/sweep.py --out FILE.md   # also write the markdown table to FILE.md

Each adapter is a PEFT LoRA of a small Llama-like shape (4 blocks × q,k,v,o; hidden 64, or ``--hidden``;
r ∈ {4, 8, 16}), written once into a temporary folder. Every configuration runs ``rankscope.sweep`` over all of
them end to end, writing the Parquet tables: the pool's spawn and the Ray runtime's start are included (that is
what a user waits for); Ray's start alone is timed too. It checks that every configuration gives the serial run's
rows. The scaling curve is the speed-up over serial against the worker count.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import rankscope
from tests.factories import lora_config, random_factors, write_lora


def write_zoo(root: Path, count: int, hidden: int = 64) -> None:
    for seed in range(count):
        rank = (4, 8, 16)[seed % 3]
        factors = {
            f"model.layers.{i}.self_attn.{name}": random_factors(hidden, hidden, rank, 100 * seed + 10 * i + j)
            for i in range(4)
            for j, name in enumerate(("q_proj", "k_proj", "v_proj", "o_proj"))
        }
        write_lora(root / f"lora-{seed:04d}", factors, lora_config(r=rank, lora_alpha=2 * rank))


def timed(label: str, zoo: Path, out: Path, **options) -> tuple[str, float, pd.DataFrame]:
    start = time.perf_counter()
    layers = rankscope.sweep([zoo], out, **options)
    return label, time.perf_counter() - start, layers


def ray_start_seconds(cpus: int) -> float:
    import ray

    start = time.perf_counter()
    ray.init(num_cpus=cpus, include_dashboard=False, logging_level="ERROR")
    seconds = time.perf_counter() - start
    ray.shutdown()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--hidden", type=int, default=64, help="the adapters' width (default 64)")
    parser.add_argument("--no-ray", action="store_true")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    workers = sorted({1, 2, *range(4, cores + 1, 4), cores} & set(range(1, cores + 1)))
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        write_zoo(root / "zoo", args.count, args.hidden)
        runs = [timed("serial", root / "zoo", root / "serial", jobs=1)]
        for jobs in workers[1:] if workers[0] == 1 else workers:
            runs.append(timed(f"pool, {jobs} workers", root / "zoo", root / f"pool{jobs}", jobs=jobs))
        ray_start = None
        if not args.no_ray:
            ray_start = ray_start_seconds(cores)
            for jobs in workers:
                runs.append(timed(f"Ray, {jobs} CPUs", root / "zoo", root / f"ray{jobs}", ray=True, jobs=jobs))
    reference = runs[0][2].sort_values(["id", "layer"]).reset_index(drop=True)
    for label, _, layers in runs[1:]:
        got = layers.sort_values(["id", "layer"]).reset_index(drop=True)
        pd.testing.assert_frame_equal(got, reference, check_exact=False, rtol=1e-12, obj=label)
    serial = runs[0][1]
    lines = [
        f"Sweep of {args.count} LoRA adapters (4 blocks × q,k,v,o, {args.hidden}×{args.hidden}, r ∈ 4/8/16; "
        f"{len(reference)} layer rows) "
        f"on {cores} CPUs ({platform.processor() or platform.machine()}, Python {platform.python_version()}); "
        "wall time of `rankscope.sweep` end to end (pool spawn / Ray start included, Parquet written)."
        + (f" Ray's start alone: {ray_start:.1f} s." if ray_start is not None else ""),
        "",
        "| configuration | wall s | adapters/s | speed-up over serial |",
        "|---|---:|---:|---:|",
    ]
    for label, seconds, _ in runs:
        lines.append(f"| {label} | {seconds:.1f} | {args.count / seconds:.0f} | {serial / seconds:.2f}× |")
    lines.append("")
    lines.append("Every configuration gave the serial run's rows (compared to 1e-12).")
    text = "\n".join(lines)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
