"""Round-2 targets (issue 15): CLI wall times and peak RSS of spectrum / compare / report on 8B-shaped adapters,
unloaded and with one busy competing process per core, plus σ of sampled BoRA and composition layers against a
dense float64 SVD — ratios within one run (the machine is shared: absolute times drift).

    python benchmarks/round2.py [--repeats 3] [--no-load] [--no-report] [--demo]

Prints a Markdown section (for ``reports/benchmarks.md``). Times are CLI wall time minus ``python -c "import
torch"`` in the same run, medians of ``--repeats`` runs, interleaved.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from adapters import LLAMA3_8B, file_bytes, write_bora, write_composition, write_lora  # noqa: E402
from run import timed_process  # noqa: E402

MB = 1e6
BUSY = "while True: pass"


def commands(root: Path, out: Path, demo: bool, report: bool) -> dict[str, list[str]]:
    cli: list[str] = []  # arguments of rankscope.cli.main
    lora, other, bora, comp = root / "lora-r16", root / "lora-r16-b", root / "bora-r8-b16", root / "comp-k3-r8"
    table = {
        "spectrum LoRA r=16": [*cli, "spectrum", str(lora), "--json", str(out / "s.json"), "-q"],
        "spectrum BoRA r=8 b=16": [*cli, "spectrum", str(bora), "--json", str(out / "b.json"), "-q"],
        "spectrum composition k=3": [*cli, "spectrum", str(comp), "--json", str(out / "c.json"), "-q"],
        "compare LoRA × 2": [*cli, "compare", str(lora), str(other), "--json", str(out / "cmp.json"), "-q"],
    }
    if report:
        table["report LoRA (figures)"] = [*cli, "report", str(lora), "-o", str(out / "r1"), "--force", "-q"]
        table["report LoRA (--figures none)"] = [
            *cli, "report", str(lora), "-o", str(out / "r2"), "--force", "-q", "--figures", "none"
        ]  # fmt: skip
    if demo:
        examples = sorted(str(p) for p in (HERE.parent / "examples/checkpoints/adapters").iterdir() if p.is_dir())
        base = str(HERE.parent / "examples/checkpoints/tiny-base")
        table["report 11-adapter demo"] = [*cli, "report", *examples, "--base", base, "-o", str(out / "r3"),
                                           "--force", "-q"]  # fmt: skip
    return table


# the CLI in a fresh process that has imported torch already: wall and CPU seconds of the command alone (the
# import of torch, 1.7–2.6 s on these shared cores, is what made "CLI − import torch" noisy), and its peak RSS
IN_PROCESS = """
import json, resource, sys, time
import torch
wall, cpu = time.perf_counter(), time.process_time()
from rankscope.cli import main
try:
    main(sys.argv[1:], standalone_mode=False)
finally:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu,
                      "rss": usage.ru_maxrss * 1024}), file=sys.stderr)
