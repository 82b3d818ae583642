"""Hub ids (``owner/name[@revision]``) read offline from a cache laid out as huggingface_hub lays it out."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import rankscope
from rankscope.cli import main
from rankscope.core.base import BaseWeights
from rankscope.core.errors import CheckpointError
from rankscope.core.hub import parse_hub_id
from tests.factories import llama_like, quiet_library_warnings  # noqa: F401

COMMIT_OLD = "1" * 40
COMMIT_NEW = "a" * 40


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty hub cache, offline, named by HF_HUB_CACHE (HF_HOME pointed elsewhere to show which wins)."""
    root = tmp_path / "hub-cache"
    root.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "not-this-one"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return root


def lay_out(cache: Path, repo: str, commit: str, files: Path, *, blobs: bool, ref: str | None = "main") -> Path:
    """Put the files of folder ``files`` into ``cache`` as snapshot ``commit`` of ``repo``.

    ``blobs``: as huggingface_hub stores downloads — content in ``blobs/<hash>``, the snapshot holding relative
    symlinks to them; else plain files in the snapshot. ``ref`` (a branch) is pointed at the commit.
    """
    storage = cache / ("models--" + repo.replace("/", "--"))
    snapshot = storage / "snapshots" / commit
    for source in sorted(p for p in files.rglob("*") if p.is_file()):
        target = snapshot / source.relative_to(files)
        target.parent.mkdir(parents=True, exist_ok=True)
        if blobs:
            digest = hashlib.sha256(source.read_bytes()).hexdigest()
            blob = storage / "blobs" / digest
            blob.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, blob)
            target.symlink_to(os.path.relpath(blob, target.parent))
        else:
            shutil.copyfile(source, target)
    if ref is not None:
        (storage / "refs").mkdir(parents=True, exist_ok=True)
        (storage / "refs" / ref).write_text(commit)  # no newline: as huggingface_hub writes it
    return snapshot


