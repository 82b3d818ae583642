"""Train a tiny LoRA adapter for real, on CPU, in well under a minute.

Phase 1 pre-trains a 2-layer byte-level transformer from scratch on English prose
(the help topics shipped in the standard library's ``pydoc_data``).  Phase 2 freezes it and
fine-tunes a PEFT LoRA adapter on a different domain: the Python source of the ``json``,
``http`` and ``email`` standard-library packages.  Everything is deterministic and offline.

Outputs (under ``--out``, default ``examples/checkpoints/``):
  tiny-base/model.safetensors, tiny-base/config.json   the frozen base model (float32)
  tiny-lora/                                           PEFT ``save_pretrained`` output
  results.json                                         seed, steps, losses, wall time, versions

    python examples/train_lora.py            # full run (< 60 s on 2 cores)
    python examples/train_lora.py --quick --out /tmp/x   # smoke test, ~5 steps per phase
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # PEFT must never touch the network here

import pydoc_data.topics

import peft
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn

SEED = 0
CONFIG = {
    "vocab_size": 256,
    "d_model": 64,
    "n_layers": 2,
    "n_heads": 4,
    "d_ff": 128,
    "max_seq_len": 128,
    "norm": "rmsnorm",
    "activation": "gelu",
    "positions": "learned",
    "tokenizer": "utf-8 bytes",
}
CODE_PACKAGES = ("json", "http", "email")  # top-level .py files of these stdlib packages (3.10+)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]


# ----------------------------------------------------------------------------- model
class Attention(nn.Module):
    def __init__(self, d: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d, bias=False) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (
            proj(x).view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2)  # (b, h, t, d/h)
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # causal self-attention
        return self.o_proj(y.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    def __init__(self, d: int, d_ff: int):
        super().__init__()
        self.up_proj, self.down_proj = nn.Linear(d, d_ff, bias=False), nn.Linear(d_ff, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.up_proj(x)))


class Block(nn.Module):  # pre-norm: x + attn(norm(x)), then x + mlp(norm(x))
    def __init__(self, cfg: dict):
        super().__init__()
        self.input_layernorm = nn.RMSNorm(cfg["d_model"])
        self.self_attn = Attention(cfg["d_model"], cfg["n_heads"])
        self.post_attention_layernorm = nn.RMSNorm(cfg["d_model"])
        self.mlp = MLP(cfg["d_model"], cfg["d_ff"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg["vocab_size"], cfg["d_model"])
        self.embed_positions = nn.Embedding(cfg["max_seq_len"], cfg["d_model"])
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg["n_layers"]))
        self.norm = nn.RMSNorm(cfg["d_model"])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(ids) + self.embed_positions(torch.arange(ids.shape[1]))
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)


class TinyLM(nn.Module):
    """Llama-style names: model.layers.{i}.self_attn.q_proj, ..., model.layers.{i}.mlp.up_proj, lm_head."""

    def __init__(self, cfg: dict):
        super().__init__()
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg["d_model"], cfg["vocab_size"], bias=False)
        for p in self.parameters():  # small init keeps the first steps stable
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.model(ids))


# ----------------------------------------------------------------------------- data
def split(text: str, val_frac: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """Byte-tokenise and hold out the last `val_frac` of the corpus as a contiguous validation split."""
    data = torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
    cut = int(len(data) * (1 - val_frac))
    return data[:cut], data[cut:]


def prose_corpus() -> str:
    topics = pydoc_data.topics.topics
    return "\n\n".join(topics[k] for k in sorted(topics))


def code_corpus() -> tuple[str, list[str]]:
    files = []
    for pkg in CODE_PACKAGES:
        pkg_dir = Path(__import__(pkg).__file__).parent
        files += sorted(pkg_dir.glob("*.py"))
    text = "\n\n".join(f.read_text(encoding="utf-8") for f in files)
    return text, [f"{f.parent.name}/{f.name}" for f in files]


def batch(data: torch.Tensor, size: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    t = CONFIG["max_seq_len"]
    starts = torch.randint(len(data) - t - 1, (size,), generator=gen)
    x = torch.stack([data[s : s + t + 1] for s in starts.tolist()])
    return x[:, :-1], x[:, 1:]


@torch.no_grad()
def evaluate(model: nn.Module, data: torch.Tensor, n_windows: int) -> float:
    """Mean next-byte loss over `n_windows` evenly spaced windows (fixed, so comparable across calls)."""
    t = CONFIG["max_seq_len"]
    starts = torch.linspace(0, len(data) - t - 1, n_windows).long().tolist()
    x = torch.stack([data[s : s + t + 1] for s in starts])
    was_training = model.training
    model.eval()
    loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()).item()
    model.train(was_training)
    return loss


def train(model, params, train_data, val_data, steps, lr, batch_size, n_eval, tag) -> float:
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * (1 - s / steps))
    gen = torch.Generator().manual_seed(SEED)
    model.train()
    loss = torch.tensor(float("nan"))
    for step in range(1, steps + 1):
        x, y = batch(train_data, batch_size, gen)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step == 1 or step % max(1, steps // 4) == 0 or step == steps:
            val = evaluate(model, val_data, n_eval)
            print(f"  [{tag}] step {step:4d}/{steps}  train {loss.item():.4f}  val {val:.4f}")
    return loss.item()


# ----------------------------------------------------------------------------- main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "checkpoints")
    ap.add_argument("--quick", action="store_true", help="~5 steps per phase (smoke test)")
    args = ap.parse_args()
    t0 = time.perf_counter()

    torch.manual_seed(SEED)
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    pre_steps, lora_steps, bs, n_eval = (5, 5, 4, 8) if args.quick else (400, 300, 32, 64)

    prose_train, prose_val = split(prose_corpus())
    code_text, code_files = code_corpus()
    code_train, code_val = split(code_text)
    print(
        f"prose: {len(prose_train)}+{len(prose_val)} bytes; code: {len(code_train)}+{len(code_val)} bytes "
        f"from {len(code_files)} files in {', '.join(CODE_PACKAGES)}"
    )

    # Phase 1: pre-train the base model from scratch on prose.
    model = TinyLM(CONFIG)
    print(f"phase 1: pre-train base ({sum(p.numel() for p in model.parameters())} params) on pydoc prose")
    base_train = train(model, model.parameters(), prose_train, prose_val, pre_steps, 3e-3, bs, n_eval, "base")
    base_val = evaluate(model, prose_val, n_eval)
    code_val_before = evaluate(model, code_val, n_eval)

    base_dir, lora_dir = args.out / "tiny-base", args.out / "tiny-lora"
    base_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, base_dir / "model.safetensors")
    (base_dir / "config.json").write_text(json.dumps({"architecture": "TinyLM", **CONFIG}, indent=2) + "\n")

    # Phase 2: freeze the base, fine-tune only LoRA adapters on Python source code.
    lora_cfg = LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0)
    torch.manual_seed(SEED + 1)  # LoRA A-matrix init
    peft_model = get_peft_model(model, lora_cfg)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    print(
        f"phase 2: LoRA fine-tune on stdlib code ({n_trainable} trainable params); "
        f"code val loss before: {code_val_before:.4f}"
    )
    lora_train = train(peft_model, trainable, code_train, code_val, lora_steps, 1e-2, bs, n_eval, "lora")
    code_val_after = evaluate(peft_model, code_val, n_eval)
    prose_val_after = evaluate(peft_model, prose_val, n_eval)
    print(
        f"code val loss: {code_val_before:.4f} -> {code_val_after:.4f}  (prose val: {base_val:.4f} -> "
        f"{prose_val_after:.4f})"
    )
    # PEFT stores target_modules as a set (saved in hash-seed order); sort it so the JSON is stable.
    peft_model.peft_config["default"].target_modules = sorted(lora_cfg.target_modules)
    peft_model.save_pretrained(lora_dir)  # adapter_config.json + adapter_model.safetensors + README.md
    train_seconds = time.perf_counter() - t0

    # Verify: a fresh base from disk + PeftModel.from_pretrained must reproduce the trained logits.
    fresh = TinyLM(CONFIG)
    fresh.load_state_dict(load_file(base_dir / "model.safetensors"))
    reloaded = PeftModel.from_pretrained(fresh, lora_dir).eval()
    peft_model.eval()
    probe = code_val[: CONFIG["max_seq_len"]].unsqueeze(0)
    with torch.no_grad():
        max_diff = (reloaded(probe) - peft_model(probe)).abs().max().item()
    print(f"reload check: max |logits(reloaded) - logits(trained)| = {max_diff:.3g}")

    results = {
        "seed": SEED,
        "quick": args.quick,
        "config": CONFIG,
        "lora": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": TARGETS},
        "steps": {"base_pretrain": pre_steps, "lora_finetune": lora_steps, "batch_size": bs},
        "base_pretrain": {"final_train_loss": base_train, "val_loss_prose": base_val},
        "lora_finetune": {
            "final_train_loss": lora_train,
            "val_loss_code_before": code_val_before,
            "val_loss_code_after": code_val_after,
            "val_loss_prose_after": prose_val_after,
        },
        "trainable_params": n_trainable,
        "reload_max_abs_logit_diff": max_diff,
        "code_files": code_files,
        "wall_time_s": round(train_seconds, 2),
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__, "peft": peft.__version__},
    }
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"saved {lora_dir}, {base_dir}, {args.out / 'results.json'} in {train_seconds:.1f} s")

    if max_diff > 1e-5:
        print("ERROR: reloaded adapter does not reproduce the trained model", file=sys.stderr)
        return 1
    if not args.quick and not code_val_after < code_val_before:
        print("ERROR: LoRA fine-tune did not reduce the code validation loss", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
