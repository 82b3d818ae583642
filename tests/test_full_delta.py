"""Full fine-tunes read as ΔW = W − W₀ (``full-delta``) and ``--top-k`` truncated spectra, against dense float64 SVDs
of W − W₀ computed here, and a merged PEFT LoRA against the LoRA's own ΔW."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import rankscope
from rankscope.cli import main
from rankscope.core import dense
from rankscope.core.errors import CheckpointError
from tests.factories import quiet_library_warnings  # noqa: F401  (autouse)

HIDDEN = 24


def _base_tensors(seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    tensors = {"model.embed_tokens.weight": rand(40, HIDDEN), "model.norm.weight": torch.ones(HIDDEN, dtype=dtype)}
    for i in range(2):
        p = f"model.layers.{i}."
        tensors |= {
            p + "self_attn.q_proj.weight": rand(HIDDEN, HIDDEN),
            p + "self_attn.q_proj.bias": rand(HIDDEN),
            p + "self_attn.v_proj.weight": rand(HIDDEN, HIDDEN),
            p + "mlp.down_proj.weight": rand(HIDDEN, 2 * HIDDEN),
            p + "input_layernorm.weight": torch.ones(HIDDEN, dtype=dtype),
        }
    tensors["model.conv.weight"] = rand(6, 4, 3, 3)
    return tensors


def _finetune(base: dict[str, torch.Tensor], seed: int = 1) -> dict[str, torch.Tensor]:
    """Every matrix but layer 1's v_proj moved by a dense perturbation; layer 0's norm changed; biases moved."""
    g = torch.Generator().manual_seed(seed)
    tuned = {k: v.clone() for k, v in base.items()}
    for key, value in base.items():
        if value.ndim >= 2 and "layers.1.self_attn.v_proj" not in key:
            tuned[key] = value + 0.05 * torch.randn(value.shape, generator=g)
    tuned["model.layers.0.input_layernorm.weight"] = base["model.layers.0.input_layernorm.weight"] + 0.1
    tuned["model.layers.0.self_attn.q_proj.bias"] = base["model.layers.0.self_attn.q_proj.bias"] + 0.5
    return tuned


def _write_model(directory: Path, tensors: dict[str, torch.Tensor], shards: int = 1) -> Path:
    """A Hugging Face-style model directory: config.json and model.safetensors, or ``shards`` shards and an index."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps({"model_type": "llama"}))
    keys = list(tensors)
    if shards == 1:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / "model.safetensors"))
        return directory
    weight_map = {}
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = keys[s::shards]
        save_file({k: tensors[k].contiguous() for k in part}, str(directory / name))
        weight_map |= dict.fromkeys(part, name)
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return directory


def _reference(base: dict, tuned: dict) -> dict[str, torch.Tensor]:
    """ΔW per layer name as the analysed matrix, in float64, written out here (embedding transposed)."""
    out = {}
    for key, w in tuned.items():
        w0 = base[key]
        if w.ndim >= 2 and not torch.equal(w, w0):
            delta = w.double() - w0.double()
            name = key.removesuffix(".weight")
            out[name] = delta.T if "embed" in name else delta.reshape(delta.shape[0], -1)
    return out


@pytest.fixture
def pair(tmp_path):
    base = _base_tensors()
    tuned = _finetune(base)
    return (
        _write_model(tmp_path / "base", base),
        _write_model(tmp_path / "tuned", tuned, shards=2),
        base,
        tuned,
    )


def test_sharded_delta_matches_a_dense_float64_svd(pair):
    base_dir, tuned_dir, base, tuned = pair
    checkpoint = rankscope.load(tuned_dir, base=base_dir)
    assert checkpoint.family == "full-delta"
    analysis = rankscope.analyze(checkpoint, device="cpu")
    expected = _reference(base, tuned)
    assert {r.name for r in analysis} == set(expected)
    for name, delta in expected.items():
        record = analysis[name]
        assert record.valid and record.exact and record.matrix_shape == list(delta.shape)
        reference = torch.linalg.svdvals(delta)
        got = torch.tensor(record.singular_values, dtype=torch.float64)
        assert torch.allclose(got, reference, rtol=0, atol=1e-12 * float(reference[0]))
    assert analysis["model.embed_tokens"].kind == "embedding"
    assert analysis["model.conv"].kind == "conv2d"
    # the bias of an analysed layer is its bias update (Δb = 0.5 in each of 24 entries)
    assert analysis["model.layers.0.self_attn.q_proj"].bias_update["norm"] == pytest.approx(0.5 * HIDDEN**0.5)
    skipped = {s.key: s.reason for s in checkpoint.skipped}
    assert "identical" in skipped["model.layers.1.self_attn.v_proj.weight"]
    assert "1-D" in skipped["model.layers.0.input_layernorm.weight"]
    assert any("identical to the base" in n and n.startswith("4 ") for n in checkpoint.notes)  # v_proj, 3 norms
    assert any("1 changed 1-D" in n for n in checkpoint.notes)


