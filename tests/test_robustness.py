"""Hostile and broken inputs: a bounded fuzzing campaign, resource limits, partial damage, paths.

The longer campaign: ``python -m fuzz.campaign --cases 20000 --seed 1`` (reports/robustness.md).
"""

from __future__ import annotations

import json
import re
import struct

import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import rankscope
from fuzz import campaign, harness
from rankscope.cli import main

from .factories import lora_config, random_factors, write_lora


def test_bounded_campaign_has_no_failure(tmp_path):
    summary = campaign.run_campaign(400, seed=7, workdir=tmp_path)
    assert summary["distinct_failures"] == {}, summary["distinct_failures"]
    # the mutations do reach both outcomes: some inputs stay analysable, most are refused with a reason
    assert summary["outcomes"]["analysed"] > 20 and summary["outcomes"]["refused"] > 100


def test_overflowing_scale_makes_the_layer_invalid_not_a_crash(tmp_path):
    directory = write_lora(tmp_path / "a", {"lin": random_factors(8, 8, 2, 0)}, lora_config(r=2, lora_alpha=1e308))
    assert harness.run(directory).kind == "analysed"  # no exception escapes
    (record,) = rankscope.analyze(rankscope.load(directory))
    assert not record.valid and "not finite" in record.error
    result = CliRunner().invoke(main, ["spectrum", str(directory)])
    assert result.exit_code == 1 and "not finite" in result.stderr


def test_a_header_declaring_a_huge_tensor_is_refused_before_allocation(tmp_path):
    directory = write_lora(tmp_path / "a", {"lin": random_factors(8, 8, 2, 0)}, lora_config(r=2))
    path = directory / "adapter_model.safetensors"
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    key = next(k for k in header if k.endswith("lora_A.weight"))
    header[key]["shape"] = [10**6, 10**6]  # 10¹² elements: 4 TB as float32
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + length :])
    result = CliRunner().invoke(main, ["spectrum", str(directory)])
    assert result.exit_code == 1 and "not a valid safetensors file" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_config_with_absurd_rank_is_refused_per_layer(tmp_path):
    directory = write_lora(tmp_path / "a", {"lin": random_factors(8, 8, 2, 0)}, lora_config(r=10**9))
    result = CliRunner().invoke(main, ["spectrum", str(directory)])
    assert result.exit_code == 1 and "r=1000000000" in result.stderr


def test_dense_path_refuses_what_does_not_fit_in_max_memory(tmp_path):
    directory = write_lora(tmp_path / "a", {"big": random_factors(256, 256, 4, 0), "small": random_factors(8, 8, 4, 1)},
                           lora_config())  # fmt: skip
    result = CliRunner().invoke(
        main, ["spectrum", str(directory), "--dense", "--max-memory", "64K", "--json", "-", "-q"]
    )
    assert result.exit_code == 0, result.output
    layers = {layer["name"]: layer for layer in json.loads(result.stdout)["layers"]}
    assert layers["small"]["valid"] is True
    assert (
        layers["big"]["valid"] is False and "1.5 MiB" in layers["big"]["error"] and "64 KiB" in layers["big"]["error"]
    )
    assert CliRunner().invoke(main, ["spectrum", str(directory), "--max-memory", "lots"]).exit_code == 2


