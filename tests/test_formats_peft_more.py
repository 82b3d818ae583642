"""LoRA options PEFT 0.21.2 writes beside its factors, against PEFT's own merge or forward (float64).

A tiny Llama (hidden 32, two layers) gets a LoRA from PEFT with the option under test; every trainable weight is
moved off its init; the adapter and the base are saved by PEFT / transformers. The reference ΔW of a layer is
PEFT's ``merge_and_unload()`` of a float64 copy minus W0, or, where that merge is not what the model applies
(``layer_replication``: copies share one base tensor), the PEFT layer's own forward on the identity.
"""

from __future__ import annotations

import copy

import pytest
import torch
from click.testing import CliRunner

peft = pytest.importorskip("peft")

from peft import LoraConfig, get_peft_model  # noqa: E402

import rankscope  # noqa: E402
from rankscope.cli import main  # noqa: E402
from rankscope.core.base import BaseWeights  # noqa: E402
from rankscope.formats.common.lora_replication import ReplicatedBase, sources  # noqa: E402

from .factories import saved_tiny_llama  # noqa: E402

RTOL = 1e-10
TARGETS = ["q_proj", "v_proj"]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama") / "base"
    return saved_tiny_llama(path), path


def perturbed(model, **options):
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, **options))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in peft_model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator).to(parameter.dtype))
    return peft_model


def saved(peft_model, tmp_path):
    directory = tmp_path / "adapter"
    peft_model.save_pretrained(directory)
    return directory


def merged_deltas(peft_model, base_model, names) -> dict[str, torch.Tensor]:
    """ΔW = W_merged − W0 per layer from PEFT's merge_and_unload() of a float64 copy (an embedding as (d, V))."""
    merged = copy.deepcopy(peft_model).double().merge_and_unload()
    w0 = {name: base_model.get_submodule(name).weight.detach().double() for name in names}
    deltas = {name: merged.get_submodule(name).weight.detach() - w0[name] for name in names}
    return {name: delta.T if "embed" in name else delta for name, delta in deltas.items()}


def assert_spectra(analysis, deltas: dict[str, torch.Tensor]) -> dict:
    records = {record.name: record for record in analysis.layers}
    assert set(records) == set(deltas)
    for name, delta in deltas.items():
        record = records[name]
        assert record.valid, record.error
        assert record.matrix_shape == list(delta.shape), name
        expected = torch.linalg.svdvals(delta)
        found = torch.tensor(record.singular_values, dtype=torch.float64)
        assert expected[record.rank_bound - 1] > 1e-6 * expected[0], "the setup must reach the rank bound"
        found = torch.nn.functional.pad(found, (0, expected.numel() - found.numel()))
        assert torch.allclose(found, expected, rtol=0, atol=RTOL * float(expected[0])), name
    return records


LORA_LAYERS = [f"model.layers.{i}.self_attn.{t}" for i in range(2) for t in TARGETS]


# -- trainable_token_indices -----------------------------------------------------------------------------------


@pytest.mark.parametrize("indices", [[3, 5, 9, 60], {"embed_tokens": [1, 2]}])
def test_trainable_tokens_are_embedding_rows_against_the_base(llama, tmp_path, indices):
    model, base = llama
    peft_model = perturbed(model, trainable_token_indices=indices)
    directory = saved(peft_model, tmp_path)
    deltas = merged_deltas(peft_model, model, [*LORA_LAYERS, "model.embed_tokens"])
    records = assert_spectra(rankscope.analyze(rankscope.load(directory, base=base)), deltas)
    tokens = records["model.embed_tokens"]
    count = len(indices) if isinstance(indices, list) else 2
    assert (tokens.kind, tokens.family, tokens.rank_bound) == ("embedding", "trainable-tokens", count)
    assert tokens.shape == [64, 32] and tokens.exact is True

    without = {record.name: record for record in rankscope.analyze(rankscope.load(directory)).layers}
    assert not without["model.embed_tokens"].valid and "pass --base BASE" in without["model.embed_tokens"].error
    assert all(without[name].valid for name in LORA_LAYERS)


# -- layer_replication -----------------------------------------------------------------------------------------


def forward_delta(lora_layer) -> torch.Tensor:
    """ΔW a PEFT LoRA layer applies: its forward on the identity minus its base layer's (float64)."""
    eye = torch.eye(lora_layer.in_features, dtype=torch.float64)
    with torch.no_grad():
        return (lora_layer(eye) - lora_layer.get_base_layer()(eye)).T


def test_layer_replication_follows_each_copys_forward(llama, tmp_path):
    model, base = llama
    peft_model = perturbed(model, layer_replication=[[1, 2], [0, 2]])  # layers [1, 0, 1] of the base
    directory = saved(peft_model, tmp_path)
    double = copy.deepcopy(peft_model).double()
    names = [f"model.layers.{i}.self_attn.{t}" for i in range(3) for t in TARGETS]
    deltas = {name: forward_delta(double.base_model.model.get_submodule(name)) for name in names}
    checkpoint = rankscope.load(directory, base=base)
    assert_spectra(rankscope.analyze(checkpoint), deltas)
    assert any("layer 0 is a copy of base layer 1" in note for note in checkpoint.notes)
    # base lookups (Conv1D layout, PiSSA) find the tensor each copy shares in PEFT's replicated model
    seen = ReplicatedBase(BaseWeights(base), sources([[1, 2], [0, 2]], None))
    for name in names:
        shared = peft_model.base_model.model.get_submodule(name).get_base_layer().weight
        assert torch.equal(seen.get(name), shared.detach()), name
    # why not PEFT's merge: the copies share one base tensor, into which merge_and_unload() adds both updates
    merged = copy.deepcopy(peft_model).double().merge_and_unload()
    first, second = "model.layers.0.self_attn.q_proj", "model.layers.2.self_attn.q_proj"
    w0 = model.get_submodule("model.layers.1.self_attn.q_proj").weight.double()
    summed = merged.get_submodule(second).weight - w0
    assert torch.allclose(summed, deltas[first] + deltas[second], atol=1e-12)


