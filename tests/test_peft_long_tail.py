"""PEFT's long tail through PEFT's own merge (the ``peft-merge`` reader, the ``rankscope[peft]`` extra).

For each tuner: a tiny Llama (hidden 32, two layers) gets the tuner from PEFT 0.21, its trainable weights are
moved off their init (many tuners start at the identity), and the adapter and the base model are saved. The
reference is PEFT's own ``merge_and_unload()`` of a float64 copy of the whole PEFT model: σ(W_merged − W0) per
layer. rankscope reads the files one module at a time and must give the same singular values.
"""

from __future__ import annotations

import copy
import json
import sys

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

peft = pytest.importorskip("peft")

from peft import PEFT_TYPE_TO_CONFIG_MAPPING, get_peft_model  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

import rankscope  # noqa: E402
from rankscope.cli import main  # noqa: E402
from rankscope.formats import detection_order  # noqa: E402

from .factories import one_line_error, saved_tiny_llama  # noqa: E402
from .factories import run_spectrum as spectrum  # noqa: E402

TARGETS = ["q_proj", "v_proj", "down_proj"]  # 32×32 twice and 32×64: square and wide layers
# PEFT type (and a variant label) → the config's arguments that fit hidden 32 / intermediate 64
TUNERS = {
    "OFT": ("OFT", {"r": 0, "oft_block_size": 8}),
    "OFT-r": ("OFT", {"r": 4, "oft_block_size": 0}),  # the other block-size convention: r blocks
    "OFT-coft": ("OFT", {"r": 0, "oft_block_size": 8, "coft": True, "eps": 0.1}),
    "OFT-block_share": ("OFT", {"r": 0, "oft_block_size": 8, "block_share": True}),
    "OFT-cayley_neumann": ("OFT", {"oft_block_size": 8, "use_cayley_neumann": True, "num_cayley_neumann_terms": 3}),
    "BOFT": ("BOFT", {"boft_block_size": 4, "boft_n_butterfly_factor": 2}),
    "HRA": ("HRA", {"r": 4}),
    "VBLORA": ("VBLORA", {"r": 4, "vector_length": 8, "num_vectors": 16}),
    "FOURIERFT": ("FOURIERFT", {"n_frequency": 50}),
    "RANDLORA": ("RANDLORA", {"r": 4}),
    "C3A": ("C3A", {"block_size": 8}),
    "MISS": ("MISS", {"r": 4}),
    "SHIRA": ("SHIRA", {"r": 2}),
    "ROAD": ("ROAD", {"group_size": 8}),
    "DELORA": ("DELORA", {"r": 4}),
    "GRALORA": ("GRALORA", {"r": 8}),
    "HIRA": ("HIRA", {"r": 4}),
    "WAVEFT": ("WAVEFT", {"n_frequency": 64}),
    "PVERA": ("PVERA", {"r": 4}),
    "DEFT": ("DEFT", {}),
    "OSF": ("OSF", {}),
    "PEANUT": ("PEANUT", {}),
    "PSOFT": ("PSOFT", {}),
    "SUPERTUNING": ("SUPERTUNING", {}),
    "GLORA": ("GLORA", {}),
    "ADAMSS": ("ADAMSS", {"r": 4}),
}
# tuners whose merge() casts to float32 inside PEFT 0.21 (rfft, a float() of the spectrum, a float32 QR, a
# float32-only init): reported exact: false, with a warning
FLOAT32_INSIDE = {"FOURIERFT", "C3A", "DEFT", "PSOFT"}
RTOL = 1e-10


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama") / "base"
    return saved_tiny_llama(path), path


def perturbed(model, config):
    """The PEFT model of a copy of ``model`` with every trainable weight moved off its init."""
    peft_model = get_peft_model(copy.deepcopy(model), config)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in peft_model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator).to(parameter.dtype))
    return peft_model


def reference_deltas(peft_model, names) -> dict[str, torch.Tensor]:
    """ΔW = W_merged − W0 per layer, from PEFT's own merge_and_unload() of a float64 copy."""
    double = copy.deepcopy(peft_model).double()
    inner = double.base_model.model
    w0 = {name: inner.get_submodule(name).get_base_layer().weight.detach().clone() for name in names}
    merged = double.merge_and_unload()
    return {name: merged.get_submodule(name).weight.detach() - w0[name] for name in names}


