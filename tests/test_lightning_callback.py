"""The Lightning callback: a real (tiny, offline, CPU) ``lightning.Trainer`` fit of a LightningModule wrapping a PEFT
LoRA, checked against a float64 dense SVD of s·B·A of the module's final weights and a Roy–Vetterli erank written
here, and through the CSV logger's metrics.csv."""

from __future__ import annotations

import csv
import importlib
import json
import math
import sys
import warnings
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner

from rankscope.cli import main
from tests.factories import quiet_library_warnings  # noqa: F401

lightning = pytest.importorskip("lightning", reason="the Lightning callback needs lightning (optional extra)")
transformers = pytest.importorskip("transformers", reason="the tiny model is a transformers Llama (test extra)")
peft = pytest.importorskip("peft", reason="the callback reads PEFT LoRA layers (test extra)")

from lightning.pytorch.loggers import CSVLogger  # noqa: E402

from rankscope.integrations.lightning import RankscopeCallback  # noqa: E402

STEPS, EVERY, R, ALPHA = 4, 2, 4, 8
TYPES = ("q_proj", "v_proj", "down_proj")


class TinyLoraModule(lightning.LightningModule):
    """A random-init two-layer Llama with a PEFT LoRA (r = 4, α = 8) on q, v and down projections."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=2, num_key_value_heads=2, vocab_size=64,
                                          max_position_embeddings=32)  # fmt: skip
        lora = peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=list(TYPES), lora_dropout=0.0)
        self.model = peft.get_peft_model(transformers.LlamaForCausalLM(config), lora)

    def training_step(self, batch, batch_idx):
        return self.model(input_ids=batch, labels=batch).loss

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=2e-2)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("lightning-run")
    generator = torch.Generator().manual_seed(1)
    data = torch.utils.data.DataLoader(torch.randint(0, 64, (8, 16), generator=generator), batch_size=2)
    module, callback = TinyLoraModule(), RankscopeCallback(every_n_steps=EVERY, jsonl=root / "rank.jsonl")
    trainer = lightning.Trainer(max_steps=STEPS, accelerator="cpu", devices=1, logger=CSVLogger(root),
                                enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                                callbacks=[callback])  # fmt: skip
    with warnings.catch_warnings():
        noise = ".*(num_workers|bottleneck|GPU available|TPU available|log_every_n_steps).*"
        warnings.filterwarnings("ignore", message=noise)
        trainer.fit(module, data)
    with open(trainer.logger.log_dir + "/metrics.csv", newline="") as rows:
        logged = [row for row in csv.DictReader(rows)]
    lines = [json.loads(line) for line in (root / "rank.jsonl").read_text().splitlines()]
    module.model.save_pretrained(root / "final")
    return SimpleNamespace(root=root, module=module, callback=callback, logged=logged, lines=lines)


def reference(module) -> dict[str, torch.Tensor]:
    """σ of s·B·A per LoRA layer from the module's final weights: a float64 dense SVD, s = α/r from the config."""
    out = {}
    for path, sub in module.model.named_modules():
        if isinstance(getattr(sub, "lora_A", None), torch.nn.ModuleDict) and "default" in sub.lora_A:
            b, a = sub.lora_B["default"].weight.detach().double(), sub.lora_A["default"].weight.detach().double()
            out[path.removeprefix("base_model.model.")] = torch.linalg.svdvals(ALPHA / R * b @ a)
    return out


def erank(sigma: torch.Tensor) -> float:
    """Roy & Vetterli: exp of the entropy of p_i = σ_i/Σσ."""
    p = sigma[sigma > 0] / sigma.sum()
    return math.exp(-(p * p.log()).sum().item())


