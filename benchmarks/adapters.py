"""Synthetic adapters with the real shapes of Llama-3-8B and Llama-3-70B, written in PEFT's file layout.

The factors are random (both A and B nonzero: a trained adapter's B is nonzero too), bf16 as PEFT saves them
under mixed precision. Only the shapes, dtypes and key layout matter for timing; the values are seeded.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

PREFIX = "base_model.model."
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelShape:
    """The projection shapes of a Llama-style decoder: every layer has q, k, v, o, gate, up, down."""

    name: str
    layers: int
    hidden: int
    kv: int
    intermediate: int

    def modules(self) -> list[tuple[str, int, int]]:
        """(module path, out_features, in_features) for every adapted projection, in model order."""
        h, kv, i = self.hidden, self.kv, self.intermediate
        shapes = {"q_proj": (h, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, h),
                  "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}  # fmt: skip
        out = []
        for layer in range(self.layers):
            for module in ATTENTION + MLP:
                block = "self_attn" if module in ATTENTION else "mlp"
                out.append((f"model.layers.{layer}.{block}.{module}", *shapes[module]))
        return out

    def distinct_shapes(self) -> list[tuple[str, int, int]]:
        """One module per distinct (out, in) shape: the layers the dense baselines sample."""
        seen, out = set(), []
        for path, m, n in self.modules():
            if (m, n) not in seen:
                seen.add((m, n))
                out.append((path, m, n))
        return out


LLAMA3_8B = ModelShape("Llama-3-8B", 32, 4096, 1024, 14336)
LLAMA3_70B = ModelShape("Llama-3-70B", 80, 8192, 1024, 28672)


def _config(rank: int, alpha: float, **extra) -> dict:
    return {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": alpha,
        "use_rslora": False,
        "rank_pattern": {},
        "alpha_pattern": {},
        "fan_in_fan_out": False,
        "bias": "none",
        "target_modules": list(ATTENTION + MLP),
        **extra,
    }


def _conditioned(rows: int, cols: int, condition: float, generator: torch.Generator) -> torch.Tensor:
    """rows × cols (rows ≥ cols) with singular values log-spaced from 1 down to 1/condition."""
    u, _ = torch.linalg.qr(torch.randn(rows, cols, generator=generator))
    v, _ = torch.linalg.qr(torch.randn(cols, cols, generator=generator))
    return (u * torch.logspace(0, -math.log10(condition), cols)) @ v.T


def _factors(
    m: int, n: int, rank: int, generator: torch.Generator, condition_b: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A (rank, n) and B (m, rank) in bf16, with the spread of a kaiming-uniform A and a trained B; B with the
    condition number ``condition_b`` where given (a trained B is often far from orthogonal)."""
    a = torch.randn(rank, n, generator=generator).mul_(n**-0.5).to(torch.bfloat16)
    if condition_b is None:
        b = torch.randn(m, rank, generator=generator).mul_(0.01)
    else:
        b = _conditioned(m, rank, condition_b, generator).mul_(0.01 * math.sqrt(m))
    return a, b.to(torch.bfloat16)


def write_lora(
    directory: Path,
    shape: ModelShape,
    rank: int = 16,
    *,
    seed: int = 0,
    modules=None,
    alpha: float | None = None,
    condition_b: float | None = None,
) -> Path:
    """A PEFT LoRA adapter directory of ``shape`` (or of only ``modules``: (path, m, n) triples)."""
    directory.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for path, m, n in modules if modules is not None else shape.modules():
        a, b = _factors(m, n, rank, generator, condition_b)
        tensors[f"{PREFIX}{path}.lora_A.weight"] = a
        tensors[f"{PREFIX}{path}.lora_B.weight"] = b
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    config = _config(rank, alpha if alpha is not None else 2.0 * rank)
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=1))
    return directory


def write_bora(directory: Path, shape: ModelShape, rank: int = 8, blocks: int = 16, *, seed: int = 0) -> Path:
    """A BoRA adapter (rankscope's layout: PEFT LoRA keys plus ``lora_sigma`` (b, b, r) per module)."""
    directory.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for path, m, n in shape.modules():
        a, b = _factors(m, n, rank, generator)
        tensors[f"{PREFIX}{path}.lora_A.weight"] = a
        tensors[f"{PREFIX}{path}.lora_B.weight"] = b
        sigma = torch.randn(blocks, blocks, rank, generator=generator).mul_(0.1).to(torch.bfloat16)
        tensors[f"{PREFIX}{path}.lora_sigma"] = sigma
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    (directory / "adapter_config.json").write_text(json.dumps(_config(rank, 2.0 * rank, peft_type="BORA"), indent=1))
    return directory


def write_composition(directory: Path, shape: ModelShape, components: int = 3, rank: int = 8, *, seed: int = 0) -> Path:
    """A ``composition.json`` manifest over ``components`` LoRA adapters of ``shape`` (BoostLoRA-style rounds)."""
    directory.mkdir(parents=True, exist_ok=True)
    names = [f"round{i}" for i in range(components)]
    for i, name in enumerate(names):
        write_lora(directory / name, shape, rank, seed=seed + 1 + i)
    weights = [round(0.6 / (i + 1), 4) for i in range(components)]
    manifest = {"format": "rankscope.composition/1", "mode": "sum", "components": names, "weights": weights}
    (directory / "composition.json").write_text(json.dumps(manifest, indent=1))
    return directory


def file_bytes(directory: Path) -> int:
    """Bytes of the tensor files under ``directory`` (what the reader has to read)."""
    return sum(p.stat().st_size for p in directory.rglob("*.safetensors"))


def write_subset(source: Path, directory: Path, modules: list[str]) -> Path:
    """A copy of the LoRA adapter at ``source`` holding only ``modules`` (the very same factors and config): what
    the dense baselines run on (WeightWatcher's ``layers=`` filter does not work on safetensors files)."""
    from safetensors import safe_open

    directory.mkdir(parents=True, exist_ok=True)
    wanted = tuple(f"{PREFIX}{module}." for module in modules)
    with safe_open(str(source / "adapter_model.safetensors"), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key).clone() for key in handle.keys() if key.startswith(wanted)}  # noqa: SIM118
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    (directory / "adapter_config.json").write_text((source / "adapter_config.json").read_text())
    return directory
