"""Sweep throughput: N small adapters serially, on the local process pool and on a local Ray runtime.

    python benchmarks/sweep.py                 # 1,000 adapters; pool and Ray at 1, 2, … up to the CPU count
    python benchmarks/sweep.py --count 200     # a shorter run
    python benchmarks/sweep.py --count 100,300,1000   # the scaling curve in the number of adapters too
    python benchmarks/sweep.py --out FILE.md   # also write the markdown table to FILE.md

Each adapter is a PEFT LoRA of a small Llama-like shape (4 blocks × q,k,v,o; hidden 64, or ``--hidden``;
r ∈ {4, 8, 16}), written once into a temporary folder. Every configuration runs ``rankscope.sweep`` over all of
them end to end, writing the Parquet tables: the pool's spawn and the Ray runtime's start are included (that is
what a user waits for); Ray's start alone is timed too. It checks that every configuration gives the serial run's
rows. The scaling curve is the speed-up over serial against the worker count (and, with several counts, against
the number of adapters). On a machine shared with other jobs wall time alone misleads, so each run also records
the CPU seconds of this process and of its reaped children (the pool's workers; Ray's processes only as far as they
are reaped) and the 1-minute load average before and after.
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


def timed(label: str, inputs: list[Path], out: Path, **options) -> dict:
    """One end-to-end ``rankscope.sweep``: wall seconds, CPU seconds (this process; reaped children), load."""
    load_before = os.getloadavg()[0]
    cpu_before = os.times()
    start = time.perf_counter()
    layers = rankscope.sweep(inputs, out, **options)
    wall = time.perf_counter() - start
    cpu = os.times()
    failed = layers.checkpoints[layers.checkpoints["status"] == "error"]
    if len(failed):  # say so rather than compare tables that cannot match
        print(f"{label}, {len(inputs)} adapters: {len(failed)} failed, e.g. {failed['error'].iloc[0]}", flush=True)
    return {
        "failed": len(failed),
        "label": label,
        "count": len(inputs),
        "wall": wall,
        "cpu_self": (cpu.user - cpu_before.user) + (cpu.system - cpu_before.system),
        "cpu_children": (cpu.children_user - cpu_before.children_user)
        + (cpu.children_system - cpu_before.children_system),
        "load": (load_before, os.getloadavg()[0]),
        "layers": layers,
    }


def ray_start_seconds(cpus: int) -> float:
    import ray

    start = time.perf_counter()
    ray.init(num_cpus=cpus, include_dashboard=False, logging_level="ERROR")
    seconds = time.perf_counter() - start
    ray.shutdown()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", default="1000", help="adapters per run; a comma list for a curve (100,300,1000)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--hidden", type=int, default=64, help="the adapters' width (default 64)")
    parser.add_argument("--no-ray", action="store_true")
    args = parser.parse_args()
    counts = sorted({int(c) for c in args.count.split(",")})
    cores = os.cpu_count() or 1
    workers = sorted({1, 2, *range(4, cores + 1, 4), cores} & set(range(1, cores + 1)))
    runs: list[dict] = []
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        write_zoo(root / "zoo", max(counts), args.hidden)
        adapters = sorted((root / "zoo").iterdir())
        ray_start = None if args.no_ray else ray_start_seconds(cores)
        for count in counts:
            inputs, tag = adapters[:count], f"{count}"
            group = [timed("serial", inputs, root / f"serial{tag}", jobs=1)]
            for jobs in workers[1:] if workers[0] == 1 else workers:
                group.append(timed(f"pool, {jobs} workers", inputs, root / f"pool{jobs}-{tag}", jobs=jobs))
            if not args.no_ray:
                for jobs in workers:
                    group.append(timed(f"Ray, {jobs} CPUs", inputs, root / f"ray{jobs}-{tag}", ray=True, jobs=jobs))
            reference = group[0]["layers"].sort_values(["id", "layer"]).reset_index(drop=True)
            for run in group[1:]:
                if run["failed"] or group[0]["failed"]:
                    continue
                got = run["layers"].sort_values(["id", "layer"]).reset_index(drop=True)
                pd.testing.assert_frame_equal(got, reference, check_exact=False, rtol=1e-12, obj=run["label"])
            for run in group:
                run["speedup"] = group[0]["wall"] / run["wall"]
                run["rows"] = len(run.pop("layers"))
                run["label"] += f" ({run['failed']} failed)" if run["failed"] else ""
                print(_line(run), flush=True)
            runs.extend(group)
    lines = [
        f"Sweeps of {', '.join(map(str, counts))} LoRA adapters (4 blocks × q,k,v,o, {args.hidden}×{args.hidden}, "
        f"r ∈ 4/8/16; 16 layer rows each) "
        f"on {cores} CPUs ({platform.processor() or platform.machine()}, Python {platform.python_version()}); "
        "wall time of `rankscope.sweep` end to end (pool spawn / Ray start included, Parquet written); CPU s = this "
        "process + its reaped children; load = 1-minute load average before → after."
        + (f" Ray's start alone: {ray_start:.1f} s." if ray_start is not None else ""),
        "",
        "| adapters | configuration | wall s | adapters/s | speed-up over serial | CPU s (self + children) | load |",
        "|---:|---|---:|---:|---:|---:|---|",
    ]
    lines += [_line(run) for run in runs]
    lines.append("")
    lines.append(
        "Every configuration without failures gave the serial run's rows (compared to 1e-12)."
        if not any(run["failed"] for run in runs)
        else "Configurations marked failed had error rows (printed above) and were not compared."
    )
    text = "\n".join(lines)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


def _line(run: dict) -> str:
    return (
        f"| {run['count']} | {run['label']} | {run['wall']:.1f} | {run['count'] / run['wall']:.0f} | "
        f"{run['speedup']:.2f}× | {run['cpu_self']:.1f} + {run['cpu_children']:.1f} | "
        f"{run['load'][0]:.1f} → {run['load'][1]:.1f} |"
    )


if __name__ == "__main__":
    main()
