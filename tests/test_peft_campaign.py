"""A new user's campaign on PEFT 0.21 adapters of real transformers models (tiny configs, built offline).

Each adapter is written by PEFT's ``save_pretrained`` (or transformers' ``Trainer``); the ground truth of a layer
is PEFT's ``merge_and_unload()`` in float64 minus the base weight (or the layer's forward on the identity where
PEFT cannot merge), and rankscope's σ are compared with ``torch.linalg.svdvals`` of it, taken here. Where PEFT
itself works in float32 (PiSSA/OLoRA rewrite the base in float32) that reference is met at MERGE_TOL, and the
float64 s·(B′A′ − B₀A₀) from PEFT's own init factors at EXACT_TOL. Also checked: nothing is dropped silently
(``checkpoint.not_analysed``), and a plain LoRA has no warning at all.
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

pytest.importorskip("peft")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from peft import IA3Config, LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    CLIPConfig,
    CLIPModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    T5Config,
    T5ForConditionalGeneration,
)
from transformers.pytorch_utils import Conv1D

import rankscope
from rankscope.cli import main

EXACT_TOL = 1e-10  # float64 references (measured ≤ 3e-15; DoRA's dense path ≤ 7e-14)
MERGE_TOL = 1e-6  # PEFT's PiSSA/OLoRA reload keeps W₀ − s·B₀A₀ in float32 (measured ≤ 2e-8)


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT and transformers warn about fan_in_fan_out, PiSSA saves, …
        yield


# -- tiny models -------------------------------------------------------------------------------------------


def llama(seed: int = 0, **extra) -> nn.Module:
    torch.manual_seed(seed)
    config = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4)
    config.update(num_key_value_heads=2, max_position_embeddings=32, **extra)
    return LlamaForCausalLM(LlamaConfig(**config))


def llama_classifier(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4)
    return LlamaForSequenceClassification(LlamaConfig(**config, num_labels=3, pad_token_id=0))


def gpt2(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=24, n_layer=2, n_head=4, n_positions=32))


def bert(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=64, hidden_size=24, num_hidden_layers=2, num_attention_heads=4)
    config.update(dict(intermediate_size=40, max_position_embeddings=32, num_labels=3))
    return BertForSequenceClassification(config)


def t5(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = T5Config(vocab_size=64, d_model=24, d_kv=6, d_ff=40, num_layers=2, num_decoder_layers=2, num_heads=4)
    return T5ForConditionalGeneration(config)


def clip(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    text = dict(vocab_size=64, hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4)
    vision = dict(hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4, image_size=16)
    text["max_position_embeddings"], vision["patch_size"] = 16, 8
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))


class Encoder(nn.Module):
    """torch's own TransformerEncoderLayer: an nn.MultiheadAttention inside."""

    def __init__(self) -> None:
        super().__init__()
        layer = dict(dim_feedforward=24, batch_first=True, dropout=0.0)
        self.layers = nn.ModuleList([nn.TransformerEncoderLayer(16, 2, **layer) for _ in range(2)])


