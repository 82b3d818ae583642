"""``convert`` of a LoRA on a MoE model (PEFT's ``target_parameters``): the router, a 2-D parameter whose factors
PEFT saves under the module's name, is written with its ``target_parameters`` entry so that PEFT loads it (checked
by PeftModel.from_pretrained + merge against the source's merge, float64); the stacked experts are not written yet,
and the CLI warns, naming them."""

from __future__ import annotations

import json
import os

import pytest
import torch
from click.testing import CliRunner

from rankscope.cli import main

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from .factories import quiet_library_warnings  # noqa: E402, F401 (autouse)


def _mixtral():
    torch.manual_seed(0)
    config = transformers.MixtralConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, num_local_experts=3,
                                        num_experts_per_tok=1)  # fmt: skip
    return transformers.MixtralForCausalLM(config).double()


def _merged_deltas(model, adapter) -> dict[str, torch.Tensor]:
    before = {k: v.clone() for k, v in model.state_dict().items()}
    merged = peft.PeftModel.from_pretrained(model, adapter).double().merge_and_unload().state_dict()
    return {k: merged[k] - before[k] for k in before if not torch.equal(merged[k], before[k])}


def test_router_is_written_for_peft_and_the_experts_are_warned_about(tmp_path):
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"],
                             target_parameters=["mlp.gate.weight", "mlp.experts.down_proj"])  # fmt: skip
    wrapped = peft.get_peft_model(_mixtral(), config)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in wrapped.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))
    wrapped.save_pretrained(tmp_path / "source")
    result = CliRunner().invoke(main, ["convert", str(tmp_path / "source"), "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "MoE expert layer(s)" in result.stderr and "experts.down_proj[" in result.stderr
    written = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert written["target_parameters"] == ["mlp.gate.weight"]
    source = _merged_deltas(_mixtral(), tmp_path / "source")
    converted = _merged_deltas(_mixtral(), tmp_path / "out")
    routers = {k for k in source if ".mlp.gate." in k}
    assert routers and routers <= set(converted)
    assert not any("experts" in k for k in converted)
    for key in converted:
        assert torch.allclose(converted[key], source[key], rtol=1e-5, atol=1e-6 * source[key].abs().max()), key
