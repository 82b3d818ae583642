"""Dense families with ``--base`` (issue 15): ``analyze(load(path, base=…))`` of one layer against
``torch.linalg.svdvals`` of the same float64 ΔW, alternating, wall and CPU time (``time.process_time``).

    python benchmarks/dense_base.py [--families full,ia3] [--layers k_proj,q_proj] [--rounds 2] [--before FILE]

Layer 0's k_proj (1024×4096) and q_proj (4096×4096) of the Llama-3-8B shape, bf16 seeded values (``families.py``'s
files: a full fine-tune ΔW = W − W₀ and a PEFT IA3 adapter, whose file layout PEFT itself gives). The library runs
under ``rankscope.single_threaded()`` as the CLI does; the baseline with torch's threads (materialise + svdvals).
Round 1 has a cold base-SVD cache (a directory of this run's own), later rounds a warm one; the ratio is taken
per round, library ÷ svdvals of the same layer; then the base measures alone (``measure_against_base`` on the
records just made, warm cache) are timed once more: library ≈ spectrum + that, and the spectrum is one svdvals.
``--before FILE``: a previous ``analysis/against_base.py`` (e.g.
``git show HEAD~1:rankscope/analysis/against_base.py > /tmp/old.py``) timed the same way in the same run.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import families  # noqa: E402

SHAPES = {"k_proj": "model.layers.0.self_attn.k_proj", "q_proj": "model.layers.0.self_attn.q_proj"}


def _write(root: Path, names: list[str], modules: tuple[str, ...]) -> tuple[Path, dict[str, Path]]:
    from peft import IA3Config

    base, found = families.dense_families(root, modules, {"full"} if "full" in names else {"__none__"})
    out = {"full": next(iter(found.values()))} if "full" in names else {}
    if "ia3" in names:
        out["ia3"] = families.write_peft(
            root / "ia3", IA3Config(target_modules=list(modules), feedforward_modules=[]), layers=1
        )
    return base, out


def _old_measure(path: Path):
    """``measure_against_base`` of another against_base.py, imported as a module of rankscope.analysis."""
    spec = importlib.util.spec_from_file_location("rankscope.analysis._against_base_before", path)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "rankscope.analysis"
    spec.loader.exec_module(module)
    return module.measure_against_base


def _timed(function) -> tuple[object, float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    result = function()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--families", default="full,ia3")
    parser.add_argument("--layers", default="k_proj,q_proj")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--before", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    import rankscope

    analyze_module = importlib.import_module("rankscope.analysis.analyze")  # the module, not the function

    names, layers = args.families.split(","), args.layers.split(",")
    current = analyze_module.measure_against_base
    variants = {"after": current} | ({"before": _old_measure(args.before)} if args.before else {})
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.environ["RANKSCOPE_CACHE"] = str(root / "cache")
        base, paths = _write(root, names, tuple(layers))
        for family, path in paths.items():
            with rankscope.single_threaded():
                checkpoint = rankscope.load(path, base=base)
            for short in layers:
                name = SHAPES[short]
                layer = next(layer for layer in checkpoint.layers if layer.name == name)
                for round_ in range(args.rounds):
                    for variant, measure in variants.items():
                        if round_ == 0 and variant == "before":  # both variants' cold round: their own caches
                            os.environ["RANKSCOPE_CACHE"] = str(root / "cache-before")
                        analyze_module.measure_against_base = measure

                        def library(name=name, checkpoint=checkpoint):
                            with rankscope.single_threaded():
                                return rankscope.analyze(checkpoint, layers=f"^{re.escape(name)}$")

                        def baseline(update=layer.update):
                            return torch.linalg.svdvals(update.materialize(torch.float64))

                        order = (library, baseline) if round_ % 2 == 0 else (baseline, library)
                        timings = {}
                        for function in order:
                            result, wall, cpu = _timed(function)
                            timings[function.__name__] = (wall, cpu)
                            if function is library:
                                record, analysis = result[0], result
                            else:
                                sigma = result
                        # the base measures alone, again (warm cache): the part this benchmark is about, less
                        # exposed to the load than the spectrum's svdvals (whose threads spin when a core is taken)
                        with rankscope.single_threaded():
                            selected = analysis.checkpoint
                            _, base_wall, base_cpu = _timed(
                                lambda m=measure, a=analysis, c=selected: m(c, c.layers, a.layers, a.options)
                            )
                        analyze_module.measure_against_base = current
                        os.environ["RANKSCOPE_CACHE"] = str(root / "cache")
                        error = float(
                            ((torch.tensor(record.singular_values, dtype=torch.float64) - sigma).abs() / sigma[0]).max()
                        )
                        row = {"family": family, "layer": short, "shape": list(layer.update.shape), "round": round_,
                               "cache": "cold" if round_ == 0 else "warm", "variant": variant,
                               "library_wall": timings["library"][0], "library_cpu": timings["library"][1],
                               "svdvals_wall": timings["baseline"][0], "svdvals_cpu": timings["baseline"][1],
                               "sigma_error": error, "base": record.base}  # fmt: skip
                        row["ratio_wall"] = row["library_wall"] / row["svdvals_wall"]
                        row["ratio_cpu"] = row["library_cpu"] / row["svdvals_cpu"]
                        row |= {"base_wall": base_wall, "base_cpu": base_cpu}
                        row["base_share_cpu"] = base_cpu / row["svdvals_cpu"]
                        rows.append(row)
                        print(f"{family:5} {short} {row['cache']:4} {variant:6} library {row['library_wall']:7.2f} s "
                              f"(cpu {row['library_cpu']:7.2f}) svdvals {row['svdvals_wall']:7.2f} s (cpu "
                              f"{row['svdvals_cpu']:7.2f})  ratio wall {row['ratio_wall']:.2f}× cpu "
                              f"{row['ratio_cpu']:.2f}×  base alone {base_wall:.2f} s (cpu {base_cpu:.2f}, "
                              f"{row['base_share_cpu']:.3f} of svdvals)  σ err {error:.1e}", flush=True)  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