def encoder(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return Encoder()


# -- building, and PEFT's ground truth ------------------------------------------------------------------------


def perturb(model: nn.Module, seed: int = 1) -> None:
    """Move every LoRA factor off its init (a "trained" adapter: B ≠ 0, ΔW of full rank r)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.add_(0.3 * torch.randn(param.shape, generator=generator))


def float64_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone().double() for key, value in model.state_dict().items()}


def save_base(model: nn.Module, path: Path) -> Path:
    """The base model as one safetensors file (tied weights cloned: safetensors refuses shared storage)."""
    save_file({key: value.detach().clone().contiguous() for key, value in model.state_dict().items()}, str(path))
    return path


def analysed(delta: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """A weight-shaped ΔW as the (out, in) matrix rankscope analyses."""
    return delta.T if isinstance(module, (Conv1D, nn.Embedding)) else delta.reshape(delta.shape[0], -1)


def merged_deltas(peft_model, base: dict[str, torch.Tensor], factory, adapter: str = "default") -> dict:
    """PEFT's float64 merge of ``adapter`` minus the base, per adapted layer, as analysed matrices."""
    twin = copy.deepcopy(peft_model).double()
    twin.set_adapter(adapter)
    names = [
        name.removeprefix("base_model.model.")
        for name, module in twin.named_modules()
        if isinstance(module, LoraLayer) and adapter in module.r
    ]
    merged = twin.merge_and_unload().state_dict()
    plain = factory()
    return {n: analysed(merged[f"{n}.weight"] - base[f"{n}.weight"], plain.get_submodule(n)) for n in names}


def build(directory: Path, factory, config: LoraConfig, **save):
    """(peft model, float64 base state) of ``factory()`` under ``config``, factors perturbed, saved to ``directory``."""
    model = factory()
    base = float64_state(model)
    peft_model = get_peft_model(model, config)
    perturb(peft_model)
    peft_model.save_pretrained(directory, **save)
    return peft_model, base


def assert_sigma(record, reference: torch.Tensor, tol: float = EXACT_TOL) -> float:
    """rankscope's σ of one layer against svdvals of ``reference``; returns the max relative error."""
    assert record.valid, record.error
    expected = torch.linalg.svdvals(reference)
    k = record.rank_bound
    got = torch.tensor(record.singular_values, dtype=torch.float64)
    assert got.shape == (k,) and list(reference.shape) == record.matrix_shape
    assert expected[k - 1] > 1e-3 * expected[0], "test setup: the reference must reach rank_bound"
    rel = ((got - expected[:k]).abs() / expected[:k]).max().item()
    assert rel <= tol, f"{record.name}: relative error {rel:.2e}\n got {got}\n ref {expected[:k]}"
    tail = expected[k:]
    assert tail.numel() == 0 or tail.max().item() <= 10 * tol * expected[0].item(), f"{record.name}: rank > bound"
    return rel


def by_name(checkpoint) -> dict:
    return {record.name: record for record in rankscope.analyze(checkpoint)}


def assert_matches(checkpoint, deltas: dict[str, torch.Tensor], tol: float = EXACT_TOL) -> None:
    records = by_name(checkpoint)
    assert set(records) == set(deltas)
    for name, delta in deltas.items():
        assert_sigma(records[name], delta, tol)


def spectrum_json(*args) -> dict:
    result = CliRunner().invoke(main, ["spectrum", *map(str, args), "--json", "-", "-q"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


# -- the common configurations, on real models ------------------------------------------------------------------

CASES = {
    "llama_all_linear": (llama, dict(target_modules="all-linear")),
    # regex keys and full-path keys; PEFT's first-match rule (re.match(rf"(.*\.)?({k})$", name))
    "llama_patterns": (
        llama,
        dict(
            target_modules="all-linear",
            rank_pattern={"model.layers.0.self_attn.q_proj": 2, r"layers\.1\.mlp\..*_proj": 3, "v_proj": 5},
            alpha_pattern={"model.layers.1.self_attn.o_proj": 20, r".*\.k_proj": 3},
        ),
    ),
    "llama_rslora_patterns": (
        llama,
        dict(
            use_rslora=True,
            target_modules=["q_proj", "v_proj", "down_proj"],
            rank_pattern={"model.layers.0.self_attn.q_proj": 2, "down_proj": 6},
            alpha_pattern={r"layers\.1\.self_attn\.v_proj": 3},
        ),
    ),
    "llama_embeddings": (llama, dict(target_modules=["embed_tokens", "lm_head", "q_proj"])),
    "gpt2_all_linear": (gpt2, dict(target_modules="all-linear")),  # Conv1D, fan_in_fan_out set by PEFT
    "t5_all_linear": (t5, dict(target_modules="all-linear")),
    "clip_all_linear": (clip, dict(target_modules="all-linear")),
}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict:
    out = {}
    for name, (factory, config) in CASES.items():
        directory = tmp_path_factory.mktemp(name) / "adapter"
        peft_model, base = build(directory, factory, LoraConfig(r=4, lora_alpha=8, **config))
        out[name] = (directory, merged_deltas(peft_model, base, factory))
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_common_configurations_match_peft_merge(built, name):
    directory, deltas = built[name]
    checkpoint = rankscope.load(directory)
    assert_matches(checkpoint, deltas)
    # a plain LoRA: nothing to warn about, nothing not analysed (save_embedding_layers' base copies are not)
    assert checkpoint.warnings == [] and checkpoint.not_analysed == []
    if name == "llama_embeddings":
        assert {s.key for s in checkpoint.skipped} == {
            "base_model.model.model.embed_tokens.base_layer.weight",
            "base_model.model.lm_head.base_layer.weight",
        }
    else:
        assert checkpoint.skipped == []


def test_patterns_through_the_cli(built):
    directory, deltas = built["llama_patterns"]
    document = spectrum_json(directory)
    assert document["warnings"] == [] and document["summary"]["not_analysed_modules"] == 0
    ranks = {layer["name"]: layer["rank_bound"] for layer in document["layers"]}
    assert ranks["model.layers.0.self_attn.q_proj"] == 2 and ranks["model.layers.1.self_attn.q_proj"] == 4
    assert ranks["model.layers.1.mlp.up_proj"] == 3 and ranks["model.layers.0.self_attn.v_proj"] == 5
    scales = {layer["name"]: layer["scale"] for layer in document["layers"]}
    assert scales["model.layers.1.self_attn.o_proj"] == 5.0 and scales["model.layers.0.self_attn.k_proj"] == 0.75
    for layer in document["layers"]:
        expected = torch.linalg.svdvals(deltas[layer["name"]])[: layer["rank_bound"]]
        got = torch.tensor(layer["singular_values"], dtype=torch.float64)
        assert ((got - expected).abs() / expected).max() <= EXACT_TOL


def test_multi_adapter_bin_folder(tmp_path):
    """Three adapters in one folder, saved as adapter_model.bin; --adapter picks each."""
    model = llama()
    base = float64_state(model)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    peft_model.add_adapter("other", LoraConfig(r=2, lora_alpha=6, use_rslora=True, target_modules=["o_proj"]))
    peft_model.add_adapter("third", LoraConfig(r=3, lora_alpha=3, target_modules="all-linear"))
    perturb(peft_model)
    peft_model.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "other" / "adapter_model.bin").is_file()
    for adapter in ("default", "other", "third"):
        checkpoint = rankscope.load(tmp_path, adapter=adapter)
        assert sorted(checkpoint.other_adapters) == sorted({"default", "other", "third"} - {adapter})
        assert_matches(checkpoint, merged_deltas(peft_model, base, llama, adapter))
        assert checkpoint.warnings == [] and checkpoint.not_analysed == []
    document = spectrum_json(tmp_path, "--adapter", "other")
    assert document["checkpoint"]["adapter_type"] == "RSLORA" and len(document["layers"]) == 2


def test_trainer_checkpoint_folder(tmp_path):
    """transformers' Trainer writes checkpoint-N/ with optimizer.pt, scheduler.pt, rng_state.pth beside the adapter."""
    from transformers import Trainer, TrainingArguments

    model = llama()
    base = float64_state(model)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(0)
    data = [{"input_ids": torch.randint(0, 64, (8,)), "labels": torch.randint(0, 64, (8,))} for _ in range(4)]
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, save_steps=2, per_device_train_batch_size=2, report_to=[],
        use_cpu=True, learning_rate=0.05, disable_tqdm=True,
    )  # fmt: skip
    Trainer(model=peft_model, args=args, train_dataset=data).train()
    folder = tmp_path / "checkpoint-2"
    assert (folder / "optimizer.pt").is_file() and (folder / "adapter_model.safetensors").is_file()
    checkpoint = rankscope.load(folder)
    assert_matches(checkpoint, merged_deltas(peft_model, base, llama))
    assert checkpoint.warnings == [] and checkpoint.skipped == []


def test_multihead_attention_in_a_torch_encoder_layer(tmp_path):
    """nn.TransformerEncoderLayer's self_attn: in_proj exact; out_proj s·B·A (PEFT 0.21 merges it twice, warned)."""
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["self_attn", "linear1", "linear2"])
    peft_model, base = build(tmp_path, encoder, config)
    merged = copy.deepcopy(peft_model).double().merge_and_unload().state_dict()
    checkpoint = rankscope.load(tmp_path)
    assert any("2·s·B·A at 2 layer(s)" in warning for warning in checkpoint.warnings)
    records = by_name(checkpoint)
    assert len(records) == 8 and checkpoint.not_analysed == []
    for i in range(2):
        attn = f"layers.{i}.self_attn"
        assert_sigma(records[attn], merged[f"{attn}.in_proj_weight"] - base[f"{attn}.in_proj_weight"])
        out = f"{attn}.out_proj"
        assert_sigma(records[out], (merged[f"{out}.weight"] - base[f"{out}.weight"]) / 2)
        for linear in ("linear1", "linear2"):
            key = f"layers.{i}.{linear}.weight"
            assert_sigma(records[f"layers.{i}.{linear}"], merged[key] - base[key])


