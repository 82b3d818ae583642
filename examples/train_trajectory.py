"""Train the tiny LoRA of ``train_lora.py`` again and save a checkpoint every N steps, as a Trainer run does.

It loads the shipped base (``examples/checkpoints/tiny-base``, written by ``train_lora.py``), fine-tunes the same
r = 8 LoRA on the same code corpus with the same seeds, schedule and loop, and writes a transformers-Trainer-like
``output_dir``: ``checkpoint-N/`` with ``adapter_config.json``, ``adapter_model.safetensors`` and a
``trainer_state.json`` (``global_step``, ``epoch``, ``log_history``) every ``--every`` steps. The last checkpoint
is the adapter ``train_lora.py`` saves (compared at the end). Deterministic and offline; about 5 minutes on two
busy cores (the 12 checkpoints: 0.75 MB).

    python examples/train_trajectory.py                      # -> examples/checkpoints/trajectory/
    rankscope trajectory examples/checkpoints/trajectory -o /tmp/trajectory-report
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_lora import CONFIG, SEED, TARGETS, TinyLM, batch, code_corpus, evaluate, split

HERE = Path(__file__).resolve().parent / "checkpoints"


def save_checkpoint(peft_model, out: Path, step: int, steps: int, history: list[dict]) -> None:
    folder = out / f"checkpoint-{step}"
    peft_model.save_pretrained(folder)
    (folder / "README.md").unlink(missing_ok=True)  # PEFT's model card: not needed, keeps the shipped run small
    state = {"global_step": step, "max_steps": steps, "epoch": None, "log_history": list(history)}
    (folder / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", type=Path, default=HERE / "tiny-base")
    ap.add_argument("--out", type=Path, default=HERE / "trajectory")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--every", type=int, default=25)
    args = ap.parse_args()
    t0 = time.perf_counter()
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    batch_size, n_eval, lr = 32, 64, 1e-2  # train_lora.py's LoRA phase

    model = TinyLM(CONFIG)
    model.load_state_dict(load_file(args.base / "model.safetensors"))
    code_train, code_val = split(code_corpus()[0])
    lora_cfg = LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0)
    torch.manual_seed(SEED + 1)  # the LoRA A init of train_lora.py
    peft_model = get_peft_model(model, lora_cfg)
    peft_model.peft_config["default"].target_modules = sorted(lora_cfg.target_modules)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]

    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    # the loop of train_lora.train, with a checkpoint every --every steps
    steps = args.steps
    opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * (1 - s / steps))
    gen = torch.Generator().manual_seed(SEED)
    peft_model.train()
    history: list[dict] = []
    for step in range(1, steps + 1):
        x, y = batch(code_train, batch_size, gen)
        loss = F.cross_entropy(peft_model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % args.every == 0 or step == steps:
            val = evaluate(peft_model, code_val, n_eval)
            history.append({"step": step, "loss": round(loss.item(), 5), "eval_loss": round(val, 5)})
            save_checkpoint(peft_model, args.out, step, steps, history)
            print(f"  step {step:4d}/{steps}  train {loss.item():.4f}  val {val:.4f}  -> checkpoint-{step}")

    final = load_file(args.out / f"checkpoint-{steps}" / "adapter_model.safetensors")
    shipped = HERE / "tiny-lora" / "adapter_model.safetensors"
    if shipped.is_file() and steps == 300:
        reference = load_file(shipped)
        diff = max((final[k] - reference[k]).abs().max().item() for k in reference)
        print(f"last checkpoint vs examples/checkpoints/tiny-lora: max |difference| = {diff:.3g}")
    size = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    print(f"saved {len(history)} checkpoints ({size / 1e6:.2f} MB) to {args.out} in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
