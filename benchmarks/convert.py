"""``convert --rule energy:0.95`` against ``spectrum`` on a Llama-3-8B-shaped r=64 LoRA, and the dense ways to resize.

rankscope's conversion takes each layer's truncated SVD from its r×r core, so it should cost about what the
spectrum costs (the issue's target: at most 2×). The dense baselines — PEFT's ``convert_to_lora`` (a dense ΔW and
its SVD per layer, with the module in memory) and kohya's resize (a dense SVD of ΔW = up·down per layer) — are timed on
one layer of each distinct shape and extrapolated to the whole adapter (an 8B base does not fit beside them here).

    python benchmarks/convert.py            # the full 8B shape: 224 layers, and one 14336×4096 dense SVD per method
    python benchmarks/convert.py --quick    # 2 layers of an 8×-narrower model: seconds, to check that it runs
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from adapters import LLAMA3_8B, ModelShape, write_lora

import rankscope
from rankscope.resize.convert import convert

RULE, ENERGY = "energy:0.95", 0.95


CPU: dict[str, float] = {}  # label → CPU seconds of the median call (a shared machine: wall time alone misleads)


def timed(function, repeats: int, label: str | None = None) -> float:
    """The median wall time of ``repeats`` calls, each under rankscope's single-threaded policy (as the CLI runs);
    the CPU time of the same call goes into :data:`CPU` under ``label``."""
    times = []
    for _ in range(repeats):
        cpu = time.process_time()
        start = time.perf_counter()
        with rankscope.single_threaded():
            function()
        times.append((time.perf_counter() - start, time.process_time() - cpu))
    wall, cpu = sorted(times)[len(times) // 2]
    if label is not None:
        CPU[label] = cpu
    return wall


def kohya_resize(a: torch.Tensor, b: torch.Tensor, scale: float) -> int:
    """kohya's resize_lora.py, in short: ΔW = scale·up·down densely, its float32 SVD, the rank for the energy."""
    delta = scale * (b.float() @ a.float())
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    energy = torch.cumsum(s**2, 0) / (s**2).sum()
    k = int((energy < ENERGY).sum()) + 1
    _ = (u[:, :k] * s[:k]).contiguous(), vh[:k].contiguous()
    return k


def peft_convert(a: torch.Tensor, b: torch.Tensor, alpha: float) -> None:
    """PEFT's ``convert_to_lora`` on one LoRA module (the base layer in memory, as it requires)."""
    import warnings

    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.conversion import convert_to_lora

    rank, m, n = a.shape[0], b.shape[0], a.shape[1]
    model = torch.nn.Sequential(torch.nn.Linear(n, m, bias=False))
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, target_modules=["0"]))
    layer = model.base_model.model[0]
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(a.float())
        layer.lora_B["default"].weight.copy_(b.float())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "converting a LoRA to LoRA": the point here
        convert_to_lora(model, ENERGY)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 layers of an 8×-narrower model")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    shape = ModelShape("Llama-3-8B/8 (quick)", 2, 512, 128, 1792) if args.quick else LLAMA3_8B
    load_before = os.getloadavg()
    # PEFT's first call imports peft and transformers (seconds): outside the timing, or the first shape's time —
    # multiplied by its layer count in the extrapolation — would be mostly the import
    peft_convert(torch.randn(2, 8), torch.randn(8, 2), 2.0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        source = write_lora(root / "adapter", shape, args.rank, condition_b=100.0)
        spectrum_s = timed(lambda: rankscope.analyze(rankscope.load(source)), args.repeats, "spectrum")
        outputs = iter(range(args.repeats))
        convert_s = timed(
            lambda: convert(rankscope.load(source), RULE).save(root / f"out{next(outputs)}"), args.repeats, "convert"
        )
        written = convert(rankscope.load(source), RULE)
        layers = {layer.name: layer for layer in rankscope.load(source).layers}
        dense = {}
        for path, m, n in shape.distinct_shapes():
            update = layers[path].update
            a, b, scale = update.right, update.left, float(update.scale)
            count = sum(1 for _, mm, nn in shape.modules() if (mm, nn) == (m, n))
            kohya = timed(lambda a=a, b=b, scale=scale: kohya_resize(a, b, scale), 1, f"kohya {m}x{n}")
            peft = timed(lambda a=a, b=b, scale=scale: peft_convert(a, b, scale * args.rank), 1, f"peft {m}x{n}")
            dense[f"{m}x{n}"] = {"layers": count, "kohya_s": kohya, "peft_convert_to_lora_s": peft}
            print(f"  {m}x{n} ({count} layers): kohya {kohya:.1f} s, PEFT {peft:.1f} s", flush=True)
    kohya_total = sum(v["layers"] * v["kohya_s"] for v in dense.values())
    peft_total = sum(v["layers"] * v["peft_convert_to_lora_s"] for v in dense.values())
    result = {
        "model": shape.name,
        "layers": len(shape.modules()),
        "rank": args.rank,
        "rule": RULE,
        "spectrum_s": spectrum_s,
        "convert_s": convert_s,
        "ratio": convert_s / spectrum_s,
        "target_ratio": 2.0,
        "total_rank_after": sum(layer.rank for layer in written.suggestion.layers),
        "retained_energy": written.suggestion.retained_energy,
        "dense_per_shape": dense,
        "kohya_extrapolated_s": kohya_total,
        "peft_convert_to_lora_extrapolated_s": peft_total,
        "threads": torch.get_num_threads(),
        "cpu_s": CPU,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
    }
    print(f"{shape.name}, {result['layers']} layers, r={args.rank}, {RULE}")
    print(f"  spectrum            {spectrum_s:8.2f} s")
    print(f"  convert (+ write)   {convert_s:8.2f} s   {result['ratio']:.2f}× spectrum (target ≤ 2×)")
    print(f"  kohya dense resize  {kohya_total:8.2f} s   extrapolated from one layer per shape")
    print(f"  PEFT convert_to_lora{peft_total:8.2f} s   extrapolated from one layer per shape")
    print(f"  CPU s of the timed calls: {json.dumps({k: round(v, 2) for k, v in CPU.items()})}")
    print(f"  load average before {load_before}, after {result['load_average_after']}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