def test_layer_replication_with_dora_is_still_refused_by_name(llama, tmp_path):
    model, base = llama
    directory = saved(perturbed(model, layer_replication=[[0, 2], [1, 2]], use_dora=True), tmp_path)
    result = CliRunner().invoke(main, ["spectrum", str(directory), "--base", str(base), "-q"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "layer_replication" in result.stderr and len(result.stderr.strip().splitlines()) == 1


# -- QA-LoRA and BD-LoRA ---------------------------------------------------------------------------------------


def test_qalora_matches_peft_s_own_forward(llama, tmp_path):
    """PEFT builds QA-LoRA only on GPTQ layers (and cannot merge it); here its own QALoraLinearVariant reshapes
    plain Linear layers' A to (r, n/g) and its forward, on the identity, is the reference: ΔW = s·B·A·P."""
    from peft.tuners.lora.variants import QALoraLinearVariant

    model, _ = llama
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_qalora=True, qalora_group_size=8)
    peft_model = get_peft_model(copy.deepcopy(model), config)
    layers = {name: peft_model.base_model.model.get_submodule(name) for name in LORA_LAYERS}
    generator = torch.Generator().manual_seed(2)
    for layer in layers.values():
        QALoraLinearVariant.init(layer, "default", config)
        with torch.no_grad():
            for factor in (layer.lora_A["default"].weight, layer.lora_B["default"].weight):
                factor.copy_(torch.randn(factor.shape, generator=generator))
    directory = saved(peft_model, tmp_path)
    deltas = {}
    for name, layer in layers.items():
        layer = copy.deepcopy(layer).double()
        eye = torch.eye(layer.in_features, dtype=torch.float64)
        with torch.no_grad():
            deltas[name] = QALoraLinearVariant.forward(layer, "default", eye, torch.zeros(32, 32).double()).T
    records = assert_spectra(rankscope.analyze(rankscope.load(directory)), deltas)
    assert all(record.rank_bound == 4 and record.matrix_shape == [32, 32] for record in records.values())


def test_bdlora_matches_peft_merge(llama, tmp_path):
    from peft.tuners.lora.config import BdLoraConfig

    model, _ = llama
    layout = BdLoraConfig(target_modules_bd_a=["q_proj"], target_modules_bd_b=["v_proj"], nblocks=2)
    peft_model = perturbed(model, use_bdlora=layout)
    stored = peft_model.base_model.model.get_submodule(LORA_LAYERS[0]).lora_A["default"].weight
    assert list(stored.shape) == [4, 16]  # the compact block-diagonal A
    directory = saved(peft_model, tmp_path)
    records = assert_spectra(
        rankscope.analyze(rankscope.load(directory)), merged_deltas(peft_model, model, LORA_LAYERS)
    )
    assert all(record.rank_bound == 4 for record in records.values())


# -- KaSA ------------------------------------------------------------------------------------------------------


def test_kasa_against_the_original_base_matches_peft_merge(llama, tmp_path):
    """KaSA truncates the base at init (float32 SVD) and trains lora_diag: PEFT's merge minus the original W0."""
    from peft.tuners.lora.config import KasaConfig
    from peft.tuners.lora.variants import KasaLinearVariant

    model, base = llama
    peft_model = perturbed(model, kasa_config=KasaConfig())
    directory = saved(peft_model, tmp_path)
    deltas = merged_deltas(peft_model, model, LORA_LAYERS)
    checkpoint = rankscope.load(directory, base=base)
    records = {record.name: record for record in rankscope.analyze(checkpoint).layers}
    for name, delta in deltas.items():
        record = records[name]
        assert record.valid and record.family == "kasa" and record.exact is True and record.rank_bound == 8
        expected = torch.linalg.svdvals(delta)
        found = torch.nn.functional.pad(torch.tensor(record.singular_values, dtype=torch.float64), (0, 32 - 8))
        # W_trunc carries float32 rounding (full rank, ~eps32·σ1(W0)) that is not the adapter's update
        tolerance = 1e-5 * float(torch.linalg.matrix_norm(model.get_submodule(name).weight.detach().double(), 2))
        assert torch.allclose(found, expected, rtol=0, atol=tolerance), name
        assert expected[7] > 50 * tolerance  # the dropped components stand well above the tolerance

    without = rankscope.load(directory)
    assert all(not layer.exact for layer in without.layers) and any("KaSA" in w for w in without.warnings)
    trained = {record.name: record for record in rankscope.analyze(without).layers}
    for name in LORA_LAYERS:  # s·B·diag(d)·A alone: the delta PEFT's KaSA merge adds to the truncated base
        layer = peft_model.base_model.model.get_submodule(name)
        with torch.no_grad():
            reference = torch.linalg.svdvals(KasaLinearVariant._get_delta_weight(layer, "default").double())[:4]
        assert torch.allclose(
            torch.tensor(trained[name].singular_values[:4], dtype=torch.float64), reference, rtol=1e-5
        ), name
