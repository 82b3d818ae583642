"""Quantised bases (``--base``): bitsandbytes 4-bit (NF4/FP4, with and without double quantisation, float32 and
bfloat16) and 8-bit models written by transformers' ``BitsAndBytesConfig`` + ``save_pretrained`` (bitsandbytes
runs on the CPU), dequantised by rankscope without bitsandbytes and compared, in float64, with bitsandbytes' own
``dequantize_4bit`` / ``int8_vectorwise_dequant`` (through PEFT's ``dequantize_bnb_weight``, what PEFT merges
with); then a LoRA's base metrics against that W₀; GPTQ/AWQ bases refused in one line naming the format.

Every reference comes from bitsandbytes (or from formulas written here), never from rankscope.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import bitsandbytes as bnb  # a test extra: the reference dequantiser (never imported by rankscope)
import pytest
import torch
import transformers
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import rankscope
from rankscope.cli import main
from rankscope.core import quantised
from rankscope.core.base import BaseWeights
from rankscope.core.errors import CheckpointError

from .factories import quiet_library_warnings  # noqa: F401  (autouse)

MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.down_proj", "mlp.up_proj")
NF4, FP4 = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}, {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4"}
DOUBLE = {"bnb_4bit_use_double_quant": True}
CONFIGS = {  # name → (BitsAndBytesConfig keywords, model dtype)
    "nf4": (NF4, torch.float32),
    "fp4": (FP4, torch.float32),
    "nf4-double": (NF4 | DOUBLE, torch.float32),
    "fp4-double": (FP4 | DOUBLE, torch.float32),
    # QLoRA's usual setting: a bfloat16 model, codes stored in bfloat16 words (FSDP's quant_storage)
    "nf4-bf16": (
        NF4 | DOUBLE | {"bnb_4bit_compute_dtype": torch.bfloat16, "bnb_4bit_quant_storage": torch.bfloat16},
        torch.bfloat16,
    ),
    "int8": ({"load_in_8bit": True}, torch.float32),
}


def _tiny_llama():
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{name: directory} of the float32 model and each quantised save, and {name: quantised model}."""
    root = tmp_path_factory.mktemp("quantised")
    _tiny_llama().save_pretrained(root / "float")
    dirs, loaded = {"float": root / "float"}, {}
    for name, (keywords, dtype) in CONFIGS.items():
        model = transformers.LlamaForCausalLM.from_pretrained(
            root / "float",
            quantization_config=transformers.BitsAndBytesConfig(**keywords),
            device_map="cpu",
            dtype=dtype,
        )
        model.save_pretrained(root / name)
        dirs[name], loaded[name] = root / name, model
    return dirs, loaded


def _library_weight(model, module: str) -> torch.Tensor:
    """bitsandbytes' dequantisation of a loaded quantised linear (PEFT's helper: dequantize_4bit / int8)."""
    from peft.utils.integrations import dequantize_bnb_weight

    linear = model.get_submodule(module)
    return dequantize_bnb_weight(linear.weight, getattr(linear, "state", None))


def _names(layers: int = 2) -> list[str]:
    return [f"model.layers.{i}.{m}" for i in range(layers) for m in MODULES]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_dequantised_base_is_bitsandbytes_own(models, name):
    dirs, loaded = models
    stored = load_file(str(dirs[name] / "model.safetensors"))
    marker = "SCB" if name == "int8" else "weight.absmax"
    assert any(key.endswith(marker) for key in stored), "the save is not quantised: the test would prove nothing"
    base = BaseWeights(dirs[name])
    original = load_file(str(dirs["float"] / "model.safetensors"))
    for module in _names():
        expected = _library_weight(loaded[name], module)
        got = base.get(module)
        assert got.dtype == expected.dtype and tuple(got.shape) == tuple(expected.shape) == base.shape(module)
        assert torch.equal(got.double(), expected.double()), module  # to the last bit (±0 aside)
        # and it is a dequantisation, not the original weight: the comparison above could fail
        error = (got.double() - original[f"{module}.weight"].double()).norm() / original[f"{module}.weight"].norm()
        assert 1e-3 < float(error) < 0.3
    described = set(base.dequantised.values())
    assert len(described) == 1 and ("8-bit" in next(iter(described)) if name == "int8" else name[:3] in str(described))
    assert ("double quantisation" in str(described)) == ("double" in name or name == "nf4-bf16")


