"""PEFT's ``bias="all"``/``"lora_only"`` (with DoRA too; and ``boft_only``, ``vera_only``) train the base layers'
biases and save them whole: against ``--base`` each analysed layer's bias change Δb = b − b₀ is its
``bias_update``, checked against PEFT's own ``merge_and_unload()`` of a tiny BERT; without a base they stay listed
as skipped."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import rankscope  # noqa: E402

from .factories import perturb_trainable, quiet_library_warnings  # noqa: E402, F401 (autouse)

TARGETS = ["query", "value"]
CONFIGS = {
    "lora_only": lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, bias="lora_only"),
    "all": lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, bias="all"),
    "dora-lora_only": lambda: peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=TARGETS, bias="lora_only", use_dora=True
    ),
    "lora_bias+lora_only": lambda: peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=TARGETS, bias="lora_only", lora_bias=True
    ),  # Δb = (b − b₀) + s·b_B, as PEFT merges both
    "glora_only": lambda: peft.GloraConfig(r=4, target_modules=TARGETS, bias="glora_only"),  # its merge moves b too
    "boft_only": lambda: peft.BOFTConfig(boft_block_size=8, target_modules=TARGETS, bias="boft_only"),
    "vera_only": lambda: peft.VeraConfig(r=8, target_modules=TARGETS, bias="vera_only"),
}


def _bert() -> torch.nn.Module:
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                     num_attention_heads=4, max_position_embeddings=32)  # fmt: skip
    torch.manual_seed(0)
    return transformers.BertModel(config)


@pytest.mark.parametrize("bias", list(CONFIGS))
def test_trained_biases_are_the_layers_bias_changes(tmp_path, bias):
    model = _bert()
    model.save_pretrained(tmp_path / "base")
    before = {k: v.detach().double().clone() for k, v in model.state_dict().items()}
    wrapped = peft.get_peft_model(model, CONFIGS[bias]())
    perturb_trainable(wrapped, seed=1)
    wrapped.save_pretrained(tmp_path / "adapter")
    merged = {k: v.double() for k, v in wrapped.merge_and_unload().state_dict().items()}
    changed = {k.removesuffix(".bias") for k in before if k.endswith(".bias") and not torch.equal(merged[k], before[k])}
    assert changed, "test setup: the biases were trained"

    checkpoint = rankscope.load(str(tmp_path / "adapter"), base=str(tmp_path / "base"))
    layers = {layer.name: layer for layer in checkpoint.layers}
    assert len(layers) == 4
    for name, layer in layers.items():
        expected = merged[f"{name}.bias"] - before[f"{name}.bias"]
        assert layer.bias_update is not None and layer.bias_scaled is False, name
        assert torch.allclose(layer.bias_update, expected, rtol=0, atol=1e-7), name
    records = {record.name: record for record in rankscope.analyze(checkpoint)}
    for name in layers:
        delta = merged[f"{name}.bias"] - before[f"{name}.bias"]
        assert records[name].bias_update["norm"] == pytest.approx(float(delta.norm()), rel=1e-6)
    # bias="all" also trains biases of modules that are no layer (LayerNorm, dense): still skipped, by name
    assert {_module(s.key) for s in checkpoint.skipped} == changed - set(layers)

    if bias in ("boft_only", "glora_only", "dora-lora_only"):
        return  # BOFT and GLoRA (read through PEFT's merge) and DoRA need the base
    unbased = rankscope.load(str(tmp_path / "adapter"))  # no base: no change to take, the biases stay skipped
    assert all(layer.bias_update is None or layer.bias_scaled for layer in unbased.layers)  # lora_B's own only
    assert {_module(s.key) for s in unbased.skipped} == changed


def _module(key: str) -> str:
    return key.removeprefix("base_model.model.").removesuffix(".bias").removesuffix(".base_layer")


@pytest.mark.parametrize("bias", ["lora_only", "lora_bias+lora_only"])
def test_convert_carries_the_bias_changes_as_lora_bias(tmp_path, bias):
    """``convert --base`` of a bias="lora_only" adapter writes Δb as lora_B's bias (PEFT's lora_bias, applied ×s):
    PEFT's merge of the written adapter gives the same weights and biases as the original's."""
    from click.testing import CliRunner

    from rankscope.cli import main

    model = _bert()
    model.save_pretrained(tmp_path / "base")
    wrapped = peft.get_peft_model(model, CONFIGS[bias]())
    perturb_trainable(wrapped, seed=2)
    wrapped.save_pretrained(tmp_path / "adapter")
    arguments = ["convert", str(tmp_path / "adapter"), "--base", str(tmp_path / "base"), "--rule", "energy:1.0"]
    result = CliRunner().invoke(main, [*arguments, "--dtype", "float64", "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output

    def merged(adapter) -> dict[str, torch.Tensor]:
        base = transformers.BertModel.from_pretrained(str(tmp_path / "base")).double()
        return peft.PeftModel.from_pretrained(base, str(adapter)).double().merge_and_unload().state_dict()

    original, written = merged(tmp_path / "adapter"), merged(tmp_path / "out")
    before = transformers.BertModel.from_pretrained(str(tmp_path / "base")).double().state_dict()
    assert not torch.equal(original["encoder.layer.0.attention.self.query.bias"],
                           before["encoder.layer.0.attention.self.query.bias"])  # fmt: skip
    for key, value in original.items():
        assert torch.allclose(written[key], value, rtol=0, atol=1e-12), key
