"""PEFT LN tuning against PEFT's own merge: full copies of norms (vector updates, ΔW = diag(Δγ)) and of a Linear
(dense ΔW = W_saved − W₀), read with --base; the reference is ``merge_and_unload()`` of a float64 copy."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from click.testing import CliRunner

import rankscope
from rankscope.cli import main
from rankscope.core.errors import CheckpointError

from .factories import records

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

TOL = 1e-10


def _save(root, model, config):
    """Base and adapter directories, and PEFT's float64 merge minus the base by parameter name."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(root / "base")
        base = {name: p.detach().double().clone() for name, p in model.named_parameters()}
        peft_model = peft.get_peft_model(model, config)
        generator = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "ln_tuning_layers" in name:
                    param.add_(torch.randn(param.shape, generator=generator))
        peft_model.save_pretrained(root / "adapter")
        merged = copy.deepcopy(peft_model).double().merge_and_unload()
    deltas = {name: p.detach() - base[name] for name, p in merged.named_parameters()}
    return root / "adapter", root / "base", {name: d for name, d in deltas.items() if d.abs().max() > 0}


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    """BERT's LayerNorms (weight and bias) and one Linear (``attention.self.query``)."""
    config = transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48
    )
    model = transformers.BertModel(config)
    return _save(tmp_path_factory.mktemp("bert"), model, peft.LNTuningConfig(target_modules=["LayerNorm", "query"]))


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """Llama's RMSNorms, PEFT's default targets."""
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2,
    )  # fmt: skip
    return _save(tmp_path_factory.mktemp("llama"), transformers.LlamaForCausalLM(config), peft.LNTuningConfig())


def _assert_sigma(record, delta: torch.Tensor) -> None:
    assert record.valid, record.error
    assert record.exact is True
    reference = torch.linalg.svdvals(delta)
    sigma = torch.tensor(record.singular_values, dtype=torch.float64)
    assert sigma.numel() == reference.numel() and reference[-1] > 0
    rel = ((sigma - reference).abs() / reference[0]).max().item()
    assert rel <= TOL, f"{record.name}: relative error {rel:.2e}"


def test_layernorm_and_linear_copies_match_peft_merge(bert):
    adapter, base, deltas = bert
    got = records(adapter, base=base)
    weights = {name.removesuffix(".weight"): d for name, d in deltas.items() if name.endswith(".weight")}
    assert set(got) == set(weights) and len(weights) == 2 * 2 + 1 + 2  # LayerNorms, query
    for name, delta in weights.items():
        record = got[name]
        if delta.ndim == 1:  # a norm: the diagonal scaling it changes
            assert (record.kind, record.family, record.rank_bound) == ("vector", "ln-tuning", delta.numel())
            _assert_sigma(record, torch.diag(delta))
            bias = deltas[f"{name}.bias"]
            assert record.bias_update["norm"] == pytest.approx(float(bias.norm()), rel=1e-12)
        else:
            assert record.kind == "linear" and tuple(record.shape) == tuple(delta.shape)
            _assert_sigma(record, delta)


def test_rmsnorm_copies_match_peft_merge(llama):
    adapter, base, deltas = llama
    got = records(adapter, base=base)
    assert set(got) == {name.removesuffix(".weight") for name in deltas}
    for name, delta in deltas.items():
        record = got[name.removesuffix(".weight")]
        assert record.bias_update is None
        _assert_sigma(record, torch.diag(delta))
    assert got["model.layers.1.input_layernorm"].layer_index == 1
    sigma = got["model.norm"].singular_values  # σ = |Δγ| sorted
    assert sigma == sorted(deltas["model.norm.weight"].abs().tolist(), reverse=True)


def test_without_base_one_line_naming_the_argument(llama, tmp_path):
    adapter, _, _ = llama
    with pytest.raises(CheckpointError) as caught:
        rankscope.load(adapter)
    assert caught.value.arguments == ("base",) and "pass base" in str(caught.value)
    result = CliRunner().invoke(main, ["spectrum", str(adapter)])
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "--base" in lines[0] and str(adapter) in lines[0]
