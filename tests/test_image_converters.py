"""LoRA layouts no diffusers ``save_lora_weights`` writes but its pipelines load through their converters
(``diffusers/loaders/lora_conversion_utils.py``): the reference is the pipeline's own ``load_lora_weights`` +
``fuse_lora`` on a float64 copy of a tiny transformer (W_fused − W₀), σ against ``torch.linalg.svdvals``."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import save_file

import rankscope

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from diffusers import (
    FluxPipeline,
    FluxTransformer2DModel,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
)

from .factories import assert_matches, quiet_library_warnings, records  # noqa: F401 (autouse)


def _qwen_image() -> QwenImageTransformer2DModel:
    torch.manual_seed(0)
    return QwenImageTransformer2DModel(patch_size=2, in_channels=8, out_channels=2, num_layers=2,
                                       attention_head_dim=8, num_attention_heads=2, joint_attention_dim=12,
                                       axes_dims_rope=(2, 2, 4))  # fmt: skip


def _fused(transformer: torch.nn.Module, file, pipeline=QwenImagePipeline, **parts) -> dict[str, torch.Tensor]:
    """ΔW of every weight the pipeline's load + fuse changes, float64, by module name."""
    model = copy.deepcopy(transformer).double()
    before = {k: v.clone() for k, v in model.state_dict().items() if k.endswith(".weight")}
    pipe = pipeline(transformer=model, scheduler=None, vae=None, text_encoder=None, tokenizer=None, **parts)
    pipe.load_lora_weights(str(file))
    pipe.fuse_lora(components=["transformer"])
    pipe.unload_lora_weights()
    after = {k: v for k, v in model.state_dict().items() if k in before}
    return {k.removesuffix(".weight"): after[k] - before[k] for k in before if not torch.equal(after[k], before[k])}


def test_diffsynth_default_adapter_keys_with_per_module_alpha(tmp_path):
    """DiffSynth/ModelScope's Qwen-Image LoRA: ``<module>.lora_A.default.weight`` beside ``<module>.alpha``; the
    converter scales each module by its alpha/r (was read at scale 1 with every .alpha taken for a base weight)."""
    transformer = _qwen_image()
    generator = torch.Generator().manual_seed(1)
    targets = ["transformer_blocks.0.img_mod.1", "transformer_blocks.0.attn.to_q", "transformer_blocks.1.attn.to_out.0",
               "transformer_blocks.1.txt_mlp.net.2", "img_in"]  # fmt: skip
    modules = dict(transformer.named_modules())
    tensors = {}
    for i, name in enumerate(targets):
        rank = 2 + i % 2
        tensors[f"{name}.lora_A.default.weight"] = torch.randn(rank, modules[name].in_features, generator=generator)
        tensors[f"{name}.lora_B.default.weight"] = torch.randn(modules[name].out_features, rank, generator=generator)
        tensors[f"{name}.alpha"] = torch.tensor(float(1 + 3 * i))
    file = tmp_path / "qwen-diffsynth.safetensors"
    save_file(tensors, file)
    deltas = _fused(transformer, file)
    assert sorted(deltas) == sorted(targets)
    got = records(file)
    assert_matches(got, deltas, tol=1e-6)  # the converter scales the float32 factors in float32
    assert got["transformer_blocks.0.img_mod.1"].scale == pytest.approx(1.0 / 2)


def test_peft_named_keys_with_some_alphas_say_how_the_loaders_differ(tmp_path):
    """``transformer.<module>.lora_A.weight`` where only some modules carry ``.alpha``: the modules with one match
    FluxPipeline's load + fuse; for those without, rankscope reads α = r and says that diffusers' loader of such
    keys gives them the file's most common alpha instead — checked here against that very loader."""
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=1, num_single_layers=1,
                                         attention_head_dim=4, num_attention_heads=2, joint_attention_dim=12,
                                         pooled_projection_dim=6, axes_dims_rope=(2, 2))  # fmt: skip
    modules = dict(transformer.named_modules())
    targets = ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.to_v",
               "single_transformer_blocks.0.proj_out", "transformer_blocks.0.ff.net.2"]  # fmt: skip
    alphas = {targets[0]: 8.0, targets[1]: 8.0, targets[2]: 2.0}  # the rest have none
    generator, tensors, factors = torch.Generator().manual_seed(2), {}, {}
    for name in targets:
        a = torch.randn(4, modules[name].in_features, generator=generator, dtype=torch.float64)
        b = torch.randn(modules[name].out_features, 4, generator=generator, dtype=torch.float64)
        tensors[f"transformer.{name}.lora_A.weight"], tensors[f"transformer.{name}.lora_B.weight"] = a, b
        factors[name] = b @ a
        if name in alphas:
            tensors[f"transformer.{name}.alpha"] = torch.tensor(alphas[name])
    file = tmp_path / "flux-some-alphas.safetensors"
    save_file(tensors, file)
    deltas = _fused(transformer, file, FluxPipeline, text_encoder_2=None, tokenizer_2=None)
    checkpoint = rankscope.load(file)
    (warning,) = [w for w in checkpoint.warnings if "no alpha tensor beside" in w]
    assert "2 module(s)" in warning and "most common alpha (8)" in warning
    got = {record.name.removeprefix("transformer."): record for record in rankscope.analyze(checkpoint)}
    assert sorted(got) == sorted(targets)
    assert_matches({name: got[name] for name in alphas}, {name: deltas[name] for name in alphas})
    for name in set(targets) - set(alphas):
        assert torch.allclose(deltas[name], 8.0 / 4 * factors[name], rtol=1e-10)  # the warning's claim
        assert got[name].scale == 1.0