def reference_sigma(folder: Path) -> dict[str, torch.Tensor]:
    """σ of s·B·A per layer, a float64 dense SVD of the files themselves (s = α/r from the config)."""
    from safetensors.torch import load_file

    config = json.loads((folder / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    result = {}
    for key, a in tensors.items():
        if ".lora_A." in key:
            b = tensors[key.replace(".lora_A.", ".lora_B.")]
            name = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            result[name] = torch.linalg.svdvals(scale * b.double() @ a.double())
    return result


def sigma_of(path, **kwargs) -> dict[str, torch.Tensor]:
    analysis = rankscope.analyze(rankscope.load(path, **kwargs))
    return {r.name: torch.tensor(r.singular_values, dtype=torch.float64) for r in analysis}


def assert_same(got: dict, expected: dict) -> None:
    assert set(got) == set(expected)
    for name, sigma in expected.items():
        k = got[name].numel()
        torch.testing.assert_close(got[name], sigma[:k], rtol=0, atol=1e-10 * sigma[0].item())


@pytest.fixture
def two_revisions(tmp_path, cache) -> tuple[Path, Path]:
    """``owner/name``: an old commit (plain files) and a newer one on main (blobs and symlinks)."""
    old = llama_like(tmp_path / "old", layers=2, seed=1)
    new = llama_like(tmp_path / "new", layers=2, seed=2)
    lay_out(cache, "owner/name", COMMIT_OLD, old, blobs=False, ref=None)
    lay_out(cache, "owner/name", COMMIT_NEW, new, blobs=True)
    return old, new


def test_hub_id_reads_main_and_revisions(two_revisions):
    old, new = two_revisions
    assert_same(sigma_of("owner/name"), reference_sigma(new))
    assert_same(sigma_of("owner/name@main"), reference_sigma(new))
    assert_same(sigma_of(f"owner/name@{COMMIT_OLD}"), reference_sigma(old))
    assert not torch.allclose(reference_sigma(old)["model.layers.0.self_attn.q_proj"],
                              reference_sigma(new)["model.layers.0.self_attn.q_proj"])  # fmt: skip


def test_cli_spectrum_of_hub_id(two_revisions):
    _, new = two_revisions
    result = CliRunner().invoke(main, ["spectrum", "owner/name", "--json", "-", "-q"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    got = {layer["name"]: torch.tensor(layer["singular_values"], dtype=torch.float64) for layer in document["layers"]}
    assert_same(got, reference_sigma(new))
    assert COMMIT_NEW in document["checkpoint"]["path"]


def test_not_cached_is_one_line_naming_the_id(cache):
    result = CliRunner().invoke(main, ["spectrum", "nobody/nothing@v2"])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "nobody/nothing@v2" in lines[0], result.stderr
    assert "not in the local cache" in lines[0] and "offline" in lines[0]
    assert "Traceback" not in result.output


def test_snapshot_without_the_weights_names_the_file(tmp_path, cache):
    folder = llama_like(tmp_path / "a", layers=1)
    (folder / "adapter_model.safetensors").unlink()
    lay_out(cache, "owner/config-only", COMMIT_NEW, folder, blobs=True)
    with pytest.raises(CheckpointError, match=r"owner/config-only: .*lacks adapter_model\.safetensors"):
        rankscope.load("owner/config-only")


def test_local_path_that_looks_like_an_id_wins(tmp_path, two_revisions, monkeypatch):
    local = llama_like(tmp_path / "work" / "owner" / "name", layers=2, seed=7)
    monkeypatch.chdir(tmp_path / "work")
    assert_same(sigma_of("owner/name"), reference_sigma(local))


def test_composition_manifest_names_a_hub_id(tmp_path, two_revisions):
    _, new = two_revisions
    other = llama_like(tmp_path / "local", layers=2, seed=3)
    manifest = tmp_path / "composition.json"
    manifest.write_text(json.dumps({"components": [str(other), "owner/name"], "weights": [1.0, 0.5]}))
    got = sigma_of(manifest)
    scale = 8 / 4
    for name in got:
        delta = torch.zeros(32, 32, dtype=torch.float64)
        for folder, weight in ((other, 1.0), (new, 0.5)):
            from safetensors.torch import load_file

            tensors = load_file(str(folder / "adapter_model.safetensors"))
            a, b = (tensors[f"base_model.model.{name}.lora_{p}.weight"].double() for p in "AB")
            delta += weight * scale * b @ a
        expected = torch.linalg.svdvals(delta)
        k = got[name].numel()
        torch.testing.assert_close(got[name], expected[:k], rtol=0, atol=1e-10 * expected[0].item())


def write_sharded_base(folder: Path) -> dict[str, torch.Tensor]:
    folder.mkdir(parents=True)
    weights = {f"model.layers.{i}.self_attn.q_proj.weight": torch.randn(32, 32) for i in range(2)}
    shards = {}
    for i, (key, value) in enumerate(weights.items()):
        shard = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({key: value}, str(folder / shard))
        shards[key] = shard
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": shards}))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return weights


def test_base_by_hub_id_and_a_missing_shard(tmp_path, cache):
    weights = write_sharded_base(tmp_path / "base")
    lay_out(cache, "owner/base", COMMIT_NEW, tmp_path / "base", blobs=True)
    base = BaseWeights("owner/base")
    for key, value in weights.items():
        torch.testing.assert_close(base.get(key.removesuffix(".weight")), value, rtol=0, atol=0)
    snapshot = cache / "models--owner--base" / "snapshots" / COMMIT_NEW
    (snapshot / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"owner/base: .*lacks model-00002-of-00002\.safetensors"):
        BaseWeights("owner/base")


def test_a_full_fine_tune_by_hub_id_against_a_hub_base(tmp_path, cache):
    """A model repository (config.json and sharded weights, no adapter files) named by its id is the full fine-tune
    it holds, read against a base named by id too: ΔW = W − W₀ per matrix (σ of torch's own difference)."""
    weights = write_sharded_base(tmp_path / "base")
    lay_out(cache, "owner/base", COMMIT_NEW, tmp_path / "base", blobs=True)
    tuned = {key: value + 0.1 * torch.randn_like(value) for key, value in weights.items()}
    (tmp_path / "tuned").mkdir()
    save_file(tuned, str(tmp_path / "tuned" / "model.safetensors"))
    (tmp_path / "tuned" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    lay_out(cache, "owner/tuned", COMMIT_OLD, tmp_path / "tuned", blobs=True)
    checkpoint = rankscope.load("owner/tuned", base="owner/base")
    assert checkpoint.family == "full-delta"
    assert checkpoint.path == cache / "models--owner--tuned" / "snapshots" / COMMIT_OLD
    records = {record.name: record for record in rankscope.analyze(checkpoint)}
    assert set(records) == {key.removesuffix(".weight") for key in weights}
    for key, value in weights.items():
        expected = torch.linalg.svdvals(tuned[key].double() - value.double())
        got = torch.tensor(records[key.removesuffix(".weight")].singular_values, dtype=torch.float64)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)
    result = CliRunner().invoke(main, ["spectrum", "owner/tuned", "-q"])
    assert result.exit_code == 1 and "Traceback" not in result.output and "--base" in result.output


def test_without_huggingface_hub_a_hint(cache, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails as if it were not installed
    result = CliRunner().invoke(main, ["spectrum", "owner/name"])
    assert result.exit_code == 1
    assert result.stderr.strip().count("\n") == 0
    assert "'owner/name'" in result.stderr and "pip install 'rankscope[hub]'" in result.stderr


@pytest.mark.parametrize("name", ["nowhere", "runs/final.safetensors", "runs/../final", "/abs/olute"])
def test_a_missing_path_that_is_no_id_stays_a_missing_path(tmp_path, cache, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    assert parse_hub_id(name) is None
    with pytest.raises(CheckpointError, match="no such file or directory"):
        rankscope.load(name)


def test_what_reads_as_an_id():
    assert parse_hub_id("tloen/alpaca-lora-7b") == ("tloen/alpaca-lora-7b", None)
    assert parse_hub_id("owner/name@refs/pr/1") == ("owner/name", "refs/pr/1")
    assert parse_hub_id(f"Owner_1/name.v2@{COMMIT_NEW}") == ("Owner_1/name.v2", COMMIT_NEW)


def test_hf_home_names_the_cache_when_hf_hub_cache_does_not(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = llama_like(tmp_path / "a", layers=1, seed=5)
    lay_out(tmp_path / "home" / "hub", "owner/at-home", COMMIT_NEW, folder, blobs=False)
    assert_same(sigma_of("owner/at-home"), reference_sigma(folder))
