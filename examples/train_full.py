"""Fine-tune the tiny LM of ``train_lora.py`` fully (every parameter) on the bundled LoRAs' task and data.

The same frozen base (``checkpoints/tiny-base``), the same code corpus (the ``json``, ``http`` and ``email`` stdlib
packages, the same split), the same steps, batch size and schedule as ``train_adapters.py`` (300 steps of 16
windows, AdamW, 20-step warm-up, linear decay) — but all parameters train, at the learning rate full fine-tuning
uses (1e-3; the LoRAs use 1e-2). Deterministic and offline; seconds on two cores.

Output (under ``--out``, default ``examples/checkpoints/``): ``tiny-full/model.safetensors``, ``config.json`` and
``results.json`` (losses, steps, wall time). Read it against the base with
``rankscope spectrum examples/checkpoints/tiny-full --base examples/checkpoints/tiny-base``.

    python examples/train_full.py               # 300 steps
    python examples/train_full.py --quick --out /tmp/x
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from safetensors.torch import load_file, save_file
from train_lora import CONFIG, SEED, TinyLM, code_corpus, evaluate, prose_corpus, split, train

STEPS, BATCH, N_EVAL, LR = 300, 16, 64, 1e-3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    here = Path(__file__).resolve().parent / "checkpoints"
    ap.add_argument("--out", type=Path, default=here)
    ap.add_argument("--base", type=Path, default=here / "tiny-base")
    ap.add_argument("--quick", action="store_true", help="5 steps (smoke test)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    torch.manual_seed(SEED)
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    steps, batch_size, n_eval = (5, 4, 8) if args.quick else (STEPS, BATCH, N_EVAL)

    code_train, code_val = split(code_corpus()[0])
    _, prose_val = split(prose_corpus())
    model = TinyLM(CONFIG)
    model.load_state_dict(load_file(args.base / "model.safetensors"))
    before = evaluate(model, code_val, n_eval)
    print(f"full fine-tune of {sum(p.numel() for p in model.parameters())} params; code val loss before {before:.4f}")
    final = train(model, model.parameters(), code_train, code_val, steps, LR, batch_size, n_eval, "full")
    after, prose_after = evaluate(model, code_val, n_eval), evaluate(model, prose_val, n_eval)
    out = args.out / "tiny-full"
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out / "model.safetensors")
    (out / "config.json").write_text(json.dumps({"architecture": "TinyLM", **CONFIG}, indent=2) + "\n")
    results = {
        "seed": SEED,
        "quick": args.quick,
        "base": str(args.base.name),
        "training": {
            "steps": steps,
            "batch_size": batch_size,
            "lr": LR,
            "optimizer": "AdamW",
            "schedule": "20-step warm-up, linear decay",
            "trainable": "all parameters",
        },
        "final_train_loss": final,
        "val_loss_code_before": before,
        "val_loss_code": after,
        "val_loss_prose": prose_after,
        "wall_time_s": round(time.perf_counter() - t0, 2),
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__},
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"code val loss {before:.4f} -> {after:.4f} (prose val {prose_after:.4f}); saved {out}")
    return 0 if args.quick or after < before else 1


if __name__ == "__main__":
    sys.exit(main())
