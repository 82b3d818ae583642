"""Round-3/4/6 report timings (issue 15's report targets): `rankscope report` of the 11 bundled adapters and of one
8B-shaped LoRA r=16, against `rankscope spectrum` of the same file, in one or more source trees, interleaved.

    python benchmarks/round3_report.py [--repeats 3] [--tree NAME=DIR ...]

Each command runs as a fresh CLI process under ``/usr/bin/time`` (wall and user CPU, children included), from
the tree's folder (``python -m rankscope.cli``: the tree's own ``rankscope`` package is imported, unless an
editable install's finder takes precedence). ``--jobs 1`` rows draw the figures in one process (round 6: the
default is one process per core). ``python -c
"import torch"`` is timed in the same loop; the targets are stated as CLI wall minus that. Prints a Markdown
table of medians (for ``reports/benchmarks.md``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from adapters import LLAMA3_8B, write_lora  # noqa: E402

EXAMPLES = HERE.parent / "examples" / "checkpoints"


def commands(lora: Path, out: Path) -> dict[str, list[str]]:
    demo = sorted(str(p) for p in (EXAMPLES / "adapters").iterdir() if p.is_dir())
    base = ["--base", str(EXAMPLES / "tiny-base")]
    report = ["-m", "rankscope.cli", "report"]
    table = {
        # formats named explicitly: the default changed from pdf,png to pdf in round 4
        "demo report (--figures pdf,png)": [*report, *demo, *base, "-o", str(out / "d1"), "--figures", "pdf,png"],
        "demo report (--figures pdf)": [*report, *demo, *base, "-o", str(out / "d2"), "--figures", "pdf"],
        "demo report (--figures pdf --jobs 1)": [*report, *demo, *base, "-o", str(out / "d4"), "--jobs", "1"],
        "demo report (--figures none)": [*report, *demo, *base, "-o", str(out / "d3"), "--figures", "none"],
        "8B LoRA report (--figures pdf,png)": [*report, str(lora), "-o", str(out / "l1"), "--figures", "pdf,png"],
        "8B LoRA report (--figures pdf)": [*report, str(lora), "-o", str(out / "l3"), "--figures", "pdf"],
        "8B LoRA report (--figures pdf --jobs 1)": [*report, str(lora), "-o", str(out / "l4"), "--jobs", "1"],
        "8B LoRA report (--figures none)": [*report, str(lora), "-o", str(out / "l2"), "--figures", "none"],
    }
    table = {name: [*arguments, "--force", "-q"] for name, arguments in table.items()}
    table["8B LoRA spectrum"] = ["-m", "rankscope.cli", "spectrum", str(lora), "--json", str(out / "s.json"), "-q"]
    table["import torch"] = ["-c", "import torch"]
    return table


def timed(arguments: list[str], cwd: Path) -> tuple[float, float]:
    """(wall, user CPU) seconds of one process, by /usr/bin/time."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as report:
        command = ["/usr/bin/time", "-o", report.name, "-f", "%e %U", sys.executable, *arguments]
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(arguments[:4])} failed in {cwd}: {done.stderr.strip()[-400:]}")
        wall, user = report.read().split()[-2:]
    return float(wall), float(user)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tree", action="append", default=[], metavar="NAME=DIR",
                        help="a source tree to time (default: this one, as 'now')")  # fmt: skip
    args = parser.parse_args()
    trees = dict(item.split("=", 1) for item in args.tree) or {"now": str(HERE.parent)}
    rows: dict[tuple[str, str], list[tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="rankscope-round3-") as tmp:
        root = Path(tmp)
        write_lora(root / "lora-r16", LLAMA3_8B, seed=0)
        table = commands(root / "lora-r16", root / "out")
        (root / "out").mkdir()
        print(f"load average at the start: {os.getloadavg()}", file=sys.stderr)
        for repeat in range(args.repeats):
            for name, arguments in table.items():
                for tree, folder in trees.items():
                    rows.setdefault((name, tree), []).append(timed(arguments, Path(folder)))
                    wall, user = rows[(name, tree)][-1]
                    print(f"{repeat + 1} {tree:8s} {name:32s} {wall:7.2f} s wall {user:7.2f} s user", file=sys.stderr)
        print(f"load average at the end: {os.getloadavg()}", file=sys.stderr)
    torch = {tree: statistics.median(w for w, _ in rows[("import torch", tree)]) for tree in trees}
    print("| command | " + " | ".join(f"{t}: wall / user CPU / wall − import torch" for t in trees) + " |")
    print("|---|" + "---|" * len(trees))
    for name in table:
        cells = []
        for tree in trees:
            runs = rows[(name, tree)]
            wall, user = statistics.median(w for w, _ in runs), statistics.median(u for _, u in runs)
            cells.append(f"{wall:.2f} s / {user:.2f} s / {wall - torch[tree]:.2f} s")
        print(f"| {name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