# -- PiSSA / OLoRA on Llama, saved unconverted and converted ----------------------------------------------------


@pytest.fixture(scope="module", params=["pissa", "olora", "pissa_niter_4"])
def base_rewriting(request, tmp_path_factory):
    init = request.param
    root = tmp_path_factory.mktemp(init)
    model = llama()
    state = copy.deepcopy(model.state_dict())
    base_file = save_base(model, root / "base.safetensors")
    peft_model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=init)
    )
    layers = {n.removeprefix("base_model.model."): m for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)}

    def factors() -> dict:
        return {n: (m.lora_B["default"].weight.double().clone(), m.lora_A["default"].weight.double().clone())
                for n, m in layers.items()}  # fmt: skip

    with torch.no_grad():
        initial = factors()
        peft_model.save_pretrained(root / "initial")
        perturb(peft_model)
        trained = factors()
    peft_model.save_pretrained(root / "raw")
    peft_model.save_pretrained(root / "converted", path_initial_model_for_weight_conversion=str(root / "initial"))
    own = {n: 2.0 * (b @ a - initial[n][0] @ initial[n][1]) for n, (b, a) in trained.items()}

    def reload(folder: str) -> dict:
        original = llama()
        original.load_state_dict(state)
        merged = copy.deepcopy(PeftModel.from_pretrained(original, root / folder)).double().merge_and_unload()
        merged = merged.state_dict()
        return {n: merged[f"{n}.weight"] - state[f"{n}.weight"].double() for n in layers}

    return init, root, base_file, own, reload("raw"), reload("converted")