"""


def run_cli(arguments: list[str], attempts: int = 3) -> tuple[float, float, float]:
    """(wall, CPU, peak RSS) of one rankscope command after ``import torch``; again after a pause where it fails
    (the tree is edited by others while this runs)."""
    for attempt in range(attempts):
        done = subprocess.run([sys.executable, "-c", IN_PROCESS, *arguments], capture_output=True, text=True)
        lines = [line for line in done.stderr.splitlines() if line.startswith('{"wall"')]
        if done.returncode == 0 and lines:
            result = json.loads(lines[-1])
            return result["wall"], result["cpu"], result["rss"]
        print(f"retrying {' '.join(arguments[:2])}: {done.stderr.strip()[-300:]}", file=sys.stderr)
        if attempt < attempts - 1:
            time.sleep(20)
    raise RuntimeError(f"{' '.join(arguments)} failed")


def measure(table: dict[str, list[str]], repeats: int) -> dict[str, list[tuple[float, float, float]]]:
    rows: dict[str, list[tuple[float, float, float]]] = {}
    for _ in range(repeats):
        for name, arguments in table.items():
            rows.setdefault(name, []).append(run_cli(arguments))
    return rows


def medians(rows: dict) -> dict[str, tuple[float, float, float]]:
    """Median wall and CPU seconds, largest peak RSS."""
    return {k: (statistics.median(r[0] for r in v), statistics.median(r[1] for r in v), max(r[2] for r in v))
            for k, v in rows.items()}  # fmt: skip


def exactness(root: Path) -> dict[str, float]:
    """max relative σ error (σ ≥ 1e-6·σ₁) over sampled layers of BoRA and the composition vs a dense float64 SVD."""
    import torch

    import rankscope

    out = {}
    for key, path in (("BoRA", root / "bora-r8-b16"), ("composition", root / "comp-k3-r8")):
        with rankscope.single_threaded():
            checkpoint = rankscope.load(path)
            analysis = rankscope.analyze(checkpoint)
        worst = 0.0
        pairs = list(zip(checkpoint.layers, analysis, strict=True))
        small = [(layer, record) for layer, record in pairs if layer.update.shape == (1024, 4096)][:4]  # k, v
        for layer, record in small:  # dense SVDs of the larger shapes take minutes here
            dense = torch.linalg.svdvals(layer.update.materialize())
            ours = torch.tensor(record.singular_values, dtype=torch.float64)
            keep = dense[: len(ours)] >= 1e-6 * dense[0]
            worst = max(worst, float(((ours - dense[: len(ours)]).abs() / dense[: len(ours)])[keep].max()))
        out[key] = worst
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--loaded-repeats", type=int, default=2)
    parser.add_argument("--no-load", action="store_true", help="skip the runs beside busy processes")
    parser.add_argument("--no-report", action="store_true", help="skip the report runs")
    parser.add_argument("--demo", action="store_true", help="also the 11-adapter demo report")
    args = parser.parse_args()
    # an installed rankscope runs from cached bytecode; under PYTHONDONTWRITEBYTECODE=1 (this machine's setting)
    # every command would compile its sources again (~0.1–0.2 s): compile them once, as an install does
    import compileall

    import rankscope

    compileall.compile_dir(str(Path(rankscope.__file__).parent), quiet=1)
    with tempfile.TemporaryDirectory(prefix="rankscope-round2-") as tmp:
        root, out = Path(tmp), Path(tmp) / "out"
        out.mkdir()
        write_lora(root / "lora-r16", LLAMA3_8B, seed=0)
        write_lora(root / "lora-r16-b", LLAMA3_8B, seed=1)
        write_bora(root / "bora-r8-b16", LLAMA3_8B)
        write_composition(root / "comp-k3-r8", LLAMA3_8B)
        sizes = {k: file_bytes(root / k) for k in ("lora-r16", "bora-r8-b16", "comp-k3-r8")}
        table = commands(root, out, args.demo, not args.no_report)
        load_start = os.getloadavg()
        unloaded = medians(measure(table, args.repeats))
        print(f"unloaded: {unloaded}", file=sys.stderr, flush=True)
        loaded = None
        if not args.no_load:
            busy = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(os.cpu_count() or 2)]
            try:
                loaded = medians(measure({k: v for k, v in table.items() if "demo" not in k}, args.loaded_repeats))
            finally:
                for process in busy:
                    process.kill()
                    process.wait()
        errors = exactness(root)
    torch_rss = statistics.median(timed_process([sys.executable, "-c", "import torch"])[1] for _ in range(3))
    print(f"load average at start {load_start}, at end {os.getloadavg()}; file sizes (MB): "
          + ", ".join(f"{k} {v / MB:.0f}" for k, v in sizes.items()))  # fmt: skip
    print()
    print("| command (after `import torch`) | wall | CPU | peak RSS − torch's | loaded wall | loaded CPU "
          "| loaded ÷ unloaded (wall) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for name, (wall, cpu, rss) in unloaded.items():
        if loaded and name in loaded:
            lw, lc, _ = loaded[name]
            extra = f"{lw:.2f} s | {lc:.2f} s | {lw / wall:.2f}×"
        else:
            extra = "— | — | —"
        print(f"| {name} | {wall:.2f} s | {cpu:.2f} s | {(rss - torch_rss) / MB:.0f} MB | {extra} |")
    lora, bora = unloaded["spectrum LoRA r=16"], unloaded["spectrum BoRA r=8 b=16"]
    pair = unloaded["compare LoRA × 2"]
    print()
    print(f"compare ÷ two spectra: {pair[0] / (2 * lora[0]):.2f}× wall, {pair[1] / (2 * lora[1]):.2f}× CPU")
    print(f"BoRA ÷ LoRA spectrum: {bora[0] / lora[0]:.2f}× wall, {bora[1] / lora[1]:.2f}× CPU; "
          f"peak RSS BoRA − LoRA: {(bora[2] - lora[2]) / MB:.0f} MB")  # fmt: skip
    if "report LoRA (figures)" in unloaded:
        for name in ("report LoRA (figures)", "report LoRA (--figures none)"):
            print(
                f"{name} − spectrum: {unloaded[name][0] - lora[0]:.2f} s wall, {unloaded[name][1] - lora[1]:.2f} s CPU"
            )
    print(
        "σ vs dense float64, max rel. error on 4 sampled 1024×4096 layers: "
        + ", ".join(f"{k} {v:.1e}" for k, v in errors.items())
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
