"""Base-aware metrics (``--base``): relative size, amplification and intruder dimensions against direct formulas
written here and against PEFT's own ``reduce_intruder_dimension``; the on-disk cache of the base's SVDs (reused,
invalidated when the base file changes, cleared by ``rankscope cache clear``); the JSON without ``--base``.

References: a float64 SVD computed in the test of PEFT's ``merge_and_unload()`` ΔW and of the saved base weight;
PEFT 0.21's ``reduce_intruder_dimension`` (which logs each layer's intruder count) on a float64 copy of the model.
"""

from __future__ import annotations

import copy
import csv
import json
import os
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import rankscope
from rankscope.analysis import against_base
from rankscope.cli import main
from rankscope.cli.app import flag
from rankscope.core.base import BaseWeights
from rankscope.core.checkpoint import Checkpoint, Layer
from rankscope.core.update import DenseUpdate

from . import peft_cases  # PEFT is a test extra (installed in CI): the references come from it
from .factories import quiet_library_warnings  # noqa: F401  (autouse: the libraries' chatter, silenced)

FLOAT32_EPS = torch.finfo(torch.float32).eps


class Model(nn.Module):
    """Three nn.Linear layers: a large update (intruders), a small one, and one narrower than top_k."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(48, 64)
        self.down = nn.Linear(64, 48)
        self.narrow = nn.Linear(48, 6)


SCALES = {"up": 10.0, "down": 0.3, "narrow": 3.0}  # B multiplied so that the layers differ in intruders


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """(peft model, base file, adapter directory, {layer: (W₀, ΔW)} in float64 from PEFT's merge)."""
    root = tmp_path_factory.mktemp("base_metrics")
    torch.manual_seed(0)
    model = Model()
    base = peft_cases.base_weights(model)
    base_file = root / "base.safetensors"
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(base_file))
    config = peft_cases.lora_config(r=4, lora_alpha=8, target_modules=list(SCALES))
    peft_model = peft_cases.get_peft_model(model, config)
    with torch.no_grad():
        for name, layer in peft_cases.lora_layers(peft_model).items():
            layer.lora_B["default"].weight.mul_(SCALES[name])
    peft_cases.save(peft_model, root / "adapter")
    refs = peft_cases.references(peft_model, base)
    pairs = {name: (base[f"{name}.weight"], ref.delta) for name, ref in refs.items()}
    return peft_model, base_file, root / "adapter", pairs


