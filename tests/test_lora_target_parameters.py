"""LoRA on parameters (PEFT's ``target_parameters``: MoE expert tensors) against PEFT's own merge.

Tiny MoE models built offline (Mixtral, Qwen3-MoE: experts stored (E, out, in); GPT-OSS: (E, in, out)), adapters
written by ``save_pretrained`` with lora_B perturbed from zero; the reference is ``merge_and_unload()`` of a float64
copy of the PEFT model, minus the float64 base: every expert's σ against ``svdvals((W_merged − W₀)[e])``.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import rankscope
from rankscope.core import naming

from .factories import records

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

TOL = 1e-10
EXPERTS, LAYERS = 4, 2


def _mixtral():
    config = transformers.MixtralConfig(
        vocab_size=64, hidden_size=32, intermediate_size=24, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=EXPERTS, num_experts_per_tok=2, max_position_embeddings=64,
    )  # fmt: skip
    return transformers.MixtralForCausalLM(config)


def _qwen3_moe():
    config = transformers.Qwen3MoeConfig(
        vocab_size=64, hidden_size=32, intermediate_size=40, moe_intermediate_size=20, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=EXPERTS, num_experts_per_tok=2,
        max_position_embeddings=64, decoder_sparse_step=1, mlp_only_layers=[],
    )  # fmt: skip
    return transformers.Qwen3MoeForCausalLM(config)


def _gpt_oss():
    config = transformers.GptOssConfig(
        vocab_size=64, hidden_size=32, intermediate_size=24, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, num_local_experts=EXPERTS, num_experts_per_tok=2,
        max_position_embeddings=64, layer_types=["full_attention"] * LAYERS,
    )  # fmt: skip
    return transformers.GptOssForCausalLM(config)


class Case:
    """A saved adapter, its base model directory, and PEFT's float64 merge minus the base, by parameter path."""

    def __init__(self, root, build, **lora):
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = build()
            self.base = root / "base"
            model.save_pretrained(self.base)
            base64 = {name: p.detach().double().clone() for name, p in model.named_parameters()}
            self.peft_model = peft.get_peft_model(model, peft.LoraConfig(**lora))
            generator = torch.Generator().manual_seed(1)
            with torch.no_grad():
                for name, param in self.peft_model.named_parameters():
                    if "lora_B" in name:
                        param.copy_(torch.randn(param.shape, generator=generator))
            self.adapter = root / "adapter"
            self.peft_model.save_pretrained(self.adapter)
            merged = copy.deepcopy(self.peft_model).double().merge_and_unload()
        self.deltas = {
            name: p.detach() - base64[name]
            for name, p in merged.named_parameters()
            if not torch.equal(p.detach(), base64[name])
        }


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    """q_proj by target_modules, both expert parameters by target_parameters (nested wrappers)."""
    return Case(
        tmp_path_factory.mktemp("mixtral"), _mixtral, r=4, lora_alpha=8, target_modules=["q_proj"],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    )  # fmt: skip


@pytest.fixture(scope="module")
def all_linear(tmp_path_factory):
    """Qwen3-MoE under ``all-linear``: PEFT adds the experts and the router's ``gate.weight`` by itself, with a
    rank_pattern of its own (gate_up_proj at 2r); one alpha_pattern of ours, rsLoRA."""
    return Case(
        tmp_path_factory.mktemp("qwen3moe"), _qwen3_moe, r=4, lora_alpha=8, target_modules="all-linear",
        alpha_pattern={"down_proj": 3}, use_rslora=True,
    )  # fmt: skip


@pytest.fixture(scope="module")
def gpt_oss(tmp_path_factory):
    """GPT-OSS stores experts (E, in, out) (``is_transposed``): one parameter, read with --base."""
    return Case(tmp_path_factory.mktemp("gptoss"), _gpt_oss, r=4, lora_alpha=8, target_parameters=["down_proj"])


