"""An 8B-shaped full fine-tune (Llama-3-8B's attention shapes, bf16) read as ΔW = W − W₀: ``--top-k 64`` on every
layer against the exact dense float64 path on sampled layers — time and error in one run.

The base is seeded bf16 noise of the scale of a trained projection (std 0.02); the fine-tune adds a perturbation
with a decaying spectrum (rank 256, σ_i ∝ i^(-1/2)) and is saved in bf16, so the analysed ΔW also carries the
fine-tune's own bf16 rounding, a full-rank floor — as a real bf16 fine-tune does. By default one decoder layer
(q, k, v, o: two 4096×4096 and two 1024×4096 matrices), truncated, and an exact SVD of the smallest shape only:
under a minute on two cores (``--every-shape`` adds an exact 4096² SVD, 20 s to 2 min on two busy cores).
``--layers N`` and ``--mlp`` (the 14336-wide projections) make it bigger.

    python benchmarks/full_delta.py [--layers 1] [--mlp] [--every-shape] [--top-k 64] [--device cpu] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save_file

import rankscope

HIDDEN, KV, INTERMEDIATE = 4096, 1024, 14336
RANK, PERTURBATION = 256, 0.5  # ‖ΔW‖_F ≈ 1.2, 1.5 % of ‖W₀‖_F for a 4096² layer


def shapes(layers: int, mlp: bool) -> dict[str, tuple[int, int]]:
    out = {}
    for i in range(layers):
        p = f"model.layers.{i}."
        out |= {p + "self_attn.q_proj": (HIDDEN, HIDDEN), p + "self_attn.k_proj": (KV, HIDDEN),
                p + "self_attn.v_proj": (KV, HIDDEN), p + "self_attn.o_proj": (HIDDEN, HIDDEN)}  # fmt: skip
        if mlp:
            out |= {p + "mlp.gate_proj": (INTERMEDIATE, HIDDEN), p + "mlp.up_proj": (INTERMEDIATE, HIDDEN),
                    p + "mlp.down_proj": (HIDDEN, INTERMEDIATE)}  # fmt: skip
    return out


def write_pair(root: Path, layers: int, mlp: bool, seed: int = 0) -> tuple[Path, Path]:
    g = torch.Generator().manual_seed(seed)
    base, tuned = {}, {}
    decay = torch.arange(1, RANK + 1, dtype=torch.float32) ** -0.5
    for name, (m, n) in shapes(layers, mlp).items():
        w0 = (0.02 * torch.randn(m, n, generator=g)).bfloat16()
        left = torch.linalg.qr(torch.randn(m, RANK, generator=g)).Q
        right = torch.linalg.qr(torch.randn(n, RANK, generator=g)).Q
        delta = (left * (PERTURBATION * decay)) @ right.T
        base[f"{name}.weight"], tuned[f"{name}.weight"] = w0, (w0.float() + delta).bfloat16()
    for directory, tensors in (("base", base), ("tuned", tuned)):
        (root / directory).mkdir()
        (root / directory / "config.json").write_text(json.dumps({"model_type": "llama"}))
        save_file(tensors, str(root / directory / "model.safetensors"))
    return root / "base", root / "tuned"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--mlp", action="store_true")
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--every-shape", action="store_true", help="an exact SVD of one layer of every shape")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        base, tuned = write_pair(Path(tmp), args.layers, args.mlp)
        written = time.perf_counter() - start
        start = time.perf_counter()
        checkpoint = rankscope.load(tuned, base=base)
        read = time.perf_counter() - start
        # the spectrum path only: the base-aware metrics (σ₁(W₀), intruders: their own SVDs) are left out
        checkpoint = replace(checkpoint, base=None) if hasattr(checkpoint, "base") else checkpoint
        start = time.perf_counter()
        truncated = rankscope.analyze(checkpoint, top_k=args.top_k, device=args.device)
        top_k_time = time.perf_counter() - start
        sampled = {}  # one layer of each shape (of the smallest by default), exact
        for record in sorted(truncated, key=lambda r: r.matrix_shape[0] * r.matrix_shape[1]):
            sampled.setdefault(tuple(record.matrix_shape), record.name)
        if not args.every_shape:
            sampled = dict(list(sampled.items())[:1])
        rows = []
        for shape, name in sampled.items():
            start = time.perf_counter()
            exact = rankscope.analyze(checkpoint, layers=f"^{name}$", device=args.device)[name]
            exact_time = time.perf_counter() - start
            approx = truncated[name]
            sigma = torch.tensor(exact.singular_values, dtype=torch.float64)
            found = torch.tensor(approx.singular_values, dtype=torch.float64)
            k = found.numel()
            rows.append(
                {
                    "layer": name,
                    "shape": list(shape),
                    "exact_s": exact_time,
                    "max_rel_error_top_k": float(((found - sigma[:k]).abs() / sigma[:k]).max()),
                    "max_error_over_sigma1": float((found - sigma[:k]).abs().max() / sigma[0]),
                    "sigma_max_rel_error": abs(approx.metrics["sigma_max"] / exact.metrics["sigma_max"] - 1),
                    "stable_rank_rel_error": abs(approx.metrics["stable_rank"] / exact.metrics["stable_rank"] - 1),
                    "participation_ratio_rel_error": abs(
                        approx.metrics["participation_ratio"] / exact.metrics["participation_ratio"] - 1
                    ),
                    "certified": approx.truncated["certified"],
                    "tail_energy_share": approx.truncated["residual_energy"] / approx.metrics["energy"],
                    "exact_energy_rank_0.9": exact.metrics["energy_rank"]["0.9"],
                }
            )
    result = {
        "layers": len(truncated),
        "top_k": args.top_k,
        "device": args.device,
        "threads": torch.get_num_threads(),
        "write_s": written,
        "read_s": read,
        "top_k_all_layers_s": top_k_time,
        "sampled": rows,
    }
    print(
        f"{len(truncated)} layers · read {read:.1f} s · --top-k {args.top_k} on all: {top_k_time:.1f} s "
        f"({torch.get_num_threads()} threads, {args.device})"
    )
    for row in rows:
        print(
            f"  {row['layer']} {row['shape'][0]}×{row['shape'][1]}: exact {row['exact_s']:.1f} s; top-{args.top_k} "
            f"max rel. error {row['max_rel_error_top_k']:.1e} (max |Δσ|/σ₁ {row['max_error_over_sigma1']:.1e}); "
            f"σ₁ {row['sigma_max_rel_error']:.1e}, stable rank {row['stable_rank_rel_error']:.1e}, "
            f"PR {row['participation_ratio_rel_error']:.1e}; certified {row['certified']}; "
            f"tail energy {row['tail_energy_share']:.1%}; exact 90 %-energy rank {row['exact_energy_rank_0.9']}"
        )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
