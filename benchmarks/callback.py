"""What the Trainer callback costs: a fraction of the step time on a tiny LM training, and per layer on an
8B-shaped adapter (4096×4096 layers, r = 16, in memory).

    .venv/bin/python benchmarks/callback.py [--steps 40] [--layers 8] [--repeats 5]

Part 1 trains a tiny random-init Llama with a PEFT LoRA on the CPU, without the callback and with it at the
default interval (the logging interval, 10 steps) and at every step, and times one ``measure`` call against the
mean step. Part 2 times ``measure`` on ``--layers`` PEFT-shaped LoRA modules of 4096×4096 (the base weights are
not needed to read the adapter, so none are built) and gives the time per layer; an 8B Llama has 224 adapted
projections when all seven are targeted. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings

import torch

from rankscope.integrations.transformers import RankscopeCallback, attach


def _tiny_trainer(steps: int, logging_steps: int, every: int | None, with_callback: bool):
    import peft
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4, vocab_size=128,
                                      max_position_embeddings=64)  # fmt: skip
    lora = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                                "up_proj", "down_proj"])  # fmt: skip
    model = peft.get_peft_model(transformers.LlamaForCausalLM(config), lora)
    ids = torch.randint(0, 128, (4 * steps, 32), generator=torch.Generator().manual_seed(1))
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = transformers.TrainingArguments(output_dir="/tmp/rankscope-bench-callback", max_steps=steps,
                                          logging_steps=logging_steps, per_device_train_batch_size=4,
                                          learning_rate=1e-3, report_to="none", save_strategy="no",
                                          disable_tqdm=True, use_cpu=True)  # fmt: skip
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
    trainer.remove_callback(transformers.trainer_callback.PrinterCallback)  # the console is not what is timed
    callback = attach(trainer, every_n_steps=every) if with_callback else None
    return trainer, callback


def _train_seconds(trainer) -> float:
    start = time.perf_counter()
    trainer.train()
    return time.perf_counter() - start


def _median_measure(callback: RankscopeCallback, model, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        callback.measure(model, 0)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def tiny_training(steps: int, repeats: int) -> dict:
    plain, _ = _tiny_trainer(steps, 10, None, with_callback=False)
    baseline = _train_seconds(plain)
    default, callback = _tiny_trainer(steps, 10, None, with_callback=True)
    with_default = _train_seconds(default)
    every, _ = _tiny_trainer(steps, 10, 1, with_callback=True)
    with_every = _train_seconds(every)
    step = baseline / steps
    measure = _median_measure(callback, default.model, repeats)
    layers = sum(1 for name, _ in default.model.named_modules() if name.endswith(("_proj",)) and "lora" not in name)
    return {"steps": steps, "adapted_layers": layers, "step_s": step, "measure_s": measure,
            "fraction_of_a_step_at_default_interval": measure / (10 * step),
            "fraction_of_a_step_every_step": measure / step,
            "train_s": {"without": baseline, "default_interval": with_default, "every_step": with_every}}  # fmt: skip


class _LoraShaped(torch.nn.Module):
    """A PEFT LoRA module's adapter part (``lora_A``/``lora_B`` ModuleDicts, ``scaling``), without its base."""

    def __init__(self, out_features: int, in_features: int, rank: int) -> None:
        super().__init__()
        self.lora_A = torch.nn.ModuleDict({"default": torch.nn.Linear(in_features, rank, bias=False)})
        self.lora_B = torch.nn.ModuleDict({"default": torch.nn.Linear(rank, out_features, bias=False)})
        torch.nn.init.normal_(self.lora_B["default"].weight, std=1e-3)  # trained: B off its zero init
        self.scaling = {"default": 2.0}
        self.active_adapters = ["default"]


def eight_b_shaped(layers: int, repeats: int, device: str) -> dict:
    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList(torch.nn.ModuleDict({"q_proj": _LoraShaped(4096, 4096, 16)})
                                       for _ in range(layers))  # fmt: skip
    model.to(device)
    callback = RankscopeCallback(every_n_steps=1)
    callback.measure(model, 0)  # warm-up (imports, allocator)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = _median_measure(callback, model, repeats)
    return {"device": device, "layers": layers, "shape": [4096, 4096], "rank": 16, "measure_s": seconds,
            "per_layer_ms": 1000 * seconds / layers,
            "projected_224_layers_s": 224 * seconds / layers}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-training", action="store_true", help="Only the 8B-shaped part.")
    options = parser.parse_args()
    warnings.simplefilter("ignore")
    result = {"torch_threads": torch.get_num_threads()}
    if not options.skip_training:
        result["tiny_training"] = tiny_training(options.steps, options.repeats)
    result["eight_b_shaped"] = [eight_b_shaped(options.layers, options.repeats, "cpu")]
    if torch.cuda.is_available():
        result["eight_b_shaped"].append(eight_b_shaped(options.layers, options.repeats, "cuda"))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