def _expected(case: Case, transposed: bool = False) -> dict[str, torch.Tensor]:
    """Reference ΔW per layer as rankscope names it: `<parameter>[e]` for each expert of a 3-D parameter (the
    stored slice; (in, out) for a transposed layout), the module for a 2-D ``weight``."""
    deltas = {}
    for name, delta in case.deltas.items():
        if delta.ndim == 3:
            deltas |= {f"{name}[{e}]": delta[e] for e in range(delta.shape[0])}
        else:
            deltas[name.removesuffix(".weight")] = delta
    return deltas


def _assert_spectra(got: dict, expected: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(expected)
    for name, delta in expected.items():
        record = got[name]
        assert record.valid, f"{name}: {record.error}"
        assert record.exact is True
        assert tuple(record.shape) == tuple(delta.shape), name
        reference = torch.linalg.svdvals(delta)
        sigma = torch.tensor(record.singular_values, dtype=torch.float64)
        k = sigma.numel()
        assert reference[k - 1] > 1e-3 * reference[0]  # full rank r: the test can fail
        rel = ((sigma - reference[:k]).abs() / reference[:k]).max().item()
        assert rel <= TOL, f"{name}: relative error {rel:.2e}"
        assert reference[k:].sum() <= TOL * reference[0], f"{name}: rank beyond the bound"


@pytest.mark.parametrize("with_base", [False, True], ids=["alone", "base"])
def test_nested_expert_parameters_match_peft_merge(mixtral, with_base):
    got = records(mixtral.adapter, base=mixtral.base if with_base else None)
    expected = _expected(mixtral)
    assert sum(name.endswith("]") for name in expected) == 2 * LAYERS * EXPERTS
    _assert_spectra(got, expected)
    record = got["model.layers.1.mlp.experts.gate_up_proj[3]"]
    assert (record.module_type, record.layer_index, record.expert_index) == ("gate_up_proj", 1, 3)
    assert record.kind == "expert"
    assert got["model.layers.0.mlp.experts.down_proj[2]"].module_type == "down_proj"
    assert record.params == 4 * (48 + 32)
    assert rankscope.load(mixtral.adapter).params == sum(
        p.numel() for name, p in mixtral.peft_model.named_parameters() if "lora_" in name
    )


def test_all_linear_adds_experts_and_router(all_linear):
    config = all_linear.peft_model.peft_config["default"]
    assert "gate_up_proj" in config.target_parameters and config.rank_pattern  # PEFT's own additions
    got = records(all_linear.adapter)
    _assert_spectra(got, _expected(all_linear))
    assert got["model.layers.0.mlp.experts.gate_up_proj[0]"].rank_bound == 8  # PEFT's rank_pattern
    assert got["model.layers.0.mlp.experts.down_proj[1]"].scale == pytest.approx(3 / 2)  # α / √r, alpha_pattern
    gate = got["model.layers.1.mlp.gate"]
    assert (gate.module_type, gate.layer_index, gate.kind) == ("gate", 1, "linear")


def test_transposed_experts_take_their_layout_from_base(gpt_oss):
    got = records(gpt_oss.adapter, base=gpt_oss.base)
    expected = _expected(gpt_oss)
    assert next(iter(expected.values())).shape == (24, 32)  # (in, out): GPT-OSS's down_proj
    _assert_spectra(got, expected)
    assert {record.kind for record in got.values()} == {"expert_transposed"}
    alone = rankscope.load(gpt_oss.adapter)
    assert {tuple(layer.shape) for layer in alone.layers} == {(32, 24)}  # (out, in) assumed, and said
    assert any("--base" in note for note in alone.notes)


def test_expert_count_needs_r_or_base(mixtral, tmp_path):
    import json
    import shutil

    adapter = shutil.copytree(mixtral.adapter, tmp_path / "adapter")
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["r"] = 3  # 16 rows of A are no whole number of experts of r = 3
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    checkpoint = rankscope.load(adapter)
    bad = [layer for layer in checkpoint.layers if layer.error]
    assert bad and all("r=3" in layer.error and "lora_A" in layer.error for layer in bad)
    assert naming.layer_index(bad[0].name) is not None