def test_merged_peft_lora_shows_its_rank(tmp_path):
    """A PEFT LoRA merged into a tiny Llama with merge_and_unload() and saved in full: σ are the LoRA's own."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=64, max_position_embeddings=32, tie_word_embeddings=False,
    )  # fmt: skip
    model = LlamaForCausalLM(config).double()
    model.save_pretrained(tmp_path / "base", safe_serialization=True)
    rank = 3
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=6, target_modules=["q_proj", "v_proj"]))
    expected = {}
    for name, module in peft_model.named_modules():
        if hasattr(module, "lora_B") and "default" in module.lora_B:
            torch.nn.init.normal_(module.lora_B["default"].weight, std=0.2)
            expected[name.removeprefix("base_model.model.")] = module.get_delta_weight("default").double()
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged", safe_serialization=True)
    analysis = rankscope.analyze(rankscope.load(tmp_path / "merged", base=tmp_path / "base"), device="cpu")
    assert {r.name for r in analysis} == set(expected)
    for name, delta in expected.items():
        record = analysis[name]
        reference = torch.linalg.svdvals(delta)
        got = torch.tensor(record.singular_values, dtype=torch.float64)
        assert torch.allclose(got, reference, atol=1e-10 * float(reference[0]))
        assert record.metrics["numerical_rank"] == rank


def test_top_k_within_its_bound_and_certified(tmp_path):
    g = torch.Generator().manual_seed(3)
    w0 = torch.randn(160, 120, generator=g)
    low = torch.randn(160, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 120, generator=g, dtype=torch.float64)
    spread = torch.randn(160, 120, generator=g, dtype=torch.float64) * torch.logspace(0, -3, 120, dtype=torch.float64)
    tuned = {"a.weight": (w0.double() + low).float(), "b.weight": (w0.double() + spread).float()}
    base_dir = _write_model(tmp_path / "base", {"a.weight": w0, "b.weight": w0.clone()})
    tuned_dir = _write_model(tmp_path / "tuned", tuned)
    analysis = rankscope.analyze(rankscope.load(tuned_dir, base=base_dir), device="cpu", top_k=8)
    for name in ("a", "b"):
        record = analysis[name]
        delta = tuned[f"{name}.weight"].double() - w0.double()
        sigma = torch.linalg.svdvals(delta)
        got = torch.tensor(record.singular_values, dtype=torch.float64)
        truncated = record.truncated
        assert record.exact is False and got.numel() == 8 and truncated["k"] == 8
        residual = truncated["residual_energy"]
        # the stated bound: σ̃_i ≤ σ_i ≤ √(σ̃_i² + residual), residual ≥ Σ_{i>K} σ_i²
        assert bool((got <= sigma[:8] * (1 + 1e-9)).all())
        assert bool((sigma[:8] ** 2 <= got**2 + residual + 1e-9 * float(sigma[0]) ** 2).all())
        assert residual >= float((sigma[8:] ** 2).sum()) * (1 - 1e-9)
        metrics = record.metrics
        assert metrics["frobenius"] == pytest.approx(float(delta.norm()), rel=1e-12)
        assert metrics["sigma_max"] == pytest.approx(float(sigma[0]), rel=1e-10)
        assert metrics["stable_rank"] == pytest.approx(float((sigma**2).sum() / sigma[0] ** 2), rel=1e-9)
        pr = float((sigma**2).sum() ** 2 / (sigma**4).sum())
        assert metrics["participation_ratio"] == pytest.approx(pr, rel=1e-9)
        assert metrics["erank"] is None and metrics["energy_rank"]["0.9"] is None
    # rank 6 < K: everything found, certified; the spread spectrum leaves energy above σ̃_8²: no certificate
    assert analysis["a"].truncated["certified"] is True
    assert torch.allclose(
        torch.tensor(analysis["a"].singular_values[:6], dtype=torch.float64), torch.linalg.svdvals(low)[:6]
    )
    assert analysis["b"].truncated["certified"] is False
    assert any("no certificate for 1 layer" in w for w in analysis.warnings)


def test_bf16_finetune_of_an_fp32_base_warns_of_rounding_noise(tmp_path):
    base = {"x.weight": torch.randn(32, 32), "y.weight": torch.randn(32, 32)}
    tuned = {"x.weight": base["x.weight"].bfloat16(), "y.weight": (base["y.weight"] + 1e-3).bfloat16()}
    checkpoint = rankscope.load(_write_model(tmp_path / "t", tuned), base=_write_model(tmp_path / "b", base))
    (warning,) = [w for w in checkpoint.warnings if "rounding" in w]
    assert "bfloat16" in warning and "float32" in warning and "2 layer(s)" in warning
    assert "1 of them are nothing but the base rounded (x)" in warning
    # no warning for a fine-tune in the base's own precision
    same = {"x.weight": base["x.weight"] + 1e-3, "y.weight": base["y.weight"]}
    quiet = rankscope.load(_write_model(tmp_path / "s", same), base=tmp_path / "b")
    assert not [w for w in quiet.warnings if "rounding" in w]


def test_shape_mismatch_is_skipped_with_a_warning(tmp_path):
    ids = torch.arange(16).reshape(1, 16)  # an integer buffer, as older BERT checkpoints store: skipped, not refused
    base = {"embed_tokens.weight": torch.randn(40, 8), "lin.weight": torch.randn(8, 8), "emb.position_ids": ids}
    tuned = {
        "embed_tokens.weight": torch.randn(44, 8),
        "lin.weight": base["lin.weight"] + 1,
        "new.weight": base["lin.weight"],
        "emb.position_ids": ids,
    }
    checkpoint = rankscope.load(_write_model(tmp_path / "t", tuned), base=_write_model(tmp_path / "b", base))
    assert [layer.name for layer in checkpoint.layers] == ["lin"]
    skipped = {s.key: s.reason for s in checkpoint.skipped}
    assert "[44, 8] here but [40, 8]" in skipped["embed_tokens.weight"]
    assert "buffer" in skipped["emb.position_ids"]
    assert any("differ in shape" in w and "embed_tokens.weight" in w for w in checkpoint.warnings)
    assert any("no counterpart in the base" in w and "new.weight" in w for w in checkpoint.warnings)


def test_memory_budget_bounds_the_batches_and_refuses_a_layer_above_it(pair, monkeypatch):
    base_dir, tuned_dir, _, _ = pair
    seen = []
    original = dense.svdvals_or_nan

    def watched(batch):
        seen.append(tuple(batch.shape))
        return original(batch)

    monkeypatch.setattr(dense, "svdvals_or_nan", watched)
    budget = 3 * 8 * HIDDEN * 2 * HIDDEN * 2  # two of the largest (24×48) matrices
    analysis = rankscope.analyze(rankscope.load(tuned_dir, base=base_dir), device="cpu", max_memory=budget)
    assert all(r.valid for r in analysis)
    assert seen and all(3 * 8 * b * m * n <= budget for b, m, n in seen)
    assert sum(b for b, _, _ in seen) == len(analysis)
    # a budget below the largest layer: that layer is refused with the size it needs, the others analysed
    small = rankscope.analyze(rankscope.load(tuned_dir, base=base_dir), device="cpu", max_memory=3 * 8 * 24 * 40)
    refused = [r for r in small if not r.valid]
    assert {r.name for r in refused} == {"model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"}
    assert "above --max-memory" in refused[0].error


def test_cli_exit_codes_and_json(pair, tmp_path):
    base_dir, tuned_dir, _, _ = pair
    runner = CliRunner()
    out = tmp_path / "s.json"
    arguments = ["spectrum", str(tuned_dir), "--base", str(base_dir), "--json", str(out), "--top-k", "4"]
    result = runner.invoke(main, [*arguments, "--device", "cpu"])
    assert result.exit_code == 0, result.output
    document = json.loads(out.read_text())
    assert document["checkpoint"]["family"] == "full-delta"
    layers = {layer["name"]: layer for layer in document["layers"]}
    assert layers["model.layers.0.mlp.down_proj"]["truncated"]["k"] == 4  # 24×48 > K + 10: truncated
    assert layers["model.layers.0.mlp.down_proj"]["exact"] is False
    assert layers["model.conv"]["exact"] is True and "truncated" not in layers["model.conv"]  # 6×36: exact
    # the terminal summary says what it is (no α/r, no adapter) and over how many layers its means are taken
    summary = runner.invoke(main, [*arguments[:4], "--top-k", "4", "--device", "cpu"])
    assert summary.exit_code == 0, summary.output
    assert "singular values of ΔW = W − W₀ (a full fine-tune: no scale)" in summary.stdout
    assert "α/r" not in summary.stdout and "adapter parameters" not in summary.stdout
    whole = sum(1 for layer in layers.values() if layer["valid"] and "truncated" not in layer)
    assert 0 < whole < len(layers)
    assert f"#σ>, erank and util: over the {whole} of {len(layers)} layers with a whole spectrum" in summary.stdout
    # no --base: one line naming the flag, exit 1
    result = runner.invoke(main, ["spectrum", str(tuned_dir)])
    assert result.exit_code == 1 and "--base" in result.output and "Traceback" not in result.output
    # every layer above --max-memory: one line, exit 1
    result = runner.invoke(main, ["spectrum", str(tuned_dir), "--base", str(base_dir), "--max-memory", "1K"])
    assert result.exit_code == 1 and "no layer can be analysed" in result.output
    assert len(result.output.strip().splitlines()) == 1
    result = runner.invoke(main, ["spectrum", str(tuned_dir), "--base", str(base_dir), "--top-k", "0"])
    assert result.exit_code == 2


def test_quantised_base_is_refused_in_one_line(pair, tmp_path):
    _, tuned_dir, base, _ = pair
    quantised = {k: v for k, v in base.items() if "q_proj.weight" not in k}
    for i in range(2):
        p = f"model.layers.{i}.self_attn.q_proj."
        quantised |= {p + "qweight": torch.zeros(3, HIDDEN, dtype=torch.int32), p + "scales": torch.ones(1, HIDDEN)}
    base_dir = _write_model(tmp_path / "gptq", quantised)
    with pytest.raises(CheckpointError, match=r"quantised \(GPTQ/AWQ"):
        rankscope.load(tuned_dir, base=base_dir)


def test_adapter_directories_are_not_full_models(tmp_path):
    from tests.factories import llama_like

    adapter = llama_like(tmp_path / "lora")
    (adapter / "config.json").write_text("{}")  # a model config beside adapter files: still an adapter
    assert rankscope.load(adapter).family == "lora"


def test_one_file_and_a_diffusers_component(tmp_path):
    """A bare safetensors file of model weights, and a diffusers component folder, against a one-file base."""
    g = torch.Generator().manual_seed(5)
    base = {"conv_in.weight": torch.randn(8, 4, 3, 3, generator=g), "proj.weight": torch.randn(12, 8, generator=g)}
    tuned = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(tuned, str(tmp_path / "tuned.safetensors"))
    component = tmp_path / "unet"
    component.mkdir()
    save_file(tuned, str(component / "diffusion_pytorch_model.safetensors"))
    (component / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    expected = _reference(base, tuned)
    for path in (tmp_path / "tuned.safetensors", component):
        analysis = rankscope.analyze(rankscope.load(path, base=tmp_path / "base.safetensors"), device="cpu")
        assert analysis.checkpoint.family == "full-delta"
        for name, delta in expected.items():
            reference = torch.linalg.svdvals(delta)
            got = torch.tensor(analysis[name].singular_values, dtype=torch.float64)
            assert torch.allclose(got, reference, rtol=0, atol=1e-12 * float(reference[0])), (path, name)


def test_a_base_of_another_architecture_is_warned_about(pair):
    """Matching names and shapes, another model_type in config.json (a qwen2 against a llama base): analysed, and
    a warning says the two are different architectures; the same model_type says nothing of it."""
    base_dir, tuned_dir, _, _ = pair
    same = rankscope.load(tuned_dir, base=base_dir)
    assert not any("model_type" in w for w in same.warnings)
    (tuned_dir / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    other = rankscope.load(tuned_dir, base=base_dir)
    (warning,) = [w for w in other.warnings if "model_type" in w]
    assert "is a 'qwen2' and --base a 'llama'" in warning and "fine-tuned from?" in warning


def test_forming_the_delta_leaves_float64_weights_untouched(tmp_path):
    """ΔW is formed in place in a buffer of its own: with float64 files (no upcast copy) W must stay W."""
    g = torch.Generator().manual_seed(11)
    w0 = torch.randn(48, 40, generator=g, dtype=torch.float64)
    w = w0 + 1e-2 * torch.randn(48, 40, generator=g, dtype=torch.float64)
    checkpoint = rankscope.load(
        _write_model(tmp_path / "t", {"a.weight": w}), base=_write_model(tmp_path / "b", {"a.weight": w0})
    )
    (layer,) = checkpoint.layers
    first, second = layer.update.materialize(torch.float64), layer.update.materialize(torch.float64)
    assert torch.equal(first, w - w0) and torch.equal(second, w - w0)
    sigma = torch.tensor(rankscope.analyze(checkpoint)["a"].singular_values, dtype=torch.float64)
    assert torch.allclose(sigma, torch.linalg.svdvals(w - w0), rtol=1e-12, atol=0)


def test_a_change_too_small_to_square_in_float32_is_still_a_change(tmp_path):
    """|W − W₀| = 1e-25 squares to 0 in float32 (the read's ‖W − W₀‖ takes float32 squares): the layer is still
    analysed, not called identical to the base."""
    w0 = torch.zeros(6, 5)
    w = w0.clone()
    w[2, 3] = 1e-25
    checkpoint = rankscope.load(
        _write_model(tmp_path / "t", {"a.weight": w}), base=_write_model(tmp_path / "b", {"a.weight": w0})
    )
    assert [layer.name for layer in checkpoint.layers] == ["a"]
    sigma = rankscope.analyze(checkpoint)["a"].singular_values
    assert sigma[0] == pytest.approx(float(torch.tensor(1e-25, dtype=torch.float32)), rel=1e-6)
