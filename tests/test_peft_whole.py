"""TinyLoRA, UniLoRA and FRoD (layers sharing state across the whole model), read by building the whole base model.

Reference: PEFT 0.21.2's own ``merge_and_unload()`` on a float64 Llama built here from its config (the base
safetensors loaded with ``load_state_dict``, not transformers' ``from_pretrained``): ΔW = W_merged − W0 and its
float64 dense SVD per layer; and, to float32 precision, the float32 training model's own merge before saving."""

from __future__ import annotations

import contextlib
import json
import shutil
import warnings

import pytest

peft = pytest.importorskip("peft", reason="the peft extra (rankscope[peft]) is not installed")
transformers = pytest.importorskip("transformers", reason="transformers is not installed")

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import rankscope  # noqa: E402
from rankscope.formats.common import peft_model  # noqa: E402
from tests.factories import quiet_library_warnings  # noqa: E402, F401  (autouse: the tests' own chatter)

from .factories import one_line_error, perturb_trainable  # noqa: E402
from .factories import run_spectrum as spectrum  # noqa: E402

TARGETS = ["q_proj", "v_proj", "down_proj"]
CONFIGS = {
    "TINYLORA": lambda: peft.TinyLoraConfig(target_modules=TARGETS, r=2, u=8),
    "UNILORA": lambda: peft.UniLoraConfig(target_modules=TARGETS, r=4, theta_d_length=96),
    "FROD": lambda: peft.FrodConfig(target_modules=TARGETS, progressbar=False),
}
# FRoD's U is recomputed from the base at load, in float32 (PEFT's cast): its ΔW is not exact in float64
EXACT = {"TINYLORA": True, "UNILORA": True, "FROD": False}


@contextlib.contextmanager
def quiet():
    """PEFT's and transformers' chatter while the module fixtures build (the autouse fixture is per test)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def llama_config():
    return transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        max_position_embeddings=32,
    )


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("llama") / "base"
    with quiet():
        transformers.LlamaForCausalLM(llama_config()).save_pretrained(directory, safe_serialization=True)
    return directory


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def adapter(request, base_dir, tmp_path_factory):
    """(peft_type, adapter directory): the tuner on the float32 base, its trained parameters perturbed."""
    peft_type = request.param
    with quiet():
        model = transformers.LlamaForCausalLM.from_pretrained(base_dir)
        peft_model = peft.get_peft_model(model, CONFIGS[peft_type]())
        perturb_trainable(peft_model, seed=1)
        directory = tmp_path_factory.mktemp(peft_type.lower()) / "adapter"
        peft_model.save_pretrained(directory)
        w0 = {
            name: p.detach().clone()
            for name, p in transformers.LlamaForCausalLM.from_pretrained(base_dir).named_parameters()
        }
        trained = deltas(peft_model.merge_and_unload(), w0)  # the training model itself, merged in float32
    return peft_type, directory, trained


def deltas(merged, w0) -> dict[str, torch.Tensor]:
    """W_merged − W0 (float64) of every targeted module of a merged model."""
    found = {}
    for name, parameter in merged.named_parameters():
        module = name.removesuffix(".weight")
        if module.rsplit(".", 1)[-1] in TARGETS and name.endswith(".weight"):
            found[module] = parameter.detach().double() - w0[name].double()
    return found


def reference_deltas(base_dir, adapter_dir) -> dict[str, torch.Tensor]:
    """ΔW = W_merged − W0 per targeted module from PEFT's merge_and_unload() on a float64 model built here."""
    with quiet():
        model = transformers.LlamaForCausalLM(llama_config()).to(torch.float64)
        state = {k: v.to(torch.float64) for k, v in load_file(base_dir / "model.safetensors").items()}
        model.load_state_dict(state, strict=False)
        w0 = {name: p.detach().clone() for name, p in model.named_parameters()}
        return deltas(peft.PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload(), w0)


