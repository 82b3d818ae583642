"""PEFT adapters across transformers architectures with their own projection layouts — fused qkv (Phi-3's
``qkv_proj``, Falcon's and BLOOM's and GPT-NeoX's ``query_key_value``), DeBERTa-v2's ``query_proj``, OPT's
``fc1``/``fc2``, mT5's ``wi_0``/``wo`` and shared embedding, Qwen3-MoE's experts (``target_modules="all-linear"``
reaches the fused expert parameters), Mamba's ``in_proj``/``x_proj``/``dt_proj`` — each written by PEFT's
``save_pretrained`` and checked against PEFT's own ``merge_and_unload()`` in float64 (W_merged − W₀, a 3-D expert
parameter split by expert), σ within 1e-9·σ₁, nothing dropped or left unanalysed.
"""

from __future__ import annotations

import inspect
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import rankscope  # noqa: E402

from .factories import assert_matches, quiet_library_warnings  # noqa: E402, F401 (autouse)

SMALL = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, max_position_embeddings=64, d_model=32, d_ff=48, num_layers=2,
             num_heads=4, d_kv=8, ffn_dim=48, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
             state_size=4, conv_kernel=3, expand=2, time_step_rank=4, pad_token_id=0, word_embed_proj_dim=32,
             bos_token_id=1, eos_token_id=2)  # fmt: skip

ARCHITECTURES = {
    "phi3": ("Phi3Config", "Phi3ForCausalLM"),
    "falcon": ("FalconConfig", "FalconForCausalLM"),
    "bloom": ("BloomConfig", "BloomForCausalLM"),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM"),
    "opt": ("OPTConfig", "OPTForCausalLM"),
    "deberta_v2": ("DebertaV2Config", "DebertaV2ForSequenceClassification"),
    "mt5": ("MT5Config", "MT5ForConditionalGeneration"),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM"),
    "mamba": ("MambaConfig", "MambaForCausalLM"),
}


def _build(architecture: str) -> torch.nn.Module:
    config_name, model_name = ARCHITECTURES[architecture]
    config_class = getattr(transformers, config_name)
    accepted = set(inspect.signature(config_class.__init__).parameters)
    config = config_class(**{k: v for k, v in SMALL.items() if k in accepted})
    torch.manual_seed(0)
    return getattr(transformers, model_name)(config).double()


def _merged(architecture: str, adapter) -> dict[str, torch.Tensor]:
    """ΔW per changed base tensor from PEFT's merge, 2-D (a 3-D expert parameter as ``<path>[<e>]``)."""
    model = _build(architecture)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    after = peft.PeftModel.from_pretrained(model, str(adapter)).double().merge_and_unload().state_dict()
    deltas = {}
    for key, weight in before.items():
        if key in after and not torch.equal(after[key], weight):
            delta, name = after[key] - weight, key.removesuffix(".weight")
            if delta.ndim == 3:
                deltas |= {f"{name}[{e}]": delta[e] for e in range(delta.shape[0])}
            else:
                deltas[name] = delta.reshape(delta.shape[0], -1)
    return deltas


def _config(tuner: str, targets):
    if tuner == "lora":
        return peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    if tuner == "loha":
        return peft.LoHaConfig(r=4, alpha=8, target_modules=targets, init_weights=False)
    if tuner == "lokr":
        return peft.LoKrConfig(r=2, alpha=4, target_modules=targets, init_weights=False, decompose_both=True)
    return peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=True, init_lora_weights=False)


CASES = [(a, "lora") for a in ARCHITECTURES] + [("phi3", "loha"), ("falcon", "lokr"), ("deberta_v2", "dora")]


@pytest.mark.parametrize(("architecture", "tuner"), CASES, ids=[f"{a}-{t}" for a, t in CASES])
def test_adapter_against_peft_merge(tmp_path, architecture, tuner):
    targets = ["in_proj", "x_proj", "dt_proj"] if architecture == "mamba" else "all-linear"  # PEFT refuses the rest
    wrapped = peft.get_peft_model(_build(architecture), _config(tuner, targets))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in wrapped.named_parameters():
            if parameter.requires_grad:  # the adapter's own tensors: random, a magnitude near its base norms
                noise = torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype)
                parameter.copy_(parameter * (1 + 0.1 * noise) if "magnitude" in name else 0.3 * noise)
    wrapped.save_pretrained(tmp_path / "adapter")
    base = None
    if tuner == "dora":
        _build(architecture).save_pretrained(tmp_path / "base")
        base = str(tmp_path / "base")
    checkpoint = rankscope.load(str(tmp_path / "adapter"), base=base)
    assert not checkpoint.not_analysed and not checkpoint.skipped
    deltas = _merged(architecture, tmp_path / "adapter")
    assert deltas
    assert_matches({record.name: record for record in rankscope.analyze(checkpoint)}, deltas, tol=1e-9)
