"""The transformers Trainer callback: a real (tiny, offline) Trainer run with a PEFT LoRA, checked against a
float64 dense SVD of s·B·A from the checkpoint saved at the end and against ``rankscope spectrum`` on it."""

from __future__ import annotations

import importlib
import json
import math
import sys
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from rankscope.cli import main
from tests.factories import quiet_library_warnings  # noqa: F401

transformers = pytest.importorskip("transformers", reason="the callback is for transformers (test extra)")
peft = pytest.importorskip("peft", reason="the callback reads PEFT LoRA layers (test extra)")

from rankscope.integrations.live import LiveWarning  # noqa: E402
from rankscope.integrations.transformers import RankscopeCallback, attach  # noqa: E402

STEPS, EVERY = 6, 2


def tiny_lora_model(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2, vocab_size=64,
                                      max_position_embeddings=32)  # fmt: skip
    model = transformers.LlamaForCausalLM(config)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0)
    return peft.get_peft_model(model, lora)


class Recorder(transformers.TrainerCallback):
    """Stands where the reporting integrations stand (after DefaultFlowCallback): what TensorBoard would get."""

    def __init__(self) -> None:
        self.seen: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.seen.append(dict(logs or {}))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Six steps of LoRA training, logging every 2, the callback attached; the adapter saved at the end."""
    root = tmp_path_factory.mktemp("callback-run")
    generator = torch.Generator().manual_seed(1)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 64, (12, 16), generator=generator)]
    args = transformers.TrainingArguments(output_dir=str(root / "out"), max_steps=STEPS, logging_steps=EVERY,
                                          per_device_train_batch_size=2, learning_rate=2e-2, report_to="none",
                                          save_strategy="no", disable_tqdm=True, use_cpu=True, seed=0)  # fmt: skip
    recorder = Recorder()
    trainer = transformers.Trainer(model=tiny_lora_model(), args=args, train_dataset=data, callbacks=[recorder])
    callback = attach(trainer, jsonl=root / "rank.jsonl")
    order = list(trainer.callback_handler.callbacks)
    trainer.train()
    trainer.save_model(str(root / "final"))
    lines = [json.loads(line) for line in (root / "rank.jsonl").read_text().splitlines()]
    return SimpleNamespace(root=root, trainer=trainer, callback=callback, recorder=recorder, order=order, lines=lines)


def reference(folder) -> dict[str, torch.Tensor]:
    """σ of s·B·A per layer from the saved files: a float64 dense SVD, s = α/r from the saved config."""
    config = json.loads((folder / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    out = {}
    for key, a in tensors.items():
        if ".lora_A." in key:
            b = tensors[key.replace(".lora_A.", ".lora_B.")]
            out[key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")] = torch.linalg.svdvals(
                scale * b.double() @ a.double()
            )
    return out


def test_jsonl_matches_a_float64_svd_and_spectrum_of_the_saved_checkpoint(run):
    assert [line["step"] for line in run.lines] == [2, 4, 6]
    last = run.lines[-1]
    assert last["schema"] == "rankscope.callback/1" and isinstance(last["epoch"], float)
    expected = reference(run.root / "final")
    assert len(expected) == 6 and {layer["name"] for layer in last["layers"]} == set(expected)
    moved = 0
    for layer in last["layers"]:
        sigma, ref = torch.tensor(layer["sigma"], dtype=torch.float64), expected[layer["name"]]
        assert layer["rank_bound"] == 4 and len(sigma) == 4
        assert layer["shape"] == ([32, 64] if layer["name"].endswith("down_proj") else [32, 32])
        assert all(a >= b for a, b in zip(layer["sigma"], layer["sigma"][1:], strict=False))
        torch.testing.assert_close(sigma, ref[:4], rtol=0, atol=1e-12 * max(ref[0].item(), 1e-30))
        moved += ref[0].item() > 0
    assert moved == 6  # training moved B off its zero init: the comparison is not of zeros
    runner = CliRunner().invoke(main, ["spectrum", str(run.root / "final"), "--json", "-", "-q"])
    assert runner.exit_code == 0, runner.output
    spectrum = {layer["name"]: layer for layer in json.loads(runner.stdout)["layers"]}
    for layer in last["layers"]:
        assert layer["shape"] == spectrum[layer["name"]]["matrix_shape"]
        torch.testing.assert_close(torch.tensor(layer["sigma"], dtype=torch.float64),
                                   torch.tensor(spectrum[layer["name"]]["singular_values"], dtype=torch.float64),
                                   rtol=0, atol=1e-12 * layer["sigma"][0])  # fmt: skip
    assert run.lines[0]["layers"][0]["sigma"] != last["layers"][0]["sigma"]


def test_trajectory_reads_the_jsonl_back_to_the_same_sigma(run):
    result = CliRunner().invoke(main, ["trajectory", str(run.root / "rank.jsonl"), "--json", "-", "-q"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert [point["step"] for point in document["checkpoints"]] == [2, 4, 6]
    expected = reference(run.root / "final")
    for layer in document["checkpoints"][-1]["layers"]:
        ref = expected[layer["name"]]
        got = torch.tensor(layer["singular_values"], dtype=torch.float64)
        torch.testing.assert_close(got, ref[:4], rtol=0, atol=1e-12 * ref[0].item())
    assert {layer["name"] for layer in document["checkpoints"][-1]["layers"]} == set(expected)


def erank(sigma: torch.Tensor) -> float:
    """Roy & Vetterli: exp of the entropy of p_i = σ_i/Σσ."""
    p = sigma[sigma > 0] / sigma.sum()
    return math.exp(-(p * p.log()).sum().item())


def test_log_history_and_the_integrations_get_the_scalars(run):
    logged = [entry for entry in run.trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in logged] == [2, 4, 6]
    keys = {f"rankscope/{m}/{t}" for m in run.callback.metrics for t in ("q_proj", "v_proj", "down_proj")}
    for entry in logged:
        assert keys <= set(entry), sorted(entry)
    expected = reference(run.root / "final")
    for kind in ("q_proj", "v_proj", "down_proj"):
        values = [erank(sigma) for name, sigma in expected.items() if name.endswith(kind)]
        assert logged[-1][f"rankscope/erank/{kind}"] == pytest.approx(sum(values) / len(values), rel=1e-9)
        frob = [sigma.norm().item() for name, sigma in expected.items() if name.endswith(kind)]
        assert logged[-1][f"rankscope/frobenius/{kind}"] == pytest.approx(sum(frob) / len(frob), rel=1e-9)
    # the callback runs before what stands where TensorBoard/W&B/MLflow stand, so they receive the values
    names = [type(cb).__name__ for cb in run.order]
    assert names.index("RankscopeCallback") < names.index("Recorder")
    assert names.index("DefaultFlowCallback") < names.index("RankscopeCallback")
    received = [logs for logs in run.recorder.seen if "loss" in logs]
    assert len(received) == 3 and all(keys <= set(logs) for logs in received)


def test_main_process_only_and_interval(run):
    model = tiny_lora_model()
    callback = RankscopeCallback(every_n_steps=3)
    args = SimpleNamespace(logging_steps=10)
    state = SimpleNamespace(global_step=3, epoch=0.5, is_world_process_zero=False, log_history=[], logging_steps=10)
    callback.on_step_end(args, state, None, model=model)
    assert callback._pending is None
    state.is_world_process_zero = True
    state.global_step = 4
    callback.on_step_end(args, state, None, model=model)
    assert callback._pending is None  # 4 is not a multiple of 3
    state.global_step = 6
    callback.on_step_end(args, state, None, model=model)
    logs = {"loss": 1.0}
    state.log_history.append({"loss": 1.0, "step": 6})
    callback.on_log(args, state, None, logs=logs)
    assert "rankscope/erank/q_proj" in logs and "rankscope/erank/q_proj" in state.log_history[-1]
    assert logs["rankscope/erank/q_proj"] == 0.0  # untrained: B = 0, every metric 0 (never NaN)
    assert RankscopeCallback().interval(args, SimpleNamespace(logging_steps=0)) == 10


def test_sharded_parameters_are_skipped_with_a_warning():
    model = tiny_lora_model()
    module = model.base_model.model.model.layers[0].self_attn.q_proj
    module.lora_A["default"].weight = torch.nn.Parameter(torch.empty(0))  # as FSDP leaves a shard on another rank
    callback = RankscopeCallback(every_n_steps=1)
    with pytest.warns(LiveWarning, match=r"model\.layers\.0\.self_attn\.q_proj: sharded parameter"):
        values = callback.measure(model, 1)
    assert "rankscope/erank/q_proj" in values  # layer 1's q_proj is still read


def test_unknown_metric_is_refused():
    with pytest.raises(ValueError, match="unknown metric 'erankk'"):
        RankscopeCallback(metrics=["erankk"])
    with pytest.raises(ValueError, match="count_above"):
        RankscopeCallback(metrics=["count_above"])
    assert RankscopeCallback(metrics=["count_above[0.01]"]).parameters["thresholds"] == (0.01,)


def test_without_transformers_a_one_line_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    monkeypatch.delitem(sys.modules, "rankscope.integrations.transformers", raising=False)
    with pytest.raises(ImportError, match=r"pip install 'rankscope\[transformers\]'"):
        importlib.import_module("rankscope.integrations.transformers")