def _state_dict(weight: torch.Tensor, blocksize: int, quant_type: str, nested: bool) -> tuple[dict, object]:
    import bitsandbytes.functional as F

    packed, state = F.quantize_4bit(weight, blocksize=blocksize, quant_type=quant_type, compress_statistics=nested)
    parts = {"w.weight": packed, **{f"w.weight.{k}": v for k, v in state.as_dict(packed=True).items()}}
    return parts, (packed, state)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize(("shape", "blocksize"), [((33, 70), 128), ((5, 96), 256), ((40, 64), 64)])
def test_blocks_across_rows_and_a_partial_last_block(quant_type, nested, shape, blocksize):
    """Blocks run over the flattened weight (here across rows, the last one partial). The reference is
    bitsandbytes' PyTorch kernel (what CUDA computes too): its CPU C kernel indexes blocks per row where a row is
    shorter than a block, and disagrees with both there (bitsandbytes 0.50.2)."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.backends.utils import _get_4bit_code

    torch.manual_seed(1)
    weight = torch.randn(shape) * 0.05
    parts, (packed, state) = _state_dict(weight, blocksize, quant_type, nested)
    absmax = state.absmax
    if nested:  # bitsandbytes' own step: dequantize_blockwise of the absmax, then + offset
        absmax = bnb.functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
    kernel = getattr(_dequantize_4bit_compute, "__wrapped__", _dequantize_4bit_compute)  # not torch.compile'd
    expected = kernel(packed.reshape(-1), absmax, _get_4bit_code(quant_type, "cpu"), blocksize, shape, torch.float32)
    got = quantised.dequantise_stored("w.weight", parts, parts.__getitem__, "test")
    assert torch.equal(got.double(), expected.double())
    if shape[1] % blocksize == 0:  # rows of whole blocks: the public function agrees as well
        assert torch.equal(got.double(), bnb.functional.dequantize_4bit(packed, state).double())


def test_a_quant_map_that_is_not_the_table_is_refused():
    parts, _ = _state_dict(torch.randn(8, 64), 64, "nf4", False)
    parts["w.weight.quant_map"] = parts["w.weight.quant_map"].flip(0)
    with pytest.raises(CheckpointError, match=r"tensor 'w.weight': quant_map is not bitsandbytes' nf4 table"):
        quantised.dequantise_stored("w.weight", parts, parts.__getitem__, "test")


@pytest.fixture(scope="module")
def adapter(models, tmp_path_factory):
    """A PEFT LoRA (r=4, random B) of the float model, and ΔW = s·B·A per layer in float64 from PEFT's modules."""
    from peft import LoraConfig, get_peft_model

    dirs, _ = models
    model = transformers.LlamaForCausalLM.from_pretrained(dirs["float"])
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    deltas = {}
    for name, module in peft_model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            b, a = module.lora_B["default"].weight.double(), module.lora_A["default"].weight.double()
            deltas[name.removeprefix("base_model.model.")] = module.scaling["default"] * (b @ a)
    path = tmp_path_factory.mktemp("qlora") / "adapter"
    peft_model.save_pretrained(path)
    return path, deltas


@pytest.mark.parametrize("name", list(CONFIGS))
def test_lora_against_a_quantised_base(models, adapter, name, tmp_path, monkeypatch):
    monkeypatch.setenv("RANKSCOPE_CACHE", str(tmp_path / "cache"))
    dirs, loaded = models
    path, deltas = adapter
    analysis = rankscope.analyze(rankscope.load(path, base=dirs[name]))
    assert {record.name for record in analysis} == set(deltas)
    float_base = load_file(str(dirs["float"] / "model.safetensors"))
    for record in analysis:
        w0 = _library_weight(loaded[name], record.name).double()
        delta = deltas[record.name]
        got = record.base
        assert got["weight_frobenius"] == pytest.approx(float(w0.norm()), rel=1e-12)
        assert got["weight_sigma_max"] == pytest.approx(float(torch.linalg.svdvals(w0)[0]), rel=1e-12)
        expected = float(delta.norm() / w0.norm())
        assert got["relative_update"] == pytest.approx(expected, rel=1e-10)
        # the unquantised base gives a measurably different answer: the check above could fail
        unquantised = float(delta.norm() / float_base[f"{record.name}.weight"].double().norm())
        assert abs(unquantised - expected) > 1e-6 * expected
        u0 = torch.linalg.svd(w0, full_matrices=False).U
        u = torch.linalg.svd(w0 + delta, full_matrices=False).U
        cosine = (u[:, :10].T @ u0).abs().max(dim=1).values
        assert got["intruders"]["indices"] == [i for i in range(10) if cosine[i] < 0.5]
    (note,) = [n for n in analysis.notes if n.startswith("the base is quantised (bitsandbytes")]
    assert "the weight the adapter was trained against" in note and "quantisation error" not in note
    result = CliRunner().invoke(main, ["spectrum", str(path), "--base", str(dirs[name]), "--json", "-", "-q"])
    assert result.exit_code == 0, result.output
    layer = json.loads(result.output)["layers"][0]
    assert layer["base"]["relative_update"] == pytest.approx(
        float(deltas[layer["name"]].norm() / _library_weight(loaded[name], layer["name"]).double().norm()), rel=1e-10
    )


