"""``convert``: every written adapter loaded by PEFT (``PeftModel.from_pretrained`` + ``merge_and_unload``) and its
merged ΔW compared with a float64 dense truncated SVD of the source's ΔW, computed here.

The source ΔW comes from the library that wrote the source (PEFT's own float64 merge) for LoRA, rsLoRA, LoHa,
LoKr, VeRA, AdaLoRA, DoRA and IA3; for the families no library writes (BoRA, MELoRA, BoostLoRA, HydraLoRA, the bundled
trained adapters) from rankscope's reader, whose ΔW is checked against the papers' formulas in their format tests.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from click.testing import CliRunner
from peft import AdaLoraConfig, IA3Config, LoHaConfig, LoKrConfig, LoraConfig, PeftModel, VeraConfig, get_peft_model
from safetensors.torch import save_file
from torch import nn

import rankscope
from rankscope.cli import main
from rankscope.resize.convert import convert
from tests.factories import quiet_library_warnings  # noqa: F401

BUNDLED = "examples/checkpoints/adapters"
TARGETS = ["q_proj", "v_proj"]


class Attn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(16, 16)
        self.v_proj = nn.Linear(16, 24)


class Layer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.self_attn = Attn()


class Net(nn.Module):
    """Llama-style module paths (``model.layers.0.self_attn.q_proj``) and a conv."""

    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList([Layer(), Layer()])
        self.model.conv = nn.Conv2d(4, 6, 3)


def base_model(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net().double()


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().double() for k, v in model.state_dict().items()}


def merged_deltas(peft_model, base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """PEFT's merge in float64, minus the base: ΔW per adapted module (as an (out, in·∏k) matrix)."""
    merged = copy.deepcopy(peft_model).double().merge_and_unload().state_dict()
    return {
        key.removesuffix(".weight"): (merged[key] - base[key]).reshape(base[key].shape[0], -1)
        for key in base
        if key.endswith(".weight") and not torch.equal(merged[key], base[key])
    }


def source(tmp_path, config, seed: int = 1, *, scale: float = 0.3):
    """A PEFT adapter of ``config`` on Net with its weights moved off their init: (directory, ΔW by layer)."""
    model = base_model()
    base = weights(model)
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if param.requires_grad and "ranknum" not in name:  # AdaLoRA's rank count, trainable in name only
                noise = torch.randn(param.shape, generator=generator, dtype=param.dtype)
                param.copy_(1.0 + scale * noise if ("ia3_" in name or "magnitude" in name) else scale * noise)
    directory = tmp_path / "source"
    peft_model.save_pretrained(directory)
    return directory, merged_deltas(peft_model, base), base


def loaded_deltas(directory, make_base=base_model) -> dict[str, torch.Tensor]:
    """ΔW of the written adapter as PEFT applies it: from_pretrained on a fresh base, merge_and_unload, minus W₀."""
    model = make_base()
    base = weights(model)
    peft_model = PeftModel.from_pretrained(model, str(directory))
    return merged_deltas(peft_model, base)


