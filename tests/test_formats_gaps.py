"""Gaps of the formats issue, against PEFT 0.21 itself (float64 ``merge_and_unload()``):

- LoRA configs with ``velora_config`` / ``monteclora_config`` (training-only variants: their extra tensors are
  skipped as expected, ΔW = s·B·A) and the ``init_lora_weights`` variants MiCA and orthogonal;
- the peft-merge reader on ``nn.Conv2d``, ``nn.Conv1d`` and ``nn.Embedding`` bases, where PEFT's tuner wraps them.
"""

from __future__ import annotations

import copy
import itertools
import warnings

import pytest
import torch
from torch import nn

pytest.importorskip("peft")

from peft import PEFT_TYPE_TO_CONFIG_MAPPING, LoraConfig, get_peft_model
from peft.tuners.lora.config import MontecloraConfig, VeloraConfig
from safetensors.torch import save_file

import rankscope

RTOL = 1e-10


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(24, 16)
        self.conv = nn.Conv2d(8, 16, 3, padding=1)
        self.conv1 = nn.Conv1d(8, 16, 3)
        self.a = nn.Linear(16, 12)
        self.b = nn.Linear(12, 20)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def perturbed(config):
    torch.manual_seed(0)
    base = Net()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(copy.deepcopy(base), config)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator).to(parameter.dtype))
    return base, model


def merged_sigma(model, name: str, kind: str) -> torch.Tensor:
    """σ(W_merged − W0) of module ``name`` from PEFT's merge_and_unload() of a float64 copy (analysed layout)."""
    double = copy.deepcopy(model).double().eval()
    w0 = double.base_model.model.get_submodule(name).get_base_layer().weight.detach().clone()
    delta = double.merge_and_unload().get_submodule(name).weight.detach() - w0
    return torch.linalg.svdvals(delta.T if kind == "embedding" else delta.reshape(delta.shape[0], -1))


def assert_spectrum(record, expected: torch.Tensor) -> None:
    found = torch.tensor(record.singular_values, dtype=torch.float64)
    found = torch.nn.functional.pad(found, (0, max(0, expected.numel() - found.numel())))[: expected.numel()]
    assert expected[0] > 1e-6
    assert torch.allclose(found, expected, rtol=0, atol=RTOL * float(expected[0])), record.name


@pytest.mark.parametrize(
    ("arguments", "skipped_marker"),
    [
        ({"velora_config": VeloraConfig(num_groups=2)}, "lora_velora_embed"),
        ({"monteclora_config": MontecloraConfig(num_samples=2)}, "lora_monteclora_sampler"),
        ({"init_lora_weights": "mica"}, None),
        ({"init_lora_weights": "orthogonal"}, None),
    ],
    ids=["velora", "monteclora", "mica", "orthogonal"],
)
def test_lora_variants_match_peft_merge(tmp_path, arguments, skipped_marker):
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["a", "b"], **arguments)
    _, model = perturbed(config)
    if skipped_marker == "lora_velora_embed":  # a training step fills VeLoRA's projection
        model.train()
        model(torch.randn(4, 16)).sum().backward()
    model.save_pretrained(tmp_path / "adapter")
    checkpoint = rankscope.load(tmp_path / "adapter")
    analysis = rankscope.analyze(checkpoint)
    assert {record.name for record in analysis.layers} == {"a", "b"}
    for record in analysis.layers:
        assert_spectrum(record, merged_sigma(model, record.name, "linear"))
    assert not checkpoint.warnings  # nothing left unexplained
    if skipped_marker:
        skipped = [s for s in checkpoint.skipped if skipped_marker in s.key]
        assert skipped and all(s.expected for s in skipped)
        assert any("training only" in note for note in checkpoint.notes)