def test_full_delta_against_a_quantised_base_is_the_quantisation_error(models):
    dirs, loaded = models
    checkpoint = rankscope.load(dirs["float"], base=dirs["nf4"])
    assert any("the base is quantised (bitsandbytes 4-bit nf4" in w for w in checkpoint.warnings)
    analysis = rankscope.analyze(checkpoint, layers=r"layers\.0\.self_attn\.q_proj$")
    # W₀ is not what a full fine-tune trained from: the note says the quantisation error is in ΔW, as the warning
    (note,) = [n for n in analysis.notes if n.startswith("the base is quantised")]
    assert "include the quantisation error" in note and "trained against" not in note
    (record,) = list(analysis)
    weight = load_file(str(dirs["float"] / "model.safetensors"))[f"{record.name}.weight"].double()
    expected = torch.linalg.svdvals(weight - _library_weight(loaded["nf4"], record.name).double())
    assert torch.allclose(
        torch.tensor(record.singular_values, dtype=torch.float64), expected, rtol=1e-10, atol=1e-12 * float(expected[0])
    )


def _hand_laid(directory: Path, method: str, with_g_idx: bool) -> Path:
    """A GPTQ/AWQ-shaped base: the real tensor names (qweight int32 packing 8 4-bit values, qzeros, scales fp16,
    GPTQ's g_idx) beside plain norms and embeddings, and the quantization_config transformers writes."""
    hidden, groups = 64, 2
    tensors = {"model.embed_tokens.weight": torch.randn(64, hidden)}
    for i in range(2):
        for module in MODULES:
            p = f"model.layers.{i}.{module}."
            out = 128 if module == "mlp.up_proj" else 32 if module.endswith(("k_proj", "v_proj")) else hidden
            inp = 128 if module == "mlp.down_proj" else hidden
            tensors[p + "qweight"] = torch.zeros(inp // 8, out, dtype=torch.int32)
            tensors[p + "qzeros"] = torch.zeros(groups, out // 8, dtype=torch.int32)
            tensors[p + "scales"] = torch.ones(groups, out, dtype=torch.float16)
            if with_g_idx:
                tensors[p + "g_idx"] = torch.arange(inp, dtype=torch.int32) // (inp // groups)
    directory.mkdir(parents=True)
    save_file(tensors, str(directory / "model.safetensors"))
    config = {"model_type": "llama", "quantization_config": {"quant_method": method, "bits": 4, "group_size": 32}}
    (directory / "config.json").write_text(json.dumps(config))
    return directory


@pytest.mark.parametrize(
    ("method", "g_idx", "named"),
    [
        ("gptq", True, "GPTQ (qweight, qzeros, scales, g_idx)"),
        ("gptq", False, "GPTQ (qweight, qzeros, scales)"),  # names the tensors the file holds, no absent g_idx
        ("awq", False, "AWQ (qweight, qzeros, scales)"),
    ],
)
def test_gptq_and_awq_bases_are_refused_naming_the_format(adapter, tmp_path, method, g_idx, named):
    path, _ = adapter
    base = _hand_laid(tmp_path / method, method, g_idx)
    with pytest.raises(CheckpointError, match=re.escape(f"quantised ({named})")):
        rankscope.analyze(rankscope.load(path, base=base))
    result = CliRunner().invoke(main, ["spectrum", str(path), "--base", str(base), "-q"])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and named in lines[0] and "qweight" in lines[0], result.output


# -- broken or unsupported bitsandbytes bases: the specific one-line error, never "missing" or an internal error --

Q = "model.layers.0.self_attn.q_proj"  # a layer the adapter fixture trains
QW = f"{Q}.weight"


def _edit_state(change):
    """An edit of ``QW``'s quant_state JSON (the UTF-8 bytes bitsandbytes packs into a uint8 tensor)."""

    def edit(tensors: dict) -> None:
        (key,) = [k for k in tensors if k.startswith(f"{QW}.quant_state.")]
        state = json.loads(bytes(tensors[key].numpy()).decode("utf-8"))
        change(state)
        tensors[key] = torch.tensor(list(json.dumps(state).encode("utf-8")), dtype=torch.uint8)

    return edit


def _set(key, value):
    return lambda tensors: tensors.__setitem__(key, value(tensors[key]) if callable(value) else value)


BROKEN = {  # name → (real save it is edited from, the edit, the tensor the error names, words of the error)
    "int8-tiled": ("int8", _set(f"{Q}.weight_format", torch.tensor([1], dtype=torch.uint8)), QW, "tiled GPU layout"),
    "int8-empty-format": ("int8", _set(f"{Q}.weight_format", torch.zeros(0, dtype=torch.uint8)), f"{Q}.weight_format",
                          "weight_format with 0 values"),
    "int8-short-scb": ("int8", _set(f"{Q}.SCB", lambda t: t[:3].clone()), QW, "and 3 torch.float32 scales"),
    "nf4-short-absmax": ("nf4", _set(f"{QW}.absmax", lambda t: t[:3].clone()), QW, "3 absmax values do not fit"),
    "nf4-short-packed": ("nf4", _set(QW, lambda t: t[:10].clone()), QW, "bytes and"),
    "nf4-no-dtype": ("nf4", _edit_state(lambda s: s.pop("dtype")), f"{QW}.quant_state.bitsandbytes__nf4", "no dtype"),
    "nf4-bad-dtype": ("nf4", _edit_state(lambda s: s.update(dtype="nonsense")), f"{QW}.quant_state.bitsandbytes__nf4",
                      "dtype 'nonsense'"),
    "nf4-blocksize-0": ("nf4", _edit_state(lambda s: s.update(blocksize=0)), f"{QW}.quant_state.bitsandbytes__nf4",
                        "blocksize 0"),
    "double-no-nested-absmax": ("nf4-double", lambda t: t.pop(f"{QW}.nested_absmax"), QW, "but no nested_absmax"),
    "double-no-nested-blocksize": ("nf4-double", _edit_state(lambda s: s.pop("nested_blocksize")),
                                   f"{QW}.quant_state.bitsandbytes__nf4", "no nested_blocksize"),
    "double-short-nested-absmax": ("nf4-double", _set(f"{QW}.nested_absmax", lambda t: t[:0].clone()),
                                   f"{QW}.nested_absmax", "0 torch.float32 nested_absmax values"),
}  # fmt: skip


def _broken_copy(source: Path, target: Path, edit) -> Path:
    """``source`` (a real save_pretrained directory) with its model.safetensors edited."""
    tensors = load_file(str(source / "model.safetensors"))
    edit(tensors)
    target.mkdir(parents=True)
    (target / "config.json").write_text((source / "config.json").read_text())
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(target / "model.safetensors"))
    return target


@pytest.mark.parametrize("case", list(BROKEN))
def test_a_broken_bitsandbytes_base_is_one_line_naming_file_and_tensor(models, adapter, tmp_path, monkeypatch, case):
    monkeypatch.setenv("RANKSCOPE_CACHE", str(tmp_path / "cache"))
    dirs, _ = models
    source, edit, key, words = BROKEN[case]
    if case.startswith("int8"):
        assert f"{Q}.weight_format" in load_file(str(dirs["int8"] / "model.safetensors")), "no weight_format saved"
    base = _broken_copy(dirs[source], tmp_path / case, edit)
    path, _ = adapter
    with pytest.raises(CheckpointError, match=re.escape(words)):
        rankscope.analyze(rankscope.load(path, base=base))
    result = CliRunner().invoke(main, ["spectrum", str(path), "--base", str(base), "-q"])
    # before: "--base has no weight of the update's shape" and exit 0, or "internal error: KeyError…"
    assert result.exit_code == 1, result.output
    (line,) = result.output.strip().splitlines()
    assert f"{base / 'model.safetensors'}: tensor '{key}':" in line and words in line, line
    assert "internal error" not in line and "no weight of the update's shape" not in line


def test_a_base_without_the_layer_still_only_warns(models, adapter, tmp_path, monkeypatch):
    """An absent weight (not a broken one) is a warning naming the layer, no base object for it, exit 0."""
    monkeypatch.setenv("RANKSCOPE_CACHE", str(tmp_path / "cache"))
    dirs, _ = models
    base = _broken_copy(
        dirs["nf4-double"], tmp_path / "without_q", lambda t: [t.pop(k) for k in list(t) if k.startswith(QW)]
    )
    path, _ = adapter
    result = CliRunner().invoke(main, ["spectrum", str(path), "--base", str(base), "--json", "-"])
    assert result.exit_code == 0, result.output
    assert f"--base holds no weight of the name of 1 layer(s): {Q} (is --base the model" in result.stderr
    layers = {layer["name"]: layer for layer in json.loads(result.stdout)["layers"]}
    assert layers[Q].get("base") is None
    assert all(layer["base"] is not None for name, layer in layers.items() if name != Q)
