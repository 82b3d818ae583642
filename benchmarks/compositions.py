"""Issue 15, compositions: the 8B-shaped k=3 r=8 weighted composition (BoostLoRA-style rounds, from
``adapters.write_composition``) — library (``load`` + ``analyze`` inside ``rankscope.single_threaded()``, as the CLI
runs it) against the read-and-upcast floor measured in the same process, round by round.

    python benchmarks/compositions.py [--repeats 5] [--processes 3] [--tree NAME=PATH ...]

Each ``--tree`` is a rankscope source tree (its parent folder of ``rankscope/`` put first on ``PYTHONPATH``; default:
this checkout as ``now``); the trees' processes alternate so that the machine's drift hits them alike. Each process
times, per round: the floor (read every tensor, upcast to float32, one pass: the faster of 1 thread and torch's
default, as ``worker.py`` does), then load and analyze (wall and CPU). Prints medians and the ratio library ÷ floor
per round (median), and σ of 2 sampled 1024×4096 layers (each composite and its 3 components) against a dense
float64 SVD in the last process.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from adapters import LLAMA3_8B, file_bytes, write_composition  # noqa: E402

INNER = r"""
import json, os, sys, time
# the tree under test first: PYTHONPATH alone loses to an editable install's import hook
sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
sys.path[:0] = [os.environ["RANKSCOPE_TREE"], sys.argv[3]]
import torch
import rankscope
from worker import _floor_pass, _tensor_files
from pathlib import Path
path, repeats = sys.argv[1], int(sys.argv[2])
files = _tensor_files(Path(path))
default = torch.get_num_threads()
_floor_pass(files); rankscope.analyze(rankscope.load(path))  # page cache, imports
rows = []
analysis = checkpoint = None
for _ in range(repeats):
    torch.set_num_threads(1); t = time.perf_counter(); _floor_pass(files); one = time.perf_counter() - t
    torch.set_num_threads(default); t = time.perf_counter(); _floor_pass(files); many = time.perf_counter() - t
    analysis = checkpoint = None  # as a caller's loop would drop the previous round's results
    with rankscope.single_threaded():
        wall, cpu = time.perf_counter(), time.process_time()
        checkpoint = rankscope.load(path)
        loaded, loaded_cpu = time.perf_counter(), time.process_time()
        analysis = rankscope.analyze(checkpoint)
        done, done_cpu = time.perf_counter(), time.process_time()
    rows.append({"floor": min(one, many), "library": done - wall, "load": loaded - wall, "analyze": done - loaded,
                 "cpu": done_cpu - cpu, "load_cpu": loaded_cpu - cpu})
error = 0.0
if sys.argv[4] == "check":
    pairs = [(l, r) for l, r in zip(checkpoint.layers, analysis) if l.update.shape == (1024, 4096)][:2]
    for layer, record in pairs:
        for unit, rec in ((layer, record), *zip(layer.components, record.components)):
            dense = torch.linalg.svdvals(unit.update.materialize())
            ours = torch.tensor(rec.singular_values, dtype=torch.float64)
            ref = dense[: len(ours)]
            keep = ref >= 1e-6 * ref[0]
            error = max(error, float(((ours - ref).abs() / ref)[keep].max()))
print("@@" + json.dumps({"rows": rows, "sigma_error": error, "file": rankscope.__file__}))
"""


def run_tree(tree: Path, path: Path, repeats: int, check: bool) -> dict:
    env = dict(os.environ, RANKSCOPE_TREE=str(tree), HF_HUB_OFFLINE="1")
    command = [sys.executable, "-c", INNER, str(path), str(repeats), str(HERE), "check" if check else "-"]
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    marker = done.stdout.rfind("@@")
    if done.returncode != 0 or marker < 0:
        raise RuntimeError(f"{tree}: {done.stderr.strip()[-600:]}")
    return json.loads(done.stdout[marker + 2 :])


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5, help="rounds per process")
    parser.add_argument("--processes", type=int, default=3, help="processes per tree, alternating")
    parser.add_argument("--tree", action="append", default=[], help="NAME=PATH of a folder holding rankscope/")
    parser.add_argument("--path", type=Path, help="an existing composition (default: written to a temp folder)")
    args = parser.parse_args()
    trees = [tuple(t.split("=", 1)) for t in args.tree] or [("now", str(HERE.parent))]
    with tempfile.TemporaryDirectory(prefix="rankscope-comp-") as tmp:
        path = args.path or write_composition(Path(tmp) / "comp-k3-r8", LLAMA3_8B)
        rows: dict[str, list[dict]] = {name: [] for name, _ in trees}
        errors: dict[str, float] = {}
        load_start = os.getloadavg()
        for index in range(args.processes):
            order = trees if index % 2 == 0 else trees[::-1]
            for name, tree in order:
                result = run_tree(Path(tree), path, args.repeats, check=index == args.processes - 1)
                rows[name] += result["rows"]
                if index == args.processes - 1:
                    errors[name] = result["sigma_error"]
                print(f"{name}: process {index + 1} done ({result['file']})", file=sys.stderr, flush=True)
        size = file_bytes(path)
    median = statistics.median
    print(f"8B k=3 r=8 composition, {size / 1e6:.0f} MB, 224 layers; {args.processes} processes × {args.repeats} "
          f"rounds per tree; load average {load_start} → {os.getloadavg()}")  # fmt: skip
    print()
    print("| tree | floor | library (load + analyze) | library CPU (load) | library ÷ floor, median of rounds (min) "
          "| σ vs dense float64 |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for name, values in rows.items():
        ratios = [r["library"] / r["floor"] for r in values]
        ms = {key: 1e3 * median(r[key] for r in values) for key in values[0]}
        print(f"| {name} | {ms['floor']:.0f} ms | {ms['library']:.0f} ms ({ms['load']:.0f} + {ms['analyze']:.0f}) | "
              f"{ms['cpu']:.0f} ms ({ms['load_cpu']:.0f}) | {median(ratios):.1f}× ({min(ratios):.1f}×) | "
              f"{errors.get(name, float('nan')):.1e} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
