"""``convert`` of a LoRA on a MoE model (PEFT's ``target_parameters``): the router, a 2-D parameter whose factors
PEFT saves under the module's name, and the stacked experts (one r per parameter, nested wrappers for several
parameters of one module) are written with their ``target_parameters`` entries so that PEFT loads them; checked by
PeftModel.from_pretrained + merge_and_unload of the written adapter against the source's merge (lossless) and
against each expert's truncated float64 SVD of it (under a rule)."""

from __future__ import annotations

import json
import os

import pytest
import safetensors.torch
import torch
from click.testing import CliRunner

import rankscope
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


def _source(tmp_path, config, model=None, seed: int = 1) -> tuple[object, dict[str, torch.Tensor]]:
    """A saved adapter of random (non-zero) factors on a tiny model (``model``: its builder; Mixtral), and ΔW of
    every changed base tensor."""
    model = model or _mixtral
    wrapped = peft.get_peft_model(model(), config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in wrapped.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))
    wrapped.save_pretrained(tmp_path / "source")
    return tmp_path / "source", _merged_deltas(model(), tmp_path / "source")


def _truncated(delta: torch.Tensor, k: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    return (u[:, :k] * s[:k]) @ vh[:k]


def test_lossless_convert_writes_router_and_stacked_experts(tmp_path):
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"],
                             target_parameters=["mlp.gate.weight", "mlp.experts.down_proj"])  # fmt: skip
    source, deltas = _source(tmp_path, config)
    result = CliRunner().invoke(main, ["convert", str(source), "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "not written" not in result.stderr
    written = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert written["target_parameters"] == ["mlp.experts.down_proj", "mlp.gate.weight"]
    converted = _merged_deltas(_mixtral(), tmp_path / "out")
    assert set(converted) == set(deltas)
    assert any(".experts.down_proj" in k for k in converted) and any(".mlp.gate." in k for k in converted)
    for key in converted:
        assert torch.allclose(converted[key], deltas[key], rtol=1e-5, atol=1e-6 * deltas[key].abs().max()), key


def test_truncated_experts_nested_with_per_expert_ranks(tmp_path):
    """Both expert parameters of each block (nested wrappers), a rank_pattern on one of them, rsLoRA; under
    ``energy:0.8`` every expert keeps its own rank (padded to the parameter's largest) and PEFT's merge of the
    written adapter gives each expert's best rank-k approximation of the source's ΔW."""
    config = peft.LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj"],
                             target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
                             rank_pattern={"model.layers.1.mlp.experts.down_proj": 2})  # fmt: skip
    source, deltas = _source(tmp_path, config)
    converted = rankscope.convert(str(source), "energy:0.8")
    ranks = {layer.name: layer.rank for layer in converted.suggestion.layers}
    expert_ranks = [k for name, k in ranks.items() if name.endswith("]")]
    assert len(expert_ranks) == 2 * 2 * 3 and len(set(expert_ranks)) > 1  # ranks differ between experts
    # the LoraConfig fields suggest prints: one r per expert parameter (its experts' largest), keyed by its path
    fields = converted.suggestion.lora_config()
    per_parameter = {}
    for name, k in ranks.items():
        if name.endswith("]"):
            path = name.rpartition("[")[0]
            per_parameter[path] = max(per_parameter.get(path, 0), k)
    assert not any("[" in key for key in (*fields["rank_pattern"], *fields["alpha_pattern"]))
    for path, k in per_parameter.items():
        assert fields["rank_pattern"].get(path, fields["r"]) == k, path
    converted.save(tmp_path / "out")
    keys = safetensors.torch.load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert "base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight" in keys  # gate_up_proj, deepest
    merged = _merged_deltas(_mixtral(), tmp_path / "out")
    assert set(merged) == set(deltas)
    for key, delta in deltas.items():
        name = key.removesuffix(".weight")
        if name.endswith(("gate_up_proj", "down_proj")):  # (E, out, in): expert e is delta[e]
            for e in range(delta.shape[0]):
                expected = _truncated(delta[e], ranks[f"{name}[{e}]"])
                assert torch.allclose(merged[key][e], expected, atol=1e-5 * delta[e].abs().max()), (key, e)
        else:
            expected = _truncated(delta, ranks[name])
            assert torch.allclose(merged[key], expected, atol=1e-5 * delta.abs().max()), key


def test_stacked_experts_are_refused_for_kohya(tmp_path):
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=[], target_parameters=["mlp.experts.down_proj"])
    source, _ = _source(tmp_path, config)
    result = CliRunner().invoke(main, ["convert", str(source), "-o", str(tmp_path / "out.safetensors"),
                                       "--to", "kohya"])  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "MoE experts" in result.stderr and "--to peft" in result.stderr
    assert not (tmp_path / "out.safetensors").exists()


def _gpt_oss():
    torch.manual_seed(0)
    config = transformers.GptOssConfig(vocab_size=64, hidden_size=16, intermediate_size=8, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=1, num_local_experts=3,
                                       num_experts_per_tok=1, head_dim=8, layer_types=["full_attention"])  # fmt: skip
    return transformers.GptOssForCausalLM(config).double()


@pytest.mark.parametrize("with_base", [False, True], ids=["no-base", "base"])
def test_gpt_oss_transposed_experts_round_trip(tmp_path, with_base):
    """GPT-OSS stores its experts (E, in, out) (``is_transposed``): the written factors are the same either way,
    and PEFT's merge of the lossless conversion gives the source's ΔW back."""
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=[],
                             target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])  # fmt: skip
    source_path, source = _source(tmp_path, config, _gpt_oss)
    base = None
    if with_base:
        _gpt_oss().save_pretrained(tmp_path / "base")
        base = str(tmp_path / "base")
    checkpoint = rankscope.load(str(source_path), base=base)
    kinds = {layer.kind for layer in checkpoint.layers}
    assert kinds == ({"expert", "expert_transposed"} if with_base else {"expert"})
    rankscope.convert(checkpoint).save(tmp_path / "out")
    converted = _merged_deltas(_gpt_oss(), tmp_path / "out")
    assert set(converted) == set(source) and source
    for key in source:
        assert torch.allclose(converted[key], source[key], atol=1e-6 * source[key].abs().max()), key


def test_weighted_merge_of_two_moe_adapters(tmp_path):
    """``convert a b --weights``: the experts' Σ wᵢ·ΔWᵢ (each expert's factors joined, rank up to 2r) and the
    router are written with the sources' ``target_parameters`` (a merge has no single config to copy), and PEFT's
    merge of the result is 0.5·ΔW_a − 0.25·ΔW_b."""
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"],
                             target_parameters=["mlp.gate.weight", "mlp.experts.gate_up_proj",
                                                "mlp.experts.down_proj"])  # fmt: skip
    first, deltas_a = _source(tmp_path / "a", config)
    second, deltas_b = _source(tmp_path / "b", config, seed=2)
    out = tmp_path / "merged"
    result = CliRunner().invoke(main, ["convert", str(first), str(second), "--weights", "0.5,-0.25", "-o", str(out)])
    assert result.exit_code == 0, result.output
    written = json.loads((out / "adapter_config.json").read_text())
    assert written["target_parameters"] == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj", "mlp.gate.weight"]
    assert not any(".mlp." in target for target in written["target_modules"])
    merged = _merged_deltas(_mixtral(), out)
    assert set(merged) == set(deltas_a) == set(deltas_b)
    for key, delta in merged.items():
        expected = 0.5 * deltas_a[key] - 0.25 * deltas_b[key]
        assert torch.allclose(delta, expected, atol=1e-6 * expected.abs().max()), key
