"""Nothing silent: tensors that look like adapter weights but that no layer analyses are a warning, counted in the
summary and the JSON, and ``--strict`` fails on them (issue 11, "Silent omissions")."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from rankscope.core.checkpoint import adapter_module
from rankscope.formats import load

from .factories import run_spectrum as spectrum


class _Classifier(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(12, 10)
        self.head = torch.nn.Linear(10, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.lin(x))


@pytest.fixture(scope="module")
def peft_with_modules_to_save(tmp_path_factory) -> Path:
    """A real PEFT adapter whose ``modules_to_save`` head is a full copy: it changes the model, no layer has it."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = peft.get_peft_model(
        _Classifier(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["lin"], modules_to_save=["head"])
    )
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter)
    directory = tmp_path_factory.mktemp("peft") / "adapter"
    model.save_pretrained(directory)
    return directory


def test_a_modules_to_save_copy_is_a_warning_not_a_note(peft_with_modules_to_save):
    checkpoint = load(peft_with_modules_to_save)
    assert [layer.name for layer in checkpoint.layers] == ["lin"]
    missing = checkpoint.not_analysed
    assert [item.module for item in missing] == ["head"]
    # PEFT saves the copy under the module's own name
    assert set(missing[0].keys) == {"base_model.model.head.weight", "base_model.model.head.bias"}
    assert "modules_to_save" in missing[0].reason
    assert any(w.startswith("1 module(s) with adapter weights NOT analysed: head (") for w in checkpoint.warnings)


def test_the_warning_survives_quiet_and_strict_fails(peft_with_modules_to_save, tmp_path):
    out = tmp_path / "out.json"
    result = spectrum(peft_with_modules_to_save, "-q", "--json", out)
    assert result.exit_code == 0, result.output
    assert "NOT analysed: head" in result.stderr  # a warning: -q keeps it
    document = json.loads(out.read_text())
    assert document["summary"]["not_analysed_modules"] == 1
    assert [item["module"] for item in document["not_analysed"]] == ["head"]
    assert any("NOT analysed" in warning for warning in document["warnings"])
    strict = spectrum(peft_with_modules_to_save, "-q", "--strict")
    assert strict.exit_code == 1
    assert "1 module(s) not analysed (--strict)" in strict.stderr
    table = spectrum(peft_with_modules_to_save)
    assert "1 module(s) NOT analysed" in table.stdout


def test_a_clean_adapter_has_nothing_to_warn_about(tmp_path):
    a, b = torch.randn(2, 6), torch.randn(5, 2)
    directory = tmp_path / "clean"
    directory.mkdir()
    save_file({"base_model.model.x.lora_A.weight": a, "base_model.model.x.lora_B.weight": b},
              str(directory / "adapter_model.safetensors"))  # fmt: skip
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["x"]}
    (directory / "adapter_config.json").write_text(json.dumps(config))
    checkpoint = load(directory)
    assert checkpoint.not_analysed == [] and checkpoint.warnings == []
    assert spectrum(directory, "-q", "--strict").exit_code == 0


def test_an_unknown_lycoris_algorithm_beside_lora_modules_is_named(tmp_path):
    """kohya layout with one module of an algorithm rankscope does not read (diag-OFT's ``oft_blocks``)."""
    tensors = {
        "lora_unet_a.lora_down.weight": torch.randn(2, 8),
        "lora_unet_a.lora_up.weight": torch.randn(6, 2),
        "lora_unet_a.alpha": torch.tensor(2.0),
        "lora_unet_b.oft_blocks": torch.randn(2, 4, 4),
        "lora_unet_b.alpha": torch.tensor(0.0),
    }
    path = tmp_path / "mixed.safetensors"
    save_file(tensors, str(path))
    checkpoint = load(path)
    assert [layer.name for layer in checkpoint.layers] == ["lora_unet_a"]
    assert [item.module for item in checkpoint.not_analysed] == ["lora_unet_b"]
    result = spectrum(path, "-q", "--strict")
    assert result.exit_code == 1 and "lora_unet_b" in result.stderr


def test_norm_scales_saved_beside_lora_factors_are_named(tmp_path):
    """BFL's Flux control LoRA layout: lora_A/lora_B on the original names, and full ``…_norm.scale`` vectors that
    replace the query/key norms — read as LoRA, the scales listed as not analysed (a warning, --strict fails)."""
    tensors = {
        "double_blocks.0.img_attn.qkv.lora_A.weight": torch.randn(2, 8),
        "double_blocks.0.img_attn.qkv.lora_B.weight": torch.randn(24, 2),
        "double_blocks.0.img_attn.norm.query_norm.scale": torch.rand(4),
        "double_blocks.0.img_attn.norm.key_norm.scale": torch.rand(4),
    }
    path = tmp_path / "control.safetensors"
    save_file(tensors, str(path))
    checkpoint = load(path)
    assert [layer.name for layer in checkpoint.layers] == ["double_blocks.0.img_attn.qkv"]
    modules = [item.module for item in checkpoint.not_analysed]
    assert sorted(modules) == ["double_blocks.0.img_attn.norm.key_norm", "double_blocks.0.img_attn.norm.query_norm"]
    assert all("norm's scale saved in full" in item.reason for item in checkpoint.not_analysed)
    result = spectrum(path, "-q", "--strict")
    assert result.exit_code == 1 and "query_norm" in result.stderr


@pytest.mark.parametrize(
    ("key", "module"),
    [
        ("unet.down_blocks.0.attentions.0.to_q.lora.down.weight", "unet.down_blocks.0.attentions.0.to_q"),
        ("text_encoder.layers.0.q_proj.lora_linear_layer.up.weight", "text_encoder.layers.0.q_proj"),
        ("mid.attn1.processor.to_out_lora.up.weight", "mid.attn1.processor.to_out_lora"),
        ("lycoris_conv1.diff_b", "lycoris_conv1"),
        ("model.layers.0.mlp.experts.lora_A.weight", "model.layers.0.mlp.experts"),
        ("base_model.model.score.modules_to_save.default.weight", "base_model.model.score"),
        ("model.layers.0.self_attn.q_proj.weight", None),
        ("model.norm.bias", None),
        ("optimizer_step", None),
    ],
)
def test_which_keys_look_like_adapter_weights(key, module):
    assert adapter_module(key) == module