@pytest.fixture(scope="module", params=sorted(TUNERS))
def tuner(request, llama, tmp_path_factory):
    model, base = llama
    peft_type, arguments = TUNERS[request.param]
    config = PEFT_TYPE_TO_CONFIG_MAPPING[peft_type](target_modules=TARGETS, **arguments)
    peft_model = perturbed(model, config)
    directory = tmp_path_factory.mktemp(request.param.lower()) / "adapter"
    peft_model.save_pretrained(directory)
    names = [f"model.layers.{i}.{part}.{t}" for i in range(2) for part, t in [("self_attn", "q_proj"),
             ("self_attn", "v_proj"), ("mlp", "down_proj")]]  # fmt: skip
    return request.param, peft_type, directory, base, reference_deltas(peft_model, names)


def test_singular_values_match_peft_merge(tuner):
    label, peft_type, directory, base, deltas = tuner
    checkpoint = rankscope.load(directory, base=base)
    assert checkpoint.adapter_type == peft_type and checkpoint.config["reader"]["peft"] == peft.__version__
    analysis = rankscope.analyze(checkpoint)
    assert {record.name for record in analysis.layers} == set(deltas)
    for record in analysis.layers:
        expected = torch.linalg.svdvals(deltas[record.name])
        assert expected[0] > 1e-6  # the perturbation moved the adapter off the identity
        found = torch.tensor(record.singular_values, dtype=torch.float64)
        found = torch.nn.functional.pad(found, (0, expected.numel() - found.numel()))
        assert torch.allclose(found, expected, rtol=0, atol=RTOL * float(expected[0])), (label, record.name)
        assert record.exact == (peft_type not in FLOAT32_INSIDE)
    if peft_type in FLOAT32_INSIDE:
        assert any("float32" in warning and "exact: false" in warning for warning in checkpoint.warnings)