def test_sigma_per_layer_matches_peft_merge_in_float64(adapter, base_dir):
    peft_type, directory, trained = adapter
    checkpoint = rankscope.load(directory, base=base_dir)
    assert checkpoint.adapter_type == peft_type
    assert checkpoint.config["reader"] == {"format": "peft-merge", "peft": peft.__version__, "route": "whole-model"}
    got = {record.name: record for record in rankscope.analyze(checkpoint)}
    expected = reference_deltas(base_dir, directory)
    assert set(got) == set(expected) and len(expected) == 2 * len(TARGETS)
    for name, delta in expected.items():
        record = got[name]
        assert record.valid, f"{name}: {record.error}"
        assert record.exact is EXACT[peft_type], name
        reference = torch.linalg.svdvals(delta)
        assert reference[0] > 1e-3, f"{name}: the perturbation left ΔW ≈ 0"
        sigma = torch.tensor(record.singular_values, dtype=torch.float64)
        k = min(sigma.numel(), reference.numel())
        error = ((sigma[:k] - reference[:k]).abs() / reference[0]).max().item()
        assert error <= 1e-10, f"{peft_type} {name}: relative error {error:.2e}"
        assert reference[k:].sum() <= 1e-10 * reference[0]
        # and the saved adapter is the trained one: the float32 training model's own merge, to float32 precision
        in_training = torch.linalg.svdvals(trained[name])
        assert ((sigma[:k] - in_training[:k]).abs() / in_training[0]).max() <= 1e-4, name
    warned = any("float32" in w and "frod_U" in w for w in checkpoint.warnings)
    assert warned is (peft_type == "FROD"), checkpoint.warnings


def test_cli_spectrum_reads_it(adapter, base_dir):
    peft_type, directory, _ = adapter
    result = spectrum(directory, "--base", base_dir, "--json", "-", "-q")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["checkpoint"]["family"] == peft_type.lower()
    assert document["checkpoint"]["config"]["reader"]["peft"] == peft.__version__
    assert len(document["layers"]) == 2 * len(TARGETS)
    chatter = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("rankscope:")]
    assert not chatter, chatter  # no progress bar or log line of transformers or PEFT


@pytest.fixture(scope="module")
def tinylora(base_dir, tmp_path_factory):
    with quiet():
        model = transformers.LlamaForCausalLM.from_pretrained(base_dir)
        directory = tmp_path_factory.mktemp("tiny") / "adapter"
        peft.get_peft_model(model, CONFIGS["TINYLORA"]()).save_pretrained(directory)
    return directory


def test_a_one_file_base_is_refused_in_one_line(tinylora, base_dir, tmp_path):
    line = one_line_error(spectrum(tinylora, "--base", base_dir / "model.safetensors"))
    assert "TINYLORA" in line and "model directory with config.json" in line
    bare = tmp_path / "weights"
    bare.mkdir()
    shutil.copy(base_dir / "model.safetensors", bare / "model.safetensors")  # a directory without config.json
    assert "model directory with config.json" in one_line_error(spectrum(tinylora, "--base", bare))
    assert "--base" in one_line_error(spectrum(tinylora))


def test_a_base_above_the_memory_limit_is_refused_naming_its_size(tinylora, base_dir, monkeypatch):
    monkeypatch.setattr(peft_model, "memory_limit", lambda: 1024)
    line = one_line_error(spectrum(tinylora, "--base", base_dir))
    parameters = sum(p.numel() for p in transformers.LlamaForCausalLM(llama_config()).parameters())
    assert f"needs {8 * parameters / 2**20:.1f} MiB" in line and "float64" in line


def test_a_trained_tensor_missing_from_the_file_is_refused(tinylora, base_dir, tmp_path):
    """PEFT itself only warns (and not at all for the shared ``tinylora_v``, which it filters out of its warning)."""
    from safetensors.torch import save_file

    dropped = "base_model.tinylora_v.1"
    tensors = load_file(tinylora / "adapter_model.safetensors")
    assert dropped in tensors
    del tensors[dropped]
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    shutil.copy(tinylora / "adapter_config.json", tmp_path / "adapter_config.json")
    line = one_line_error(spectrum(tmp_path, "--base", base_dir))
    assert "TINYLORA adapter file has no tensor for PEFT's" in line and "tinylora_v.1" in line
