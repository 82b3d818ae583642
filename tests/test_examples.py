"""The bundled, really trained example: rankscope's spectra against PEFT's own merge, and the script stays runnable."""

from __future__ import annotations

import copy
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import rankscope

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINTS = ROOT / "examples" / "checkpoints"


def training_script():
    spec = importlib.util.spec_from_file_location("train_lora", ROOT / "examples" / "train_lora.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bundled_adapter_matches_peft_merge():
    from peft import PeftModel

    script = training_script()
    config = json.loads((CHECKPOINTS / "tiny-base" / "config.json").read_text())
    base = script.TinyLM(config)
    base.load_state_dict(load_file(CHECKPOINTS / "tiny-base" / "model.safetensors"))
    base_weights = {k: v.double() for k, v in base.state_dict().items()}
    merged = PeftModel.from_pretrained(copy.deepcopy(base), CHECKPOINTS / "tiny-lora").merge_and_unload().state_dict()

    analysis = rankscope.analyze(rankscope.load(CHECKPOINTS / "tiny-lora"))
    assert len(analysis) == 12 and not analysis.invalid
    for record in analysis:
        key = f"{record.name}.weight"
        delta = merged[key].double() - base_weights[key]
        expected = torch.linalg.svdvals(delta)
        # PEFT merges in float32: its ΔW carries ~1e-7·‖W0‖ rounding, so compare at that resolution
        tolerance = 1e-5 * base_weights[key].norm().item()
        assert record.singular_values == pytest.approx(expected[: record.rank_bound].tolist(), abs=tolerance)
        assert record.rank_bound == 8 and record.scale == 2.0
        assert record.metric("count_above", 0.005) == 8


def test_training_script_quick_run(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "train_lora.py"), "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    analysis = rankscope.analyze(rankscope.load(tmp_path / "tiny-lora"))
    assert len(analysis) == 12 and all(r.valid for r in analysis)
    assert json.loads((tmp_path / "results.json").read_text())["quick"] is True