def test_base_rewriting_inits_on_llama(base_rewriting):
    init, root, base_file, own, reloaded, converted = base_rewriting
    raw = rankscope.load(root / "raw", base=base_file)
    assert raw.not_analysed == []
    (warning,) = [w for w in raw.warnings if "init_lora_weights" in w]
    records = by_name(raw)
    assert set(records) == set(own) and {r.rank_bound for r in records.values()} == {8}
    if init == "pissa_niter_4":  # randomised: PEFT redraws it on every load; warned and not exact
        assert "randomised" in warning and {r.exact for r in records.values()} == {False}
    else:
        assert "recomputed from --base" in warning and {r.exact for r in records.values()} == {True}
        for name, record in records.items():
            assert_sigma(record, own[name], EXACT_TOL)
            assert_sigma(record, reloaded[name], MERGE_TOL)
    # without --base: says so, and every layer is marked not exact
    bare = rankscope.load(root / "raw")
    assert any("pass --base BASE" in w for w in bare.warnings)
    assert {layer.exact for layer in bare.layers} == {False}
    # saved with path_initial_model_for_weight_conversion: a plain rank-2r LoRA, exact, no warning
    checkpoint = rankscope.load(root / "converted")
    assert checkpoint.warnings == [] and {layer.exact for layer in checkpoint.layers} == {True}
    assert_matches(checkpoint, converted)
    assert_matches(checkpoint, own)


# -- regression tests for what the campaign found ----------------------------------------------------------------