def test_two_hundred_layers_with_three_bad_ones(tmp_path):
    factors = {f"model.layers.{i}.proj": random_factors(6, 6, 2, i) for i in range(200)}
    bad_rank = {**factors}
    extra = {}
    a, b = random_factors(6, 6, 2, 1000)
    bad_rank["model.layers.7.proj"] = (a.clone(), torch.randn(6, 3))  # ranks disagree
    nan_b = b.clone()
    nan_b[0, 0] = float("nan")
    bad_rank["model.layers.42.proj"] = (a.clone(), nan_b)
    del bad_rank["model.layers.99.proj"]
    extra["base_model.model.model.layers.99.proj.lora_A.weight"] = a  # no lora_B
    directory = write_lora(tmp_path / "a", bad_rank, lora_config(r=2), extra=extra)
    out = tmp_path / "out.json"
    result = CliRunner().invoke(main, ["spectrum", str(directory), "--json", str(out), "-q"])
    assert result.exit_code == 0
    doc = json.loads(out.read_text())
    invalid = {layer["name"]: layer["error"] for layer in doc["layers"] if not layer["valid"]}
    assert set(invalid) == {"model.layers.7.proj", "model.layers.42.proj", "model.layers.99.proj"}
    assert "rank mismatch" in invalid["model.layers.7.proj"] and "1 NaN" in invalid["model.layers.42.proj"]
    assert "no matching lora_B" in invalid["model.layers.99.proj"]
    assert sum(layer["valid"] for layer in doc["layers"]) == 197
    assert len([line for line in result.stderr.splitlines() if "is invalid" in line]) == 3
    strict = CliRunner().invoke(main, ["spectrum", str(directory), "--strict", "-q"])
    assert strict.exit_code == 1


@pytest.mark.parametrize("name", ["<img src=x onerror=alert(1)>", "=cmd|' /C calc'!A0", "@SUM(1+1)"])
def test_hostile_layer_names_are_inert_in_csv_and_markdown(tmp_path, name):
    tensors = {f"{name}.lora_A.weight": torch.randn(2, 4), f"{name}.lora_B.weight": torch.randn(4, 2)}
    directory = tmp_path / "a"
    directory.mkdir()
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    (directory / "adapter_config.json").write_text(json.dumps(lora_config(r=2)))
    analysis = rankscope.analyze(rankscope.load(directory))
    from rankscope.report.csv import layers_csv
    from rankscope.report.markdown import spectrum_markdown

    csv_text = layers_csv(analysis)
    if name[0] in "=@":
        assert f"\n{name}," not in csv_text and f"\n'{name}," in csv_text  # a text cell, not a formula
    markdown = spectrum_markdown(analysis)
    assert re.search(r"(?<!\\)<(?!/?(details|summary)>)", markdown) is None  # no live HTML from the checkpoint


def test_manifest_cycle_and_missing_component(tmp_path):
    manifest = {"format": "rankscope.composition/1", "components": ["."], "weights": [1.0]}
    (tmp_path / "composition.json").write_text(json.dumps(manifest))
    result = CliRunner().invoke(main, ["spectrum", str(tmp_path)])
    assert result.exit_code == 1 and "cycle" in result.stderr
    manifest["components"] = ["missing"]
    (tmp_path / "composition.json").write_text(json.dumps(manifest))
    result = CliRunner().invoke(main, ["spectrum", str(tmp_path)])
    assert result.exit_code == 1 and "'missing' does not exist" in result.stderr


_NAMES = st.sampled_from(
    ["m.lora_A.weight", "m.lora_B.weight", "m.lora_sigma", "m.lora_A.0.weight", "m.lora_B.0.weight", "m.alpha",
     "m.lora_down.weight", "m.lora_up.weight", "m.hada_w1_a", "m.lokr_w1", "m.boost_weights", "m.lora_E",
     "m.lora_magnitude_vector", "base_model.vera_A", "m.ia3_l", "\u00ff", ""]
)  # fmt: skip
_ENTRY = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from(["F32", "F16", "BF16", "F64", "I64", "BOOL", "U8", "Q4"]),
        "shape": st.lists(st.integers(-2, 40), min_size=0, max_size=4),
        "data_offsets": st.lists(st.integers(-8, 5000), min_size=2, max_size=2),
    }
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=st.dictionaries(_NAMES, _ENTRY, max_size=5), body=st.binary(max_size=4096), config=st.booleans())
def test_generated_safetensors_headers(tmp_path, header, body, config):
    """Property: whatever the header claims, rankscope analyses the file or refuses it with its own one-line error."""
    directory = tmp_path / f"case{abs(hash((json.dumps(header), body, config)))}"
    directory.mkdir()
    raw = json.dumps(header).encode()
    (directory / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + body)
    if config:
        (directory / "adapter_config.json").write_text(json.dumps(lora_config(r=2)))
    outcome = harness.run(directory)
    assert outcome.kind != "failure", outcome.detail