@pytest.mark.parametrize(
    ("peft_type", "arguments", "outside"),
    [
        ("HRA", {"r": 4, "task_type": "SEQ_CLS", "target_modules": ["q_proj", "v_proj"]}, "score"),
        ("OFT", {"r": 0, "oft_block_size": 4, "target_modules": ["embed_tokens", "q_proj"]}, "model.embed_tokens"),
    ],
    ids=["modules_to_save-head", "saved-embedding-table"],
)
def test_tensors_outside_the_tuner_are_listed_not_given_to_every_layer(tmp_path, peft_type, arguments, outside):
    """A PEFT file also holds tensors of no tuner layer — the classifier head PEFT copies into modules_to_save
    for SEQ_CLS, the embedding table it saves beside an adapted embedding: they are listed as not analysed (a
    warning, --strict fails) and every layer's σ is PEFT's merge's, where they used to be handed to every layer
    (and PEFT refused them there)."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=64, num_labels=3, pad_token_id=0)  # fmt: skip
    model = LlamaForSequenceClassification(config).eval()
    model.save_pretrained(tmp_path / "base", safe_serialization=True)
    peft_model = perturbed(model, PEFT_TYPE_TO_CONFIG_MAPPING[peft_type](**arguments))
    peft_model.save_pretrained(tmp_path / "adapter")
    stored = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert any(key.startswith(f"base_model.model.{outside}.") and peft_type.lower() not in key for key in stored)
    tuned = [key for key in stored if peft_type.lower() in key]
    candidates = ("model.embed_tokens", "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj")
    names = [layer for layer in candidates if any(f"{layer}." in key for key in tuned)]
    deltas = reference_deltas(peft_model, names)
    checkpoint = rankscope.load(tmp_path / "adapter", base=tmp_path / "base")
    analysis = rankscope.analyze(checkpoint)
    assert {record.name for record in analysis.layers} == set(deltas) and all(r.valid for r in analysis.layers)
    for record in analysis.layers:
        expected = torch.linalg.svdvals(deltas[record.name])
        found = torch.tensor(record.singular_values, dtype=torch.float64)
        found = torch.nn.functional.pad(found, (0, expected.numel() - found.numel()))
        assert torch.allclose(found, expected, rtol=0, atol=RTOL * float(expected[0])), record.name
    if outside == "score":  # a trained copy of a module: warned as not analysed (an embedding's table is W₀)
        assert [item.module for item in checkpoint.not_analysed] == ["score"]
    assert any(skipped.key.startswith(f"base_model.model.{outside}.") for skipped in checkpoint.skipped)


class EmbeddingNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(16, 8)
        self.lin = torch.nn.Linear(8, 8)


@pytest.mark.parametrize(
    ("peft_type", "arguments"), [("OFT", {"r": 0, "oft_block_size": 4}), ("HIRA", {"r": 2})], ids=["OFT", "HiRA"]
)
def test_an_embedding_not_named_so_is_told_by_the_adapters_keys(tmp_path, peft_type, arguments):
    """With a bare tensor file as base, an nn.Embedding called ``emb`` is rebuilt as an embedding because its
    adapter tensors say so (``oft_embedding_R``, ``hira_embedding_A``), not taken for a Linear (PEFT then found no
    place for them); σ as PEFT's merge's."""
    torch.manual_seed(0)
    model = EmbeddingNet()
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "base.safetensors"))
    config = PEFT_TYPE_TO_CONFIG_MAPPING[peft_type](target_modules=["emb", "lin"], **arguments)
    peft_model = perturbed(model, config)
    peft_model.save_pretrained(tmp_path / "adapter")
    assert any("_embedding_" in key for key in load_file(tmp_path / "adapter" / "adapter_model.safetensors"))
    deltas = reference_deltas(peft_model, ["emb", "lin"])
    analysis = rankscope.analyze(rankscope.load(tmp_path / "adapter", base=tmp_path / "base.safetensors"))
    records = {record.name: record for record in analysis.layers}
    assert records["emb"].kind == "embedding" and records["emb"].matrix_shape == [8, 16]
    for name, delta in deltas.items():
        expected = torch.linalg.svdvals(delta)
        found = torch.tensor(records[name].singular_values, dtype=torch.float64)
        found = torch.nn.functional.pad(found, (0, expected.numel() - found.numel()))
        assert torch.allclose(found, expected, rtol=0, atol=RTOL * float(expected[0])), name


OFT_LINEAR = [{"r": 0, "oft_block_size": 4}, {"r": 0, "oft_block_size": 4, "block_share": True}]


@pytest.mark.parametrize("arguments", OFT_LINEAR, ids=["blocks", "block_share"])
def test_oft_merge_by_blocks_matches_peft_merge_and_falls_back_off_the_blocks(arguments, monkeypatch):
    """OFT's ΔW is taken block by block from PEFT's own rotation (PEFT's merge() multiplies by it densely): equal to
    PEFT's merge() of the same layer; a rotation with a nonzero outside its diagonal blocks is left to merge()."""
    from peft.tuners.oft.layer import Linear

    from rankscope.formats.common.peft_tuner import _block_rotation_delta

    torch.manual_seed(0)
    model = torch.nn.Sequential()
    model.add_module("lin", torch.nn.Linear(16, 8, dtype=torch.float64))
    config = PEFT_TYPE_TO_CONFIG_MAPPING["OFT"](target_modules=["lin"], **arguments)
    layer = perturbed(model, config).base_model.model.lin
    assert type(layer) is Linear
    w0 = layer.get_base_layer().weight.detach().clone()
    merged = copy.deepcopy(layer)
    merged.merge(adapter_names=["default"])
    expected = merged.get_base_layer().weight.detach() - w0
    with torch.no_grad():
        found = _block_rotation_delta(peft, layer)
    assert found is not None and float(expected.abs().max()) > 1e-3
    assert torch.allclose(found, expected, rtol=0, atol=1e-13)
    original = Linear.get_delta_weight
    monkeypatch.setattr(Linear, "get_delta_weight", lambda self, adapter: original(self, adapter) + 1e-3)
    with torch.no_grad():
        assert _block_rotation_delta(peft, layer) is None  # nonzeros off the blocks: PEFT's merge() decides


@pytest.mark.parametrize(
    ("peft_type", "arguments", "base_file"),
    [("HIRA", {"r": 4}, None), ("HIRA", {"r": 4, "fan_in_fan_out": True}, "model.safetensors")],
    ids=["layout-from-config", "fan_in_fan_out-bare-file"],
)
def test_gpt2_conv1d_layers(tmp_path, peft_type, arguments, base_file):
    """GPT-2's Conv1D (weight stored (in, out)) is rebuilt as transformers' Conv1D: from the base directory's
    config.json, or for a bare tensor file from the adapter config's fan_in_fan_out."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=64, n_positions=16)).eval()
    model.save_pretrained(tmp_path / "base", safe_serialization=True)
    config = PEFT_TYPE_TO_CONFIG_MAPPING[peft_type](target_modules=["c_attn", "c_proj"], **arguments)
    peft_model = perturbed(model, config)
    peft_model.save_pretrained(tmp_path / "adapter")
    names = ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_proj"]
    deltas = reference_deltas(peft_model, names)
    base = tmp_path / "base" / base_file if base_file else tmp_path / "base"
    checkpoint = rankscope.load(tmp_path / "adapter", base=base)
    layers = {layer.name: layer for layer in checkpoint.layers}
    for name, delta in deltas.items():
        assert layers[name].kind == "conv1d_gpt2"
        found = layers[name].update.materialize()
        assert found.shape == delta.T.shape  # analysed as (out, in)
        assert float(delta.abs().max()) > 1e-6 and torch.allclose(found, delta.T, rtol=0, atol=1e-12)


def test_trainable_tokens_rows(llama, tmp_path):
    """TrainableTokens replaces rows of the embedding: ΔW = W_saved − W0 on those rows only (the reference is
    PEFT's float32 merge, exact for a copy: its float64 copy trips on its own index buffer)."""
    model, base = llama
    config = PEFT_TYPE_TO_CONFIG_MAPPING["TRAINABLE_TOKENS"](target_modules=["embed_tokens"], token_indices=[1, 5, 7])
    peft_model = perturbed(model, config)
    peft_model.save_pretrained(tmp_path / "adapter")
    w0 = model.model.embed_tokens.weight.detach().double()
    delta = peft_model.merge_and_unload().model.embed_tokens.weight.detach().double() - w0
    (layer,) = rankscope.load(tmp_path / "adapter", base=base).layers
    assert layer.kind == "embedding" and layer.exact
    found = layer.update.materialize()
    assert torch.equal(found.T, delta) and set(found.abs().sum(0).nonzero().flatten().tolist()) == {1, 5, 7}


# -- what it needs, what it refuses ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def oft_adapter(llama, tmp_path_factory):
    model, base = llama
    directory = tmp_path_factory.mktemp("oft-cli") / "adapter"
    perturbed(
        model, PEFT_TYPE_TO_CONFIG_MAPPING["OFT"](target_modules=["q_proj"], r=0, oft_block_size=8)
    ).save_pretrained(directory)
    return directory, base


def test_json_records_the_reader_and_peft_version(oft_adapter):
    directory, base = oft_adapter
    result = spectrum(directory, "--base", base, "--json", "-", "-q")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["checkpoint"]["family"] == "oft"
    assert document["checkpoint"]["config"]["reader"] == {"format": "peft-merge", "peft": peft.__version__}
    assert [layer["exact"] for layer in document["layers"]] == [True, True]


def test_without_base_one_line_names_the_flag(oft_adapter):
    directory, _ = oft_adapter
    line = one_line_error(spectrum(directory))
    assert "OFT" in line and "--base" in line and str(directory) in line


def test_without_peft_one_line_names_the_extra(oft_adapter, monkeypatch):
    directory, base = oft_adapter
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft raises ImportError
    line = one_line_error(spectrum(directory, "--base", base))
    assert line.endswith("reading OFT needs the peft extra: pip install 'rankscope[peft]'")


@pytest.mark.parametrize(
    ("peft_type", "why"),
    [("PROMPT_TUNING", "no static weight update"), ("PREFIX_TUNING", "no static weight update"),
     ("XLORA", "routed by the input")],
)  # fmt: skip
def test_tuners_without_a_static_update_are_refused_with_why(oft_adapter, tmp_path, peft_type, why):
    directory, base = oft_adapter
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": peft_type}))
    (tmp_path / "adapter_model.safetensors").write_bytes((directory / "adapter_model.safetensors").read_bytes())
    line = one_line_error(spectrum(tmp_path, "--base", base))
    assert peft_type in line and why in line


def test_native_readers_are_asked_first():
    adapter_formats = [fmt.name for fmt in detection_order() if fmt.reads == "adapter"]
    assert adapter_formats[-1] == "peft-merge"
    listing = CliRunner().invoke(main, ["formats"]).stdout
    assert "--base" in listing.split("peft-merge", 1)[1].splitlines()[0]