@pytest.fixture
def cache_dir(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("RANKSCOPE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "svd"


def _analyse(adapter_dir: Path, base_file: Path, **options):
    checkpoint = rankscope.load(adapter_dir, base=base_file)
    return rankscope.analyze(checkpoint, **options)


def _intruders_by_paper(w0: torch.Tensor, delta: torch.Tensor, top_k: int, epsilon: float) -> list[int]:
    """Shuttleworth et al. 2024: u_i of W₀ + ΔW (i < k) with max_j |cos(u_i, u⁰_j)| < ε."""
    u_base = torch.linalg.svd(w0, full_matrices=False).U
    u_merged = torch.linalg.svd(w0 + delta, full_matrices=False).U
    cosine = (u_merged[:, :top_k].T @ u_base).abs().max(dim=1).values
    return [i for i in range(min(top_k, cosine.numel())) if cosine[i] < epsilon]


def test_base_metrics_match_direct_formulas(adapter, cache_dir):
    _, base_file, adapter_dir, pairs = adapter
    analysis = _analyse(adapter_dir, base_file)
    assert {record.name for record in analysis} == set(pairs)
    for record in analysis:
        w0, delta = pairs[record.name]
        got = record.base
        sigma0 = torch.linalg.svdvals(w0)
        u, sigma, vh = torch.linalg.svd(delta, full_matrices=False)
        assert got["weight_frobenius"] == pytest.approx(float(torch.linalg.norm(w0)), rel=1e-12)
        assert got["weight_sigma_max"] == pytest.approx(float(sigma0[0]), rel=1e-12)
        assert got["relative_update"] == pytest.approx(float(delta.norm() / w0.norm()), rel=1e-10)
        assert got["relative_sigma_max"] == pytest.approx(float(sigma[0] / sigma0[0]), rel=1e-10)
        # LoRA §7: k = the numerical rank of ΔW (numpy's rule), capped at r = 4
        k = min(int((sigma > sigma[0] * max(delta.shape) * FLOAT32_EPS).sum()), 4)
        assert got["amplification_k"] == k
        projected = u[:, :k].T @ w0 @ vh[:k].T
        assert got["amplification"] == pytest.approx(float(delta.norm() / projected.norm()), rel=1e-9)
        expected = _intruders_by_paper(w0, delta, 10, 0.5)
        assert got["intruders"] == {
            "top_k": min(10, *delta.shape),
            "epsilon": 0.5,
            "count": len(expected),
            "indices": expected,
        }
    counts = [record.base["intruders"]["count"] for record in analysis]
    assert any(counts) and len(set(counts)) > 1  # the layers tell intruders apart: the test can fail


def test_intruder_counts_match_peft(adapter, cache_dir):
    from peft.tuners.lora.intruders import reduce_intruder_dimension

    peft_model, base_file, adapter_dir, _ = adapter
    twin = copy.deepcopy(peft_model).double()  # PEFT's SVDs in float64, as rankscope's
    messages: list[str] = []
    reduce_intruder_dimension(twin, top_k=5, threshold_epsilon=0.4, logging_sink=messages.append)
    peft_counts = {}
    for message in messages:
        found = re.match(r"^base_model\.model\.(\S+): (?:Intruders: (\d+)|No intruders)$", message)
        if found:
            peft_counts[found[1]] = int(found[2] or 0)
    assert set(peft_counts) == set(SCALES)
    analysis = _analyse(adapter_dir, base_file, intruder_k=5, intruder_epsilon=0.4)
    ours = {record.name: record.base["intruders"]["count"] for record in analysis}
    assert ours == peft_counts
    assert any(peft_counts.values())


def _entries(cache_dir: Path) -> dict[str, Path]:
    """Cache entries by the tensor they hold (from the entry's own metadata)."""
    found = {}
    for path in cache_dir.glob("*.safetensors"):
        with safe_open(str(path), "pt") as handle:
            found[json.loads(handle.metadata()["key"])["tensor"]] = path
    return found


def test_cache_is_reused_and_invalidated(adapter, cache_dir):
    _, base_file, adapter_dir, pairs = adapter
    truth = float(torch.linalg.svdvals(pairs["up"][0])[0])
    first = _analyse(adapter_dir, base_file)
    entries = _entries(cache_dir)
    assert set(entries) == {f"{name}.weight" for name in SCALES}
    # plant a value in the entry of `up`: a second run that reads the cache reports it, one that recomputes cannot
    planted = load_file(entries["up.weight"])
    planted["values"] = planted["values"] * 0 + 123.0
    with safe_open(str(entries["up.weight"]), "pt") as handle:
        metadata = handle.metadata()
    save_file(planted, str(entries["up.weight"]), metadata=metadata)
    second = _analyse(adapter_dir, base_file)
    assert first["up"].base["weight_sigma_max"] == pytest.approx(truth, rel=1e-12)
    assert second["up"].base["weight_sigma_max"] == 123.0
    assert second["down"].base == first["down"].base
    # touching the base file (a new modification time) makes the old entries unreachable: recomputed
    stat = base_file.stat()
    os.utime(base_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    third = _analyse(adapter_dir, base_file)
    assert third["up"].base["weight_sigma_max"] == pytest.approx(truth, rel=1e-12)
    assert len(list(cache_dir.glob("*.safetensors"))) == 2 * len(SCALES)
    # rewriting the base with other weights: the metrics follow the new file
    tensors = load_file(base_file)
    tensors["up.weight"] = tensors["up.weight"] * 2
    save_file(tensors, str(base_file))
    fourth = _analyse(adapter_dir, base_file)
    assert fourth["up"].base["weight_sigma_max"] == pytest.approx(2 * truth, rel=1e-12)
    save_file({**tensors, "up.weight": tensors["up.weight"] / 2}, str(base_file))


def test_cache_clear_and_info(adapter, cache_dir):
    _, base_file, adapter_dir, _ = adapter
    _analyse(adapter_dir, base_file)
    (cache_dir / "notes.txt").write_text("not rankscope's")
    runner = CliRunner()
    shown = runner.invoke(main, ["cache", "info"])
    assert shown.exit_code == 0, shown.output
    assert f"entries:   {len(SCALES)} " in shown.output and str(cache_dir) in shown.output
    cleared = runner.invoke(main, ["cache", "clear"])
    assert cleared.exit_code == 0, cleared.output
    assert f"removed {len(SCALES)} cached" in cleared.output
    assert not list(cache_dir.glob("*.safetensors")) and (cache_dir / "notes.txt").is_file()


def test_cache_limit_evicts_oldest(tmp_path):
    from rankscope.core.svd_cache import CacheKey, SVDCache

    source = tmp_path / "w.safetensors"
    source.write_bytes(b"x")
    store = SVDCache(tmp_path / "c", limit=3000)
    keys = [CacheKey.of(source, f"t{i}", torch.float32, "svd") for i in range(3)]
    for i, key in enumerate(keys):
        store.store(key, {"values": torch.full((100,), float(i), dtype=torch.float64)})  # 800 B + header
        os.utime(store._file(key), ns=(i * 10**9, i * 10**9))  # ages in writing order
    store.store(CacheKey.of(source, "t3", torch.float32, "svd"), {"values": torch.zeros(100, dtype=torch.float64)})
    assert store.load(keys[0]) is None and store.load(keys[2]) is not None
    assert store.info()["bytes"] <= 3000
    store.store(CacheKey.of(source, "big", torch.float32, "svd"), {"values": torch.zeros(1000, dtype=torch.float64)})
    assert store.load(CacheKey.of(source, "big", torch.float32, "svd")) is None  # above the limit: not cached


def test_json_without_base_unchanged_in_shape(adapter, cache_dir):
    _, base_file, adapter_dir, _ = adapter
    plain = rankscope.analyze(rankscope.load(adapter_dir)).to_dict()
    based = _analyse(adapter_dir, base_file).to_dict()
    assert set(plain) == set(based)
    for without, with_base in zip(plain["layers"], based["layers"], strict=True):
        assert "base" not in without
        assert set(with_base) - set(without) == {"base"}
        assert without["singular_values"] == with_base["singular_values"]


def test_intruders_off_and_size_rule(adapter, cache_dir, monkeypatch):
    _, base_file, adapter_dir, _ = adapter
    off = _analyse(adapter_dir, base_file, intruders=False)
    assert all(record.base["intruders"] is None for record in off)
    assert off.notes == []  # asked for: no note
    monkeypatch.setattr(against_base, "DENSE_VECTORS_CPU_LIMIT", 20)  # as if up/down were large layers
    auto = _analyse(adapter_dir, base_file, device="cpu")
    assert auto["up"].base["intruders"] is None and auto["narrow"].base["intruders"] is not None
    assert any("--intruders" in note and "2 layer(s)" in note for note in auto.notes)
    forced = _analyse(adapter_dir, base_file, device="cpu", intruders=True)
    assert forced["up"].base["intruders"]["count"] == off_counts(adapter)["up"]


def off_counts(adapter) -> dict[str, int]:
    _, _, _, pairs = adapter
    return {name: len(_intruders_by_paper(w0, delta, 10, 0.5)) for name, (w0, delta) in pairs.items()}


def test_dense_update_amplification_capped(tmp_path, cache_dir):
    """A full-rank dense update (a full fine-tune's ΔW): k = amplification_k, vectors from a dense SVD."""
    torch.manual_seed(1)
    w0 = torch.randn(30, 20, dtype=torch.float64)
    delta = torch.randn(30, 20, dtype=torch.float64) * 0.1
    base_file = tmp_path / "base.safetensors"
    save_file({"lin.weight": w0}, str(base_file))
    update = DenseUpdate(shape=(30, 20), build=lambda dtype, device: delta.to(dtype=dtype, device=device))
    layer = Layer("lin", update, (30, 20), params=600, family="full-delta")
    checkpoint = Checkpoint(tmp_path, "full-delta", "FULL", {}, [layer], base=BaseWeights(base_file))
    record = rankscope.analyze(checkpoint, amplification_k=5)["lin"]
    u, _, vh = torch.linalg.svd(delta, full_matrices=False)
    assert record.base["amplification_k"] == 5
    expected = float(delta.norm() / (u[:, :5].T @ w0 @ vh[:5].T).norm())
    assert record.base["amplification"] == pytest.approx(expected, rel=1e-9)
    assert record.base["intruders"]["indices"] == _intruders_by_paper(w0, delta, 10, 0.5)


def test_base_figures(adapter, cache_dir, tmp_path):
    from matplotlib.figure import Figure

    from rankscope.analysis.against_base import weight_spectrum
    from rankscope.figures import save_figure
    from rankscope.figures.base import base_heatmap_figure, base_spectrum_figure

    _, base_file, adapter_dir, pairs = adapter
    analysis = _analyse(adapter_dir, base_file)
    heatmap = base_heatmap_figure(analysis)
    meshes = [ax.collections[0].get_array() for ax in heatmap.axes if ax.collections]
    drawn = sorted(float(v) for v in meshes[1].compressed())  # the intruder counts, one cell per layer
    assert drawn == sorted(float(r.base["intruders"]["count"]) for r in analysis)
    sigma0 = weight_spectrum(analysis.checkpoint, "up")
    assert torch.allclose(sigma0, torch.linalg.svdvals(pairs["up"][0]), rtol=1e-12)
    outside = Figure()
    panel = outside.subplots()
    assert base_spectrum_figure(analysis["up"], sigma0.tolist(), ax=panel) is outside
    assert [len(line.get_xdata()) for line in panel.lines] == [48, 4]
    assert all(p.stat().st_size > 0 for p in save_figure(heatmap, tmp_path / "base", ("pdf",)))
    plain = rankscope.analyze(rankscope.load(adapter_dir))
    with pytest.raises(rankscope.figures.FigureInputError, match="give base") as caught:
        base_heatmap_figure(plain)
    assert "--" not in str(caught.value) and "give --base (the base model)" in caught.value.spelled(flag)


def test_cli_flags_and_csv(adapter, cache_dir, tmp_path):
    _, base_file, adapter_dir, pairs = adapter
    runner = CliRunner()
    out = tmp_path / "s.json"
    args = [
        "spectrum",
        str(adapter_dir),
        "--base",
        str(base_file),
        "--json",
        str(out),
        "--csv",
        str(tmp_path / "l.csv"),
    ]
    result = runner.invoke(main, [*args, "--intruder-k", "3", "--intruder-epsilon", "0.3"])
    assert result.exit_code == 0, result.output
    layers = {layer["name"]: layer for layer in json.loads(out.read_text())["layers"]}
    for name, (w0, delta) in pairs.items():
        expected = _intruders_by_paper(w0, delta, 3, 0.3)
        assert layers[name]["base"]["intruders"]["indices"] == expected
    rows = {row["name"]: row for row in csv.DictReader((tmp_path / "l.csv").read_text().splitlines())}
    for name, layer in layers.items():
        assert int(rows[name]["intruders"]) == layer["base"]["intruders"]["count"]
        assert float(rows[name]["relative_update"]) == layer["base"]["relative_update"]
    result = runner.invoke(main, [*args, "--no-intruders"])
    assert result.exit_code == 0, result.output
    assert all(layer["base"]["intruders"] is None for layer in json.loads(out.read_text())["layers"])
    plain = runner.invoke(main, ["spectrum", str(adapter_dir), "--csv", str(tmp_path / "p.csv")])
    assert plain.exit_code == 0 and "relative_update" not in (tmp_path / "p.csv").read_text()
    bad = runner.invoke(main, [*args, "--intruder-epsilon", "0"])
    assert bad.exit_code == 2


def test_a_base_without_a_layer_and_one_of_another_shape_are_told_apart(adapter, cache_dir, tmp_path):
    """A base that lacks a layer's weight says so by name; one whose weight has another shape gives both shapes;
    the other layers are measured."""
    from safetensors.torch import load_file, save_file

    _, base_file, adapter_dir, _ = adapter
    weights = load_file(str(base_file))
    weights.pop("down.weight")
    weights["narrow.weight"] = torch.randn(5, 48)
    save_file(weights, str(tmp_path / "partial.safetensors"))
    analysis = _analyse(adapter_dir, tmp_path / "partial.safetensors")
    by_name = {record.name: record for record in analysis}
    assert by_name["up"].base is not None and by_name["down"].base is None and by_name["narrow"].base is None
    assert any(w.startswith("--base holds no weight of the name of 1 layer(s): down (") for w in analysis.warnings)
    assert any(
        "no weight of the update's shape for 1 layer(s): narrow (base [5, 48], update [6, 48])" in w
        for w in analysis.warnings
    )