def test_lora_bias_norm_is_float64(tmp_path):
    """lora_bias on Llama (its q/v have no bias, so PEFT cannot merge): the forward on the identity is the truth;
    the bias update's norm was taken in float32 (2.5e-8 relative off)."""
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_bias=True)
    peft_model, _ = build(tmp_path, llama, config)
    records = by_name(rankscope.load(tmp_path))
    layers = {n.removeprefix("base_model.model."): m for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)}
    assert set(records) == set(layers)
    for name, layer in layers.items():
        layer = copy.deepcopy(layer).double()
        eye, zero = torch.eye(layer.in_features, dtype=torch.float64), torch.zeros(1, layer.in_features).double()
        with torch.no_grad():
            base_layer = layer.get_base_layer()
            delta = (layer(eye) - layer(zero)) - (base_layer(eye) - base_layer(zero))
            bias = (layer(zero) - base_layer(zero)).reshape(-1)
        assert_sigma(records[name], delta.T)
        assert records[name].bias_update["size"] == bias.numel()
        assert records[name].bias_update["norm"] == pytest.approx(bias.norm().item(), rel=1e-12)


def test_modules_to_save_beside_a_targeted_embedding_is_warned(tmp_path):
    """LoRA on embed_tokens makes PEFT save the embedding's base weight (save_embedding_layers): the file was then
    read as a training checkpoint, and the classifier head (modules_to_save) dropped as a 'base model weight'."""
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"], task_type="SEQ_CLS")
    peft_model, base = build(tmp_path, llama_classifier, config)
    checkpoint = rankscope.load(tmp_path)
    assert [(item.module, item.keys) for item in checkpoint.not_analysed] == [
        ("score", ("base_model.model.score.weight",))
    ]
    assert any("NOT analysed: score (a full copy of a module in modules_to_save" in w for w in checkpoint.warnings)
    assert_matches(checkpoint, merged_deltas(peft_model, base, llama_classifier))
    strict = CliRunner().invoke(main, ["spectrum", str(tmp_path), "-q", "--strict"], catch_exceptions=False)
    assert strict.exit_code == 1 and "not analysed (--strict)" in strict.stderr


def test_saved_embedding_tables_are_warned(tmp_path):
    """A resized vocabulary: PEFT saves the whole embedding tables, which replace the base model's on load."""

    def resized() -> nn.Module:
        model = llama()
        model.resize_token_embeddings(72)
        return model

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"])
    peft_model, base = build(tmp_path, resized, config, save_embedding_layers=True)
    checkpoint = rankscope.load(tmp_path)
    assert {item.module for item in checkpoint.not_analysed} == {"model.embed_tokens", "lm_head"}
    assert all("save_embedding_layers" in item.reason for item in checkpoint.not_analysed)
    assert_matches(checkpoint, merged_deltas(peft_model, base, resized))
    document = spectrum_json(tmp_path)
    assert document["summary"]["not_analysed_modules"] == 2


def test_ia3_modules_to_save_is_warned(tmp_path):
    """(IA)³ on BERT for sequence classification: the classifier copy was listed as 'not an (IA)³ vector' only."""
    model = bert()
    base_file = save_base(model, tmp_path / "base.safetensors")
    targets = ["query", "value", "output.dense"]
    config = IA3Config(target_modules=targets, feedforward_modules=["output.dense"], task_type="SEQ_CLS")
    get_peft_model(model, config).save_pretrained(tmp_path / "ia3")
    checkpoint = rankscope.load(tmp_path / "ia3", base=base_file)
    assert [item.module for item in checkpoint.not_analysed] == ["classifier"]
    assert "modules_to_save" in checkpoint.not_analysed[0].reason


def _amplification(delta: torch.Tensor, w0: torch.Tensor, k: int) -> float:
    """The LoRA paper's ‖ΔW‖_F / ‖U_kᵀ W₀ V_k‖_F, from a float64 SVD of the (out, in) ΔW and W₀."""
    u, _, vh = torch.linalg.svd(delta)
    return float(delta.norm() / (u[:, :k].T @ w0 @ vh[:k].T).norm())


