"""Small checkpoints written directly in PEFT's layout (keys, config), for tests that need no PEFT."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

PREFIX = "base_model.model."


def lora_config(**overrides) -> dict:
    config = {
        "peft_type": "LORA",
        "r": 4,
        "lora_alpha": 8,
        "use_rslora": False,
        "rank_pattern": {},
        "alpha_pattern": {},
        "fan_in_fan_out": False,
        "target_modules": ["q_proj", "v_proj"],
        "bias": "none",
    }
    config.update(overrides)
    return config


def random_factors(out_features: int, in_features: int, rank: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn(rank, in_features, generator=generator)
    b = torch.randn(out_features, rank, generator=generator)
    return a, b


def write_lora(
    directory: Path,
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
    config: dict | None = None,
    *,
    extra: dict[str, torch.Tensor] | None = None,
    prefix: str = PREFIX,
) -> Path:
    """Write ``{module: (A, B)}`` as a PEFT adapter directory; ``config=None`` writes no config."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for module, (a, b) in factors.items():
        tensors[f"{prefix}{module}.lora_A.weight"] = a.contiguous()
        tensors[f"{prefix}{module}.lora_B.weight"] = b.contiguous()
    tensors.update(extra or {})
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    if config is not None:
        (directory / "adapter_config.json").write_text(json.dumps(config))
    return directory


def llama_like(directory: Path, layers: int = 3, hidden: int = 32, rank: int = 4, seed: int = 0) -> Path:
    """A Llama-shaped adapter: q_proj and v_proj in ``layers`` decoder layers."""
    factors = {}
    for i in range(layers):
        for j, module in enumerate(("q_proj", "v_proj")):
            factors[f"model.layers.{i}.self_attn.{module}"] = random_factors(hidden, hidden, rank, seed + 10 * i + j)
    return write_lora(directory, factors, lora_config(r=rank))


def run_spectrum(*args):
    """``rankscope spectrum ARGS`` through click's test runner (exceptions propagate)."""
    from click.testing import CliRunner

    from rankscope.cli import main

    return CliRunner().invoke(main, ["spectrum", *map(str, args)], catch_exceptions=False)


def one_line_error(result, *fragments: str) -> str:
    """The one stderr line of a run that exited 1 without a traceback (it contains each of ``fragments``)."""
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def saved_tiny_llama(directory: Path, seed: int = 0):
    """A randomly initialised 2-layer LlamaForCausalLM (hidden 32, vocab 64) in eval mode, saved as safetensors
    to ``directory``; returns the model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        vocab_size=64,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(directory, safe_serialization=True)
    return model


def tiny_clip_config(hidden: int):
    """A 2-layer CLIP text encoder's config (transformers), small enough to build in a test."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_attention_heads=2,
        num_hidden_layers=2,
        vocab_size=50,
        max_position_embeddings=16,
        projection_dim=hidden,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )


def tiny_clip(hidden: int, cls=None):
    """A randomly initialised tiny CLIP text encoder of class ``cls`` (``CLIPTextModel`` by default)."""
    if cls is None:
        from transformers import CLIPTextModel as cls
    return cls(tiny_clip_config(hidden))


def tiny_unet():
    """A randomly initialised tiny diffusers UNet2DConditionModel (two blocks, cross-attention width 12)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=12,
        norm_num_groups=4,
        attention_head_dim=2,
    )


def perturb_trainable(model: torch.nn.Module, seed: int, size: float = 0.1) -> None:
    """Add ``size``·N(0, 1) noise to every trainable parameter of a PEFT model (a stand-in for training)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(size * torch.randn(parameter.shape, generator=generator))


def records(path, **kwargs) -> dict:
    """rankscope's records of the adapter at ``path`` by layer name (``kwargs`` go to ``rankscope.load``)."""
    import rankscope

    return {record.name: record for record in rankscope.analyze(rankscope.load(path, **kwargs))}


def assert_spectrum(record, delta: torch.Tensor) -> None:
    """The record's rank_bound σ match a float64 SVD of the reference ΔW (rel 1e-6); the rest of ΔW's σ are ≈ 0."""
    expected = torch.linalg.svdvals(delta)
    k = record.rank_bound
    got = torch.tensor(record.singular_values, dtype=torch.float64)
    assert got.shape == (k,)
    torch.testing.assert_close(got, expected[:k], rtol=1e-6, atol=1e-12 * float(expected[0]))
    assert bool((expected[k:] <= 1e-10 * expected[0]).all())


def assert_matches(got: dict, deltas: dict[str, torch.Tensor], tol: float = 1e-10) -> None:
    """The same layers as the reference ΔWs; each valid and exact, its σ within ``tol``·σ₁ of svdvals(ΔW) in
    float64, and the rest of ΔW's σ (beyond the record's rank bound) together below ``tol``·σ₁."""
    assert set(got) == set(deltas)
    for name, delta in deltas.items():
        record = got[name]
        assert record.valid, f"{name}: {record.error}"
        assert record.exact is True, name
        expected = torch.linalg.svdvals(delta.double().reshape(delta.shape[0], -1))
        sigma = torch.tensor(record.singular_values, dtype=torch.float64)
        k = min(sigma.numel(), expected.numel())
        assert k > 0 and expected[0] > 0
        rel = ((sigma[:k] - expected[:k]).abs() / expected[0]).max().item()
        assert rel <= tol, f"{name}: relative error {rel:.2e}\n got {sigma}\n ref {expected[:k]}"
        assert expected[k:].sum().item() <= tol * expected[0].item(), f"{name}: rank beyond the bound"


@pytest.fixture(autouse=True)
def quiet_library_warnings():
    """The writing libraries' own deprecation and config chatter, silenced (import it to use it in a module)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