# (tuner, arguments, target, analysed kind): every case PEFT 0.21 wraps among Conv2d, Conv1d and Embedding for
# the peft-merge tuners (probed: VBLoRA, FourierFT, C3A, RandLoRA, … refuse these layer types themselves)
LAYER_CASES = [
    ("OFT", {"r": 0, "oft_block_size": 8}, "conv", "conv2d"),
    ("OFT", {"r": 0, "oft_block_size": 8}, "embed_tokens", "embedding"),
    ("BOFT", {"boft_block_size": 4, "boft_n_butterfly_factor": 2}, "conv", "conv2d"),
    ("HRA", {"r": 4}, "conv", "conv2d"),
    ("HIRA", {"r": 4}, "conv", "conv2d"),
    ("HIRA", {"r": 4}, "conv1", "conv1d"),
    ("HIRA", {"r": 4}, "embed_tokens", "embedding"),
]


@pytest.mark.parametrize(("peft_type", "arguments", "target", "kind"), LAYER_CASES, ids=lambda v: str(v)[:12])
def test_peft_merge_on_conv_and_embedding(tmp_path, peft_type, arguments, target, kind):
    config = PEFT_TYPE_TO_CONFIG_MAPPING[peft_type](target_modules=[target], **arguments)
    base, model = perturbed(config)
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, tmp_path / "base.safetensors")
    model.save_pretrained(tmp_path / "adapter")
    checkpoint = rankscope.load(tmp_path / "adapter", base=tmp_path / "base.safetensors")
    (layer,) = checkpoint.layers
    assert layer.kind == kind and checkpoint.config["reader"]["peft"]  # read through PEFT's merge
    (record,) = rankscope.analyze(checkpoint).layers
    assert_spectrum(record, merged_sigma(model, target, kind))


def test_peft_merge_refuses_a_layer_type_peft_cannot_wrap(tmp_path):
    """A VBLoRA adapter (Linear only in PEFT 0.21) against a base whose module is a Conv2d: one line naming it."""
    config = PEFT_TYPE_TO_CONFIG_MAPPING["VBLORA"](target_modules=["a"], r=4, vector_length=4, num_vectors=16)
    base, model = perturbed(config)
    model.save_pretrained(tmp_path / "adapter")
    state = {k: v.contiguous() for k, v in base.state_dict().items()}
    state["a.weight"] = torch.randn(12, 16, 1, 1)  # the same (out, in) as a 1×1 conv
    save_file(state, tmp_path / "base.safetensors")
    with pytest.raises(rankscope.RankscopeError) as caught:
        rankscope.analyze(rankscope.load(tmp_path / "adapter", base=tmp_path / "base.safetensors"))
    message = str(caught.value)
    assert "\n" not in message and "Conv2d" in message


PARAMETERS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def test_expert_slices_get_their_base_weight(tmp_path):
    """MoE experts (Mixtral, target_parameters) with --base: each ``<parameter>[e]`` is measured against the
    parameter's slice e; the relative update ‖ΔW_e‖_F/‖W_e‖_F from PEFT's float64 merge."""
    transformers = pytest.importorskip("transformers")
    config = transformers.MixtralConfig(
        vocab_size=64, hidden_size=32, intermediate_size=24, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=3, num_experts_per_tok=2, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.MixtralForCausalLM(config)
        model.save_pretrained(tmp_path / "base")
        w0 = {n: p.detach().double().clone() for n, p in model.named_parameters()}
        peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_parameters=PARAMETERS))
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(1)))
        peft_model.save_pretrained(tmp_path / "adapter")
        merged = dict(copy.deepcopy(peft_model).double().merge_and_unload().named_parameters())
    checkpoint = rankscope.load(tmp_path / "adapter", base=tmp_path / "base")
    analysis = rankscope.analyze(checkpoint)
    assert not any("no base weight" in w or "base model has no" in w for w in analysis.warnings)
    records = {record.name: record for record in analysis.layers}
    paths = [f"model.layers.0.{p}" for p in PARAMETERS]
    assert set(records) == {f"{path}[{e}]" for path in paths for e in range(3)}
    for parameter, e in itertools.product(paths, range(3)):
        base_e = w0[parameter][e]
        delta = merged[parameter].detach()[e] - base_e
        expected = float(delta.norm() / base_e.norm())
        assert expected > 1e-3
        fields = records[f"{parameter}[{e}]"].base
        assert fields is not None
        relative = fields.get("relative_update", fields.get("relative_frobenius"))
        assert relative == pytest.approx(expected, rel=1e-9), fields