@pytest.mark.parametrize("base_form", ["directory", "file"])
def test_square_gpt2_conv1d_layers_take_their_layout_with_base(tmp_path, base_form):
    """c_attn, the square attn.c_proj and lm_head: PEFT records fan_in_fan_out=false, --base flips the non-square
    Conv1D by shape; the square c_proj follows the base model's own classes where the base is a transformers
    directory (its amplification then the reference's: W₀ transposed as a Conv1D stores it), and is warned about
    where the base is a bare file (no classes to ask)."""
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "attn.c_proj", "lm_head"])
    peft_model, base = build(tmp_path / "adapter", gpt2, config)
    if base_form == "directory":  # lm_head's (tied) weight stored too, so that --base can tell it is a Linear
        gpt2().save_pretrained(tmp_path / "base", safe_serialization=True)
        base_path = tmp_path / "base"
        weights = load_file(base_path / "model.safetensors")
        save_file(
            {**weights, "lm_head.weight": weights["transformer.wte.weight"].clone()},
            str(base_path / "model.safetensors"),
        )
    else:
        base_path = save_base(gpt2(), tmp_path / "base.safetensors")
    checkpoint = rankscope.load(tmp_path / "adapter", base=base_path)
    (warning,) = [w for w in checkpoint.warnings if "fan_in_fan_out" in w]
    records = by_name(checkpoint)
    name = "transformer.h.0.attn.c_proj"
    delta = merged_deltas(peft_model, base, gpt2)[name]
    w0 = base[f"{name}.weight"].T  # Conv1D stores (in, out)
    expected = _amplification(delta, w0, records[name].base["amplification_k"])
    if base_form == "directory":
        assert records[name].kind == "conv1d_gpt2" and "from the base model's classes" in warning
        assert records[name].base["amplification"] == pytest.approx(expected, rel=1e-9)
    else:
        assert records[name].kind == "linear" and "amplification, intruders" in warning
        assert records[name].base["amplification"] != pytest.approx(expected, rel=1e-3)  # W₀ the other way round
    assert_matches(checkpoint, merged_deltas(peft_model, base, gpt2))


def test_square_gpt2_conv1d_layers_follow_when_every_other_layer_is_flipped(tmp_path):
    """Every GPT-2 Conv1D target, recorded as Linear (a flag edited to false, as a training checkpoint with no
    config reads): --base flips the non-square ones by shape, and the square attn.c_proj with them."""
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"],
                        fan_in_fan_out=True)  # fmt: skip
    peft_model, base = build(tmp_path / "adapter", gpt2, config)
    config_file = tmp_path / "adapter" / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "fan_in_fan_out": False}))
    checkpoint = rankscope.load(tmp_path / "adapter", base=save_base(gpt2(), tmp_path / "base.safetensors"))
    (warning,) = [w for w in checkpoint.warnings if "fan_in_fan_out" in w]
    assert "and the square ones' (2 layer(s)" in warning
    records = by_name(checkpoint)
    assert {record.kind for record in records.values()} == {"conv1d_gpt2"}
    name = "transformer.h.1.attn.c_proj"
    delta = merged_deltas(peft_model, base, gpt2)[name]
    expected = _amplification(delta, base[f"{name}.weight"].T, records[name].base["amplification_k"])
    assert records[name].base["amplification"] == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_gpt2_conv1d_beside_a_linear_head_with_base(tmp_path, dora):
    """PEFT saves fan_in_fan_out=false for c_attn + lm_head (the last target built wins): with --base the layout
    comes from the base weight's shape. DoRA (which needs it for its norm axis) was refused as a shape mismatch."""
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc", "lm_head"], use_dora=dora)
    peft_model, base = build(tmp_path / "adapter", gpt2, config)
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["fan_in_fan_out"] is False
    base_file = save_base(gpt2(), tmp_path / "base.safetensors")
    checkpoint = rankscope.load(tmp_path / "adapter", base=base_file)
    (warning,) = [w for w in checkpoint.warnings if "fan_in_fan_out" in w]
    assert "4 layer(s)" in warning and "square" not in warning
    records = by_name(checkpoint)
    assert records["transformer.h.0.attn.c_attn"].shape == [24, 72]  # Conv1D's stored (in, out)
    assert records["transformer.h.0.attn.c_attn"].kind == "conv1d_gpt2" and records["lm_head"].shape == [64, 24]
    assert_matches(checkpoint, merged_deltas(peft_model, base, gpt2))