def test_jsonl_at_the_last_step_matches_a_float64_svd_of_the_final_weights(run):
    assert [line["step"] for line in run.lines] == [2, 4]
    last = run.lines[-1]
    assert last["schema"] == "rankscope.callback/1" and last["epoch"] == pytest.approx(1.0)
    expected = reference(run.module)
    assert len(expected) == 6 and {layer["name"] for layer in last["layers"]} == set(expected)
    for layer in last["layers"]:
        sigma, ref = torch.tensor(layer["sigma"], dtype=torch.float64), expected[layer["name"]]
        assert layer["rank_bound"] == R and len(sigma) == R
        assert layer["shape"] == ([32, 64] if layer["name"].endswith("down_proj") else [32, 32])
        assert ref[0].item() > 0  # training moved B off its zero init: the comparison is not of zeros
        torch.testing.assert_close(sigma, ref[:R], rtol=0, atol=1e-12 * ref[0].item())
    assert run.lines[0]["layers"][0]["sigma"] != last["layers"][0]["sigma"]


def test_the_csv_logger_holds_the_scalars_at_the_measured_steps(run):
    key = "rankscope/erank/q_proj"
    rows = [row for row in run.logged if row.get(key)]
    assert [int(row["step"]) for row in rows] == [2, 4]
    expected = reference(run.module)
    for kind in TYPES:
        for metric in run.callback.metrics:
            assert rows[-1][f"rankscope/{metric}/{kind}"] != ""
        values = [erank(sigma) for name, sigma in expected.items() if name.endswith(kind)]
        assert float(rows[-1][f"rankscope/erank/{kind}"]) == pytest.approx(sum(values) / len(values), rel=1e-9)
        frob = [sigma.norm().item() for name, sigma in expected.items() if name.endswith(kind)]
        assert float(rows[-1][f"rankscope/frobenius/{kind}"]) == pytest.approx(sum(frob) / len(frob), rel=1e-9)


def test_trajectory_reads_the_jsonl_and_spectrum_agrees_on_the_saved_adapter(run):
    result = CliRunner().invoke(main, ["trajectory", str(run.root / "rank.jsonl"), "--json", "-", "-q"])
    assert result.exit_code == 0, result.output
    final = json.loads(result.stdout)["checkpoints"][-1]
    spectrum = CliRunner().invoke(main, ["spectrum", str(run.root / "final"), "--json", "-", "-q"])
    assert spectrum.exit_code == 0, spectrum.output
    saved = {layer["name"]: layer["singular_values"] for layer in json.loads(spectrum.stdout)["layers"]}
    assert {layer["name"] for layer in final["layers"]} == set(saved)
    for layer in final["layers"]:
        torch.testing.assert_close(torch.tensor(layer["singular_values"]), torch.tensor(saved[layer["name"]]),
                                   rtol=0, atol=1e-12 * saved[layer["name"]][0])  # fmt: skip


def test_rank_zero_only_interval_and_accumulation():
    callback = RankscopeCallback()
    module = TinyLoraModule()
    trainer = SimpleNamespace(global_step=3, is_global_zero=False, log_every_n_steps=3, loggers=[],
                              num_training_batches=float("inf"), current_epoch=0)  # fmt: skip
    callback.on_train_batch_end(trainer, module, None, None, 0)
    assert callback.last == {}  # not global rank zero
    trainer.is_global_zero, trainer.global_step = True, 4
    callback.on_train_batch_end(trainer, module, None, None, 0)
    assert callback.last == {}  # 4 is not a multiple of log_every_n_steps = 3
    seen = []
    trainer.loggers = [SimpleNamespace(log_metrics=lambda values, step: seen.append(step))]
    trainer.global_step = 6
    callback.on_train_batch_end(trainer, module, None, None, 0)
    callback.on_train_batch_end(trainer, module, None, None, 1)  # the same global step (gradient accumulation)
    assert seen == [6] and "rankscope/erank/q_proj" in callback.last
    with pytest.raises(ValueError, match="every_n_steps"):
        RankscopeCallback(every_n_steps=0)


def test_import_without_lightning_is_one_line_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "lightning", None)
    monkeypatch.setitem(sys.modules, "lightning.pytorch", None)
    monkeypatch.delitem(sys.modules, "rankscope.integrations.lightning", raising=False)
    with pytest.raises(ImportError, match=r"pip install 'rankscope\[lightning\]'"):
        importlib.import_module("rankscope.integrations.lightning")