def truncated(delta: torch.Tensor, k: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    return u[:, :k] @ torch.diag(s[:k]) @ vh[:k]


def energy_rank(delta: torch.Tensor, p: float) -> int:
    """Smallest k with Σ_{i≤k}σ²/Σσ² ≥ p, written out."""
    s2 = torch.linalg.svdvals(delta.double()) ** 2
    total, running = float(s2.sum()), 0.0
    for k, value in enumerate(s2.tolist(), 1):
        running += value
        if running >= p * total * (1 - 1e-12):
            return k
    return len(s2)


def assert_close(got: torch.Tensor, want: torch.Tensor, tol: float = 2e-6) -> None:
    error = float(torch.linalg.norm(got - want) / torch.linalg.norm(want))
    assert error <= tol, f"relative error {error:.2e}"


def written_ranks(directory) -> dict[str, int]:
    from safetensors.torch import load_file

    tensors = load_file(str(directory / "adapter_model.safetensors"))
    return {
        key.removeprefix("base_model.model.").removesuffix(".lora_A.weight"): value.shape[0]
        for key, value in tensors.items()
        if key.endswith("lora_A.weight")
    }


FAMILIES = {
    "lora": lambda: LoraConfig(r=6, lora_alpha=12, target_modules=[*TARGETS, "conv"]),
    "rslora": lambda: LoraConfig(
        r=8,
        lora_alpha=16,
        use_rslora=True,
        target_modules=TARGETS,
        rank_pattern={"layers.1.self_attn.q_proj": 4},
        alpha_pattern={"layers.0.self_attn.v_proj": 40},
    ),
    "loha": lambda: LoHaConfig(r=3, alpha=6, target_modules=TARGETS),
    "lokr": lambda: LoKrConfig(r=2, alpha=4, target_modules=TARGETS, decompose_factor=4),
    "vera": lambda: VeraConfig(r=6, target_modules=TARGETS),
    "adalora": lambda: AdaLoraConfig(init_r=6, target_r=4, total_step=10, target_modules=TARGETS),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_lossless_and_energy_rule_through_peft(tmp_path, family):
    directory, deltas, _ = source(tmp_path, FAMILIES[family]())
    checkpoint = rankscope.load(directory)
    out = convert(checkpoint).save(tmp_path / "lossless")
    got = loaded_deltas(out)
    assert set(got) == set(deltas)
    for name, delta in deltas.items():
        assert_close(got[name], delta)
    out = convert(checkpoint, "energy:0.9").save(tmp_path / "e90")
    got, ranks = loaded_deltas(out), written_ranks(out)
    for name, delta in deltas.items():
        k = energy_rank(delta, 0.9)
        assert ranks[name] == k, name
        assert_close(got[name], truncated(delta, k))
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["use_rslora"] is (family == "rslora")
    assert not any(key.startswith("base_model.model.") for key in config["rank_pattern"])


def test_rslora_alpha_pattern_keeps_each_layers_scale(tmp_path):
    """gradience's bug: truncating rsLoRA while keeping α shrinks the update by √(k/r). Here α_k = s·√k."""
    directory, deltas, _ = source(tmp_path, FAMILIES["rslora"]())
    out = convert(rankscope.load(directory), "fixed:2").save(tmp_path / "out")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["use_rslora"] is True and config["r"] == 2
    peft_model = PeftModel.from_pretrained(base_model(), str(out))
    scaling = {
        name.removeprefix("base_model.model."): module.scaling["default"]
        for name, module in peft_model.named_modules()
        if hasattr(module, "scaling") and "default" in getattr(module, "scaling", {})
    }
    assert set(scaling) == set(deltas)
    for name, delta in deltas.items():
        assert_close(loaded_deltas(out)[name], truncated(delta, 2))
    # the source's v_proj in layer 0 had α = 40 at r = 8: s = 40/√8, so α_2 = s·√2 = 20
    assert config["alpha_pattern"].get("model.layers.0.self_attn.v_proj", config["lora_alpha"]) == pytest.approx(20)


@pytest.mark.parametrize("family", ["dora", "ia3"])
def test_dense_families_need_a_rule_and_convert_with_base(tmp_path, family):
    config = (
        LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=TARGETS)
        if family == "dora"
        else IA3Config(target_modules=TARGETS, feedforward_modules=["v_proj"])
    )
    directory, deltas, base = source(tmp_path, config)
    base_file = tmp_path / "base.safetensors"
    save_file({k: v.float().contiguous() for k, v in base.items()}, str(base_file))
    result = CliRunner().invoke(main, ["convert", str(directory), "-o", str(tmp_path / "x"), "--base", str(base_file)])
    assert result.exit_code == 2 and "give a --rule" in result.output
    assert not (tmp_path / "x").exists()
    checkpoint = rankscope.load(directory, base=str(base_file))
    out = convert(checkpoint, "energy:0.95").save(tmp_path / "out")
    got, ranks = loaded_deltas(out), written_ranks(out)
    for name, delta in deltas.items():
        k = energy_rank(delta, 0.95)
        assert ranks[name] == k
        # the base was stored in float32 for rankscope: ΔW read from it carries float32 rounding of W₀
        assert_close(got[name], truncated(delta, k), tol=2e-5)


def test_weighted_merge_of_two_adapters(tmp_path):
    first, deltas_a, _ = source(tmp_path / "a", LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS), seed=1)
    second, deltas_b, _ = source(tmp_path / "b", LoraConfig(r=3, lora_alpha=3, target_modules=TARGETS), seed=2)
    out = tmp_path / "ab"
    args = ["convert", str(first), str(second), "--weights", "0.7,-0.3", "-o", str(out), "--rule", "energy:0.97"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    got, ranks = loaded_deltas(out), written_ranks(out)
    for name in deltas_a:
        want = 0.7 * deltas_a[name] - 0.3 * deltas_b[name]
        k = energy_rank(want, 0.97)
        assert ranks[name] == k
        assert_close(got[name], truncated(want, k))


def _tiny_lm():
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_lora", "examples/train_lora.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def make():
        torch.manual_seed(0)
        return module.TinyLM(module.CONFIG).double()

    return make


@pytest.mark.parametrize("name", ["bora-r8-b4", "melora-8x1", "boostlora-sum-k2", "hydralora-r8-h3"])
def test_bundled_families_lossless_and_truncated(tmp_path, name):
    checkpoint = rankscope.load(f"{BUNDLED}/{name}")
    deltas = {layer.name: layer.update.materialize() for layer in checkpoint.layers}
    make = _tiny_lm()
    got = loaded_deltas(convert(checkpoint).save(tmp_path / "lossless"), make)
    for layer, delta in deltas.items():
        assert_close(got[layer], delta)
    out = convert(checkpoint, "energy:0.9", max_rank=6).save(tmp_path / "e90")
    got, ranks = loaded_deltas(out, make), written_ranks(out)
    for layer, delta in deltas.items():
        k = min(energy_rank(delta, 0.9), 6)
        assert ranks[layer] == k
        assert_close(got[layer], truncated(delta, k))


def test_outputs_never_over_or_into_an_input(tmp_path):
    directory, _, _ = source(tmp_path, FAMILIES["lora"]())
    runner = CliRunner()
    for target in (directory, directory / "small", tmp_path):
        result = runner.invoke(main, ["convert", str(directory), "-o", str(target)])
        assert result.exit_code == 2, result.output
        assert "input" in result.output
    assert sorted(p.name for p in directory.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]


def test_readme_and_config_say_how_it_was_made(tmp_path):
    directory, _, _ = source(tmp_path, LoraConfig(r=6, lora_alpha=12, target_modules=TARGETS, task_type=None))
    config = json.loads((directory / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "org/tiny-base"
    (directory / "adapter_config.json").write_text(json.dumps(config))
    out = convert(rankscope.load(directory), "energy:0.8").save(tmp_path / "out")
    written = json.loads((out / "adapter_config.json").read_text())
    assert written["base_model_name_or_path"] == "org/tiny-base"
    assert sorted(written["target_modules"]) == sorted(TARGETS)
    text = (out / "README.md").read_text()
    assert "energy:0.8" in text and "energy kept" in text and str(directory) in text
    # the façade: a path is loaded, and the result is the same adapter
    adapter = rankscope.convert(str(directory), "fixed:2")
    assert isinstance(adapter, rankscope.ConvertedAdapter) and {layer.rank for layer in adapter.layers} == {2}


# -- kohya and diffusers outputs, loaded by diffusers (load_lora_weights + fuse_lora) ------------------------------


@pytest.fixture(scope="module")
def sd_lora(tmp_path_factory):
    """A tiny SD-1.5 pipeline and a diffusers LoRA file for it (rank and alpha patterns in the UNet, rsLoRA in the
    text encoder), with diffusers' own fused ΔW of it."""
    from diffusers import StableDiffusionPipeline

    from tests.test_diffusers_reference import Models, fused_deltas, te_config, unet_config, with_lora

    root = tmp_path_factory.mktemp("sd")
    models = Models(root)
    _, unet_sd, unet_meta = with_lora(models.unet, unet_config(), seed=1)
    _, te_sd, te_meta = with_lora(models.te, te_config(), seed=2)
    StableDiffusionPipeline.save_lora_weights(
        root / "source",
        unet_lora_layers=unet_sd,
        text_encoder_lora_layers=te_sd,
        unet_lora_adapter_metadata=unet_meta,
        text_encoder_lora_adapter_metadata=te_meta,
    )
    file = root / "source" / "pytorch_lora_weights.safetensors"
    return models, file, fused_deltas(models, file), fused_deltas


@pytest.mark.parametrize("target", ["kohya", "diffusers"])
def test_kohya_and_diffusers_outputs_load_in_diffusers(sd_lora, tmp_path, target):
    from safetensors import safe_open

    models, file, deltas, fused_deltas = sd_lora
    checkpoint = rankscope.load(file)
    out = tmp_path / ("lora.safetensors" if target == "kohya" else "lora")
    convert(checkpoint).save(out, to=target)
    written = out if target == "kohya" else out / "pytorch_lora_weights.safetensors"
    with safe_open(str(written), "pt") as handle:
        keys, metadata = list(handle.keys()), handle.metadata()
    if target == "kohya":
        assert all(k.startswith(("lora_unet_", "lora_te_")) for k in keys)
        parts = {k.rsplit(".", 2)[-2] if k.endswith(".weight") else "alpha" for k in keys}
        assert parts == {"lora_down", "lora_up", "alpha"}
    else:
        assert json.loads(metadata["lora_adapter_metadata"])["unet.r"] == 4
    got = fused_deltas(models, written)
    assert set(got) == set(deltas)
    for name, delta in deltas.items():
        assert_close(got[name], delta)
    # truncated: diffusers applies exactly the rank-k SVD of ΔW, for every layer's k
    truncated_out = tmp_path / ("small.safetensors" if target == "kohya" else "small")
    converted = convert(checkpoint, "energy:0.8")
    converted.save(truncated_out, to=target)
    ranks = {layer.name: layer.rank for layer in converted.suggestion.layers}
    got = fused_deltas(
        models, truncated_out if target == "kohya" else truncated_out / "pytorch_lora_weights.safetensors"
    )
    for name, delta in deltas.items():
        k = energy_rank(delta, 0.8)
        assert ranks[name] == k
        assert_close(got[name], truncated(delta, k))


def test_zero_layer_goes_to_exclude_modules_and_peft_skips_it(tmp_path):
    from tests.factories import lora_config, random_factors, write_lora

    names = [f"model.layers.{i}.self_attn.{m}" for i in range(2) for m in TARGETS]
    factors = {name: random_factors(24 if "v_proj" in name else 16, 16, 4, seed) for seed, name in enumerate(names)}
    zero = "model.layers.1.self_attn.q_proj"
    factors[zero] = (factors[zero][0], torch.zeros_like(factors[zero][1]))
    source_dir = write_lora(tmp_path / "src", factors, lora_config(r=4, lora_alpha=8, target_modules=TARGETS))
    result = CliRunner().invoke(main, ["convert", str(source_dir), "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "zero update, so rank 0" in result.stderr
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["exclude_modules"] == [zero]
    peft_model = PeftModel.from_pretrained(base_model(), str(tmp_path / "out"))
    adapted = {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    assert zero not in adapted and set(names) - {zero} <= adapted
    got = loaded_deltas(tmp_path / "out")
    for name in set(names) - {zero}:
        a, b = factors[name]
        assert_close(got[name], 2.0 * b.double() @ a.double())


def test_modules_to_save_are_warned_and_written_down_as_not_converted(tmp_path):
    from tests.factories import lora_config, random_factors, write_lora

    extra = {"base_model.model.lm_head.modules_to_save.default.weight": torch.randn(8, 16)}
    name = "model.layers.0.self_attn.q_proj"
    source_dir = write_lora(tmp_path / "src", {name: random_factors(16, 16, 4, 0)}, lora_config(r=4), extra=extra)
    result = CliRunner().invoke(main, ["convert", str(source_dir), "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "NOT analysed" in result.stderr and "lm_head" in result.stderr
    assert "not converted" in (tmp_path / "out" / "README.md").read_text()


def _factor(rows: int, cols: int, condition: float, seed: int) -> torch.Tensor:
    """A rows×cols float32 factor with singular values spread geometrically over ``condition``."""
    g = torch.Generator().manual_seed(seed)
    q1 = torch.linalg.qr(torch.randn(rows, cols, generator=g, dtype=torch.float64)).Q
    q2 = torch.linalg.qr(torch.randn(cols, cols, generator=g, dtype=torch.float64)).Q
    values = torch.logspace(0, -math.log10(condition), cols, dtype=torch.float64)
    return (q1 * values @ q2.mT).float()


@pytest.mark.parametrize(
    ("condition", "zero_column", "core", "vector_scale", "fast"),
    [(1.0, False, False, False, True), (1e3, False, True, True, True), (1e9, False, False, False, False),
     (1.0, True, False, False, False)],
)  # fmt: skip
def test_vectors_from_r_factors_match_a_dense_float64_svd(
    monkeypatch, condition, zero_column, core, vector_scale, fast
):
    """convert's U_k = L·R_L⁻¹·U_c,k (from the spectrum's R factors) against the truncated float64 dense SVD of ΔW;
    ill-conditioned or rank-deficient factors must take the QR path instead."""
    from rankscope.core.update import FactoredUpdate
    from rankscope.resize import convert as module

    calls, real = [], module.singular_vectors
    monkeypatch.setattr(module, "singular_vectors", lambda u: calls.append(u) or real(u))
    left = _factor(300, 12, condition, 3)
    if zero_column:
        left[:, 5] = 0
    right = _factor(200, 12, 10.0, 4).mT.contiguous()
    update = FactoredUpdate(
        left,
        right,
        core=_factor(12, 12, 5.0, 5) if core else None,
        scale=torch.linspace(0.5, 2.0, 12) if vector_scale else 0.7,
    )
    ((sigma, form),) = module._spectra([update])
    assert calls == ([] if fast else [update])
    dense = update.materialize()
    u, s, vh = torch.linalg.svd(dense, full_matrices=False)
    want_sigma = s[: sigma.numel()]
    assert torch.allclose(sigma, want_sigma, rtol=1e-9, atol=1e-12 * float(s[0]))
    for k in (3, 7):
        got_u, got_v = form(k)
        got = got_u * sigma[:k] @ got_v.mT
        want = u[:, :k] * s[:k] @ vh[:k]
        assert float((got - want).norm() / want.norm()) < 1e-9


@pytest.mark.parametrize("names", ["llama", "gpt2"])
def test_kohya_output_of_a_language_model_is_refused_and_nothing_written(tmp_path, names):
    """kohya files name diffusion models' modules (lora_unet_…, lora_te_…): a language model's layers (Llama's
    model.layers.N…, GPT-2's transformer.h.N…, which is not a diffusers transformer) have no kohya name, so
    to='kohya' is a usage error naming the layer, and nothing is written; to='peft' converts it."""
    from tests.factories import llama_like, lora_config, random_factors, write_lora

    if names == "llama":
        adapter = llama_like(tmp_path / "adapter", layers=1, hidden=16, rank=2)
        first = "model.layers.0.self_attn.q_proj"
    else:
        first = "transformer.h.0.attn.c_attn"
        adapter = write_lora(tmp_path / "adapter", {first: random_factors(48, 16, 2, 1)}, lora_config(r=2))
    result = CliRunner().invoke(main, ["convert", str(adapter), "--to", "kohya", "-o", str(tmp_path / "k.safetensors")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    (line,) = result.output.strip().splitlines()
    assert f"layer {first} is no diffusion model's module" in line and "use --to peft" in line
    assert not (tmp_path / "k.safetensors").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    peft = CliRunner().invoke(main, ["convert", str(adapter), "-o", str(tmp_path / "p")])
    assert peft.exit_code == 0, peft.output
