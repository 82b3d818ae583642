"""Seed checkpoints for fuzzing: small, real layouts of each family rankscope reads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "base_model.model.model.layers"


def _factors(out: int, inp: int, r: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(r, inp, generator=g), torch.randn(out, r, generator=g)


def _lora_tensors(layers: int = 2, hidden: int = 16, r: int = 4) -> dict[str, torch.Tensor]:
    tensors = {}
    for i in range(layers):
        for j, module in enumerate(("q_proj", "v_proj")):
            a, b = _factors(hidden, hidden, r, 10 * i + j)
            tensors[f"{PREFIX}.{i}.self_attn.{module}.lora_A.weight"] = a
            tensors[f"{PREFIX}.{i}.self_attn.{module}.lora_B.weight"] = b
    return tensors


def build(directory: Path) -> dict[str, Path]:
    """Write the seeds into ``directory``; return name → path of the file to mutate (its folder is the input)."""
    directory.mkdir(parents=True, exist_ok=True)
    seeds: dict[str, Path] = {}
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}

    trained = directory / "trained-lora"
    shutil.copytree(ROOT / "examples" / "checkpoints" / "tiny-lora", trained, dirs_exist_ok=True)
    seeds["trained-lora"] = trained / "adapter_model.safetensors"

    lora_bin = directory / "lora-bin"
    lora_bin.mkdir(exist_ok=True)
    torch.save(_lora_tensors(), lora_bin / "adapter_model.bin")
    (lora_bin / "adapter_config.json").write_text(json.dumps(config))
    seeds["lora-bin"] = lora_bin / "adapter_model.bin"
    seeds["lora-config"] = lora_bin / "adapter_config.json"

    bora = directory / "bora"
    bora.mkdir(exist_ok=True)
    tensors = _lora_tensors()
    for key in [k for k in tensors if k.endswith("lora_A.weight")]:
        tensors[key.replace("lora_A.weight", "lora_sigma")] = torch.randn(4, 4, 4)
    save_file(tensors, str(bora / "adapter_model.safetensors"))
    (bora / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "BORA"}))
    seeds["bora"] = bora / "adapter_model.safetensors"

    melora = directory / "melora"
    melora.mkdir(exist_ok=True)
    tensors = {}
    for i in range(4):
        a, b = _factors(4, 4, 1, i)
        tensors[f"{PREFIX}.0.self_attn.q_proj.lora_A.{i}.weight"] = a
        tensors[f"{PREFIX}.0.self_attn.q_proj.lora_B.{i}.weight"] = b
    torch.save(tensors, melora / "adapter_model.bin")
    (melora / "adapter_config.json").write_text(
        json.dumps({"peft_type": "MELORA", "r": [1] * 4, "lora_alpha": [2] * 4})
    )
    seeds["melora"] = melora / "adapter_model.bin"

    hydra = directory / "hydra"
    hydra.mkdir(exist_ok=True)
    a, _ = _factors(16, 16, 4, 0)
    tensors = {
        f"{PREFIX}.0.mlp.up_proj.lora_A.weight": a,
        f"{PREFIX}.0.mlp.up_proj.lora_route.weight": torch.zeros(3, 16),
    }
    for i in range(3):
        tensors[f"{PREFIX}.0.mlp.up_proj.lora_B{i}.weight"] = _factors(16, 16, 4, i + 5)[1]
    torch.save(tensors, hydra / "adapter_model.bin")
    (hydra / "adapter_config.json").write_text(json.dumps({**config, "lora_nums": 3}))
    seeds["hydra"] = hydra / "adapter_model.bin"

    kohya = directory / "kohya.safetensors"
    tensors = {}
    for name in (
        "lora_unet_down_blocks_0_attentions_0_proj_in",
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
    ):
        a, b = _factors(16, 16, 4, len(name))
        tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"] = a, b
        tensors[f"{name}.alpha"] = torch.tensor(4.0)
    save_file(tensors, str(kohya), metadata={"ss_network_alpha": "4", "ss_network_dim": "4"})
    seeds["kohya"] = kohya

    composition = directory / "composition"
    for name in ("round0", "round1"):
        target = composition / name
        target.mkdir(parents=True, exist_ok=True)
        save_file(_lora_tensors(), str(target / "adapter_model.safetensors"))
        (target / "adapter_config.json").write_text(json.dumps(config))
    manifest = {"format": "rankscope.composition/1", "mode": "sequential", "components": ["round0", "round1"],
                "weights": [0.7, 0.3], "normalize": "none"}  # fmt: skip
    (composition / "composition.json").write_text(json.dumps(manifest))
    seeds["manifest"] = composition / "composition.json"
    return seeds
