"""Weighted compositions — manifests, ``--compose``, BoostLoRA single files — against references formed here.

Every number is checked against something computed in this file from the stored factors in float64: the dense
sum Σ w_i·s_i·B_i·A_i, its singular values, Frobenius norms, inner products, and singular subspaces from dense
SVDs; or against PEFT's own ``add_weighted_adapter(..., combination_type="cat")``, whose ΔW' is Σ w_i·ΔW_i.
Constructed cases (orthogonal, identical, collapsed, random, k = 1, zero) have answers known in closed form.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import rankscope
from rankscope.cli import main

from .factories import PREFIX, lora_config, write_lora

OUT, IN = 20, 16
MODULES = (
    "model.layers.0.self_attn.q_proj",
    "model.layers.0.self_attn.v_proj",
    "model.layers.1.self_attn.q_proj",
    "model.layers.1.self_attn.v_proj",
)
LABELS = ("round0", "round1", "round2")
RANKS_ALPHAS = ((2, 4.0), (3, 3.0), (4, 16.0))  # scales α/r = 2, 1, 4
EPS32 = 2.0**-23  # float32 machine epsilon (numerical rank rule)
SCHEMA = "rankscope.composition/1"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices only: on shared, busy cores torch's thread pool turns each small op into a wait (this module
    ran 50 s with 2 threads, 6 s with 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- writing adapters and manifests ---------------------------------------------------------------------------
def gaussian(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def write_adapter(directory: Path, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], alpha: float) -> dict:
    """A PEFT LoRA directory of ``{module: (A, B)}`` (one rank); returns each layer's ΔW = (α/r)·B·A, float64."""
    rank = next(iter(factors.values()))[0].shape[0]
    write_lora(directory, factors, lora_config(r=rank, lora_alpha=alpha, target_modules=["q_proj", "v_proj"]))
    return {module: alpha / rank * b.double() @ a.double() for module, (a, b) in factors.items()}


def random_adapter(directory: Path, rank: int, alpha: float, seed: int, *, modules=MODULES, shape=(OUT, IN)) -> dict:
    out, inp = shape
    factors = {
        module: (gaussian((rank, inp), 1000 * seed + 2 * j), gaussian((out, rank), 1000 * seed + 2 * j + 1))
        for j, module in enumerate(modules)
    }
    return write_adapter(directory, factors, alpha)


def three_rounds(directory: Path, **kwargs) -> dict[str, dict]:
    """round0..round2 under ``directory``: ranks 2, 3, 4 and scales 2, 1, 4; {label: {layer: ΔW}}."""
    return {
        label: random_adapter(directory / label, rank, alpha, seed=i + 1, **kwargs)
        for i, (label, (rank, alpha)) in enumerate(zip(LABELS, RANKS_ALPHAS, strict=True))
    }


def write_manifest(path: Path, components, weights, **fields) -> Path:
    """A manifest at ``path``: a directory (``composition.json`` inside) or the ``.json`` file itself."""
    file = path if path.suffix == ".json" else path / "composition.json"
    file.parent.mkdir(parents=True, exist_ok=True)
    body = {"format": SCHEMA, "mode": "sum", "components": list(components), "weights": weights, "normalize": "none"}
    file.write_text(json.dumps({**body, **fields}))
    return path


def orthonormal(rows: int, cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(rows, cols, generator=g, dtype=torch.float64)).Q


# -- references computed here ---------------------------------------------------------------------------------
def svdvals(matrix: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(matrix.double())


def erank_reference(sigma: torch.Tensor) -> float:
    """Roy & Vetterli: exp(−Σ p_i ln p_i), p_i = σ_i/Σσ over the positive σ (0 for a zero spectrum)."""
    positive = sigma[sigma > 0].double()
    if positive.numel() == 0:
        return 0.0
    p = positive / positive.sum()
    return math.exp(float(-(p * p.log()).sum()))


def numerical_rank_reference(sigma: torch.Tensor, shape) -> int:
    """#{σ_i > σ₁·max(m, n)·eps(float32)}."""
    return int((sigma > sigma.max() * max(shape) * EPS32).sum()) if sigma.numel() and sigma.max() > 0 else 0


def frob2(matrix: torch.Tensor) -> float:
    return float((matrix.double() ** 2).sum())


def weighted(parts, weights) -> torch.Tensor:
    return sum(float(w) * p for w, p in zip(weights, parts, strict=True))


def assert_spectrum(record, dense: torch.Tensor, bound: int | None = None) -> None:
    """rankscope's singular values against svdvals of the dense ΔW: ≤ 1e-6 relative where σ ≥ 1e-6·σ₁, the rest
    within 1e-6·σ₁; ``rank_bound`` of them, and the dense spectrum is ≈ 0 beyond the bound."""
    expected = svdvals(dense)
    actual = torch.tensor(record.singular_values, dtype=torch.float64)
    if bound is not None:
        assert record.rank_bound == bound
    bound = record.rank_bound
    assert actual.numel() == bound
    top = float(expected[0])
    assert top > 0
    if expected.numel() > bound:  # the bound is real: nothing of the dense spectrum lies beyond it
        assert float(expected[bound:].max()) <= 1e-9 * top
    head = expected[:bound]
    big = head >= 1e-6 * top
    assert float(((actual[big] - head[big]).abs() / head[big]).max()) <= 1e-6
    if (~big).any():
        assert float((actual[~big] - head[~big]).abs().max()) <= 1e-6 * top


def left_right_bases(matrix: torch.Tensor):
    """Dense SVD bases of the numerical range: U (m×k), V (n×k), k = numerical rank."""
    u, sigma, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    k = numerical_rank_reference(sigma, matrix.shape)
    return u[:, :k], vh.mT[:, :k]


def assert_composition_fields(record, parts, weights, *, collapse_threshold: float = 0.9) -> None:
    """Energy shares, interference, collapse, rank gain and expansion, cosine and overlaps of ``record`` against
    the dense components ``parts`` (each ΔW_i, without its weight) and the applied ``weights``."""
    fields = record.composition
    k = len(parts)
    composite = weighted(parts, weights)
    energies = [w**2 * frob2(p) for w, p in zip(weights, parts, strict=True)]
    total = sum(energies)
    shares = fields["energy_shares"]["values"]
    assert shares == pytest.approx([e / total for e in energies], rel=1e-9, abs=1e-12)
    assert fields["interference"] == pytest.approx((frob2(composite) - total) / total, rel=1e-7, abs=1e-9)
    assert fields["collapsed"] is (k > 1 and max(e / total for e in energies) > collapse_threshold)
    sigmas = [svdvals(p) for p in parts]
    composite_sigma = svdvals(composite)
    gain = erank_reference(composite_sigma) / max(erank_reference(s) for s in sigmas)
    assert fields["rank_gain"] == pytest.approx(gain, rel=1e-7)
    expansion = fields["rank_expansion"]
    assert expansion["numerical_rank"] == numerical_rank_reference(composite_sigma, composite.shape)
    component_ranks = [numerical_rank_reference(s, composite.shape) for s in sigmas]
    assert expansion["component_numerical_rank_sum"] == sum(component_ranks)
    assert expansion["erank"] == pytest.approx(erank_reference(composite_sigma), rel=1e-7)
    assert expansion["component_erank_sum"] == pytest.approx(sum(erank_reference(s) for s in sigmas), rel=1e-7)
    assert expansion["rank_bound"] == record.rank_bound
    assert expansion["component_rank_bound_sum"] == sum(c.rank_bound for c in record.components)
    alignment = record.alignment
    bases = [left_right_bases(p) for p in parts]
    for i in range(k):
        for j in range(k):
            cosine = float((parts[i] * parts[j]).sum()) / math.sqrt(frob2(parts[i]) * frob2(parts[j]))
            assert alignment["cosine"][i][j] == pytest.approx(cosine, abs=1e-9)
            for side, index, dim in (("left", 0, composite.shape[0]), ("right", 1, composite.shape[1])):
                a, b = bases[i][index], bases[j][index]
                kk = min(a.shape[1], b.shape[1])
                cross = a[:, :kk].mT @ b[:, :kk]
                assert alignment[f"{side}_overlap"][i][j] == pytest.approx(float((cross**2).sum()) / kk, abs=1e-9)
                assert alignment[f"{side}_baseline"][i][j] == pytest.approx(kk / dim)
                if i != j:
                    angles = torch.rad2deg(torch.arccos(torch.linalg.svdvals(cross).clamp(-1, 1)))
                    assert alignment[f"{side}_min_angle"][i][j] == pytest.approx(float(angles.min()), abs=1e-5)
                    assert alignment[f"{side}_mean_angle"][i][j] == pytest.approx(float(angles.mean()), abs=1e-5)


def analyse(path, **load) -> dict:
    return {record.name: record for record in rankscope.analyze(rankscope.load(path, **load))}


# -- CLI helpers ----------------------------------------------------------------------------------------------
def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def strict_json(text: str) -> dict:
    def refuse(constant: str):
        raise AssertionError(f"non-finite {constant} in the JSON")

    return json.loads(text, parse_constant=refuse)


def error_line(result, code: int = 1) -> str:
    """Exit ``code`` (1: the input; 2: usage) and exactly one line on stderr, an error, without a traceback."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == code, result.output
    assert len(lines) == 1, lines
    assert lines[0].startswith("rankscope: error: "), lines[0]
    assert "Traceback" not in result.output
    return lines[0]


# == manifests ================================================================================================
def test_manifest_directory_matches_the_dense_weighted_sum(tmp_path):
    deltas = three_rounds(tmp_path / "m")
    weights = [0.6, 0.3, 0.1]
    write_manifest(tmp_path / "m", LABELS, weights)
    checkpoint = rankscope.load(tmp_path / "m")
    assert (checkpoint.family, checkpoint.adapter_type) == ("composition", "COMPOSITION")
    assert checkpoint.warnings == []
    records = {r.name: r for r in rankscope.analyze(checkpoint)}
    assert list(records) == list(MODULES)
    for name, record in records.items():
        parts = [deltas[label][name] for label in LABELS]
        assert record.valid and record.family == "composition" and record.exact
        assert_spectrum(record, weighted(parts, weights), bound=2 + 3 + 4)
        assert [c.name for c in record.components] == list(LABELS)
        for component, part, (rank, alpha) in zip(record.components, parts, RANKS_ALPHAS, strict=True):
            assert_spectrum(component, part, bound=rank)
            assert component.scale == pytest.approx(alpha / rank)
            assert component.params == rank * (OUT + IN)
        assert record.params == (2 + 3 + 4) * (OUT + IN)
        assert record.composition["weights"]["raw"] == weights
        assert record.composition["weights"]["normalized"] == pytest.approx(weights)
        assert record.composition["weights"]["signs"] == [1, 1, 1]
        assert "growth" not in record.composition
        assert_composition_fields(record, parts, weights)


def test_manifest_file_itself_as_path(tmp_path):
    deltas = three_rounds(tmp_path)
    weights = [0.25, -1.5, 0.75]
    manifest = write_manifest(tmp_path / "blend.json", LABELS, weights)
    records = analyse(manifest)
    for name, record in records.items():
        assert_spectrum(record, weighted([deltas[label][name] for label in LABELS], weights), bound=9)
    result = cli("spectrum", manifest, "--json", "-", "-q")
    assert result.exit_code == 0, result.output
    document = strict_json(result.stdout)
    assert document["checkpoint"]["family"] == "composition"
    assert document["checkpoint"]["config"]["weights"] == weights


@pytest.mark.parametrize("shape", [(6, 16), (20, 7)])
def test_rank_bound_is_the_rank_sum_capped_by_the_shape(tmp_path, shape):
    deltas = three_rounds(tmp_path, shape=shape)
    weights = [1.0, 0.5, 0.25]
    records = analyse(write_manifest(tmp_path / "m", [f"../{label}" for label in LABELS], weights))
    for name, record in records.items():
        composite = weighted([deltas[label][name] for label in LABELS], weights)
        assert_spectrum(record, composite, bound=min(shape))
        assert record.metrics["numerical_rank"] == min(shape)
        assert record.composition["rank_expansion"]["component_rank_bound_sum"] == sum(
            min(r, *shape) for r, _ in RANKS_ALPHAS
        )


def test_per_layer_weights_first_matching_pattern_wins_with_suffix_match(tmp_path):
    deltas = three_rounds(tmp_path / "m")
    per_layer = {
        "proj": [9.0, 9.0, 9.0],  # a suffix match needs a whole name segment: 'proj' is not 'q_proj'
        "q_proj": [1.0, 0.0, 0.0],
        r"layers\.1\..*": [0.2, 0.2, 0.6],  # also matches layers.1.…q_proj, but q_proj came first
    }
    write_manifest(tmp_path / "m", LABELS, {"default": [0.6, 0.3, 0.1], "per_layer": per_layer})
    expected = {
        "model.layers.0.self_attn.q_proj": [1.0, 0.0, 0.0],
        "model.layers.0.self_attn.v_proj": [0.6, 0.3, 0.1],
        "model.layers.1.self_attn.q_proj": [1.0, 0.0, 0.0],
        "model.layers.1.self_attn.v_proj": [0.2, 0.2, 0.6],
    }
    records = analyse(tmp_path / "m")
    for name, weights in expected.items():
        record = records[name]
        parts = [deltas[label][name] for label in LABELS]
        assert record.composition["weights"]["raw"] == weights
        assert_spectrum(record, weighted(parts, weights))
        assert_composition_fields(record, parts, weights)
    # one component carries all the energy where the others weigh 0
    assert records["model.layers.0.self_attn.q_proj"].composition["energy_shares"]["values"] == [1.0, 0.0, 0.0]
    assert records["model.layers.0.self_attn.q_proj"].composition["collapsed"] is True


def test_softmax_normalisation_treats_weights_as_logits(tmp_path):
    deltas = three_rounds(tmp_path / "m")
    logits = [1.0, 0.0, -1.0]
    write_manifest(tmp_path / "m", LABELS, logits, normalize="softmax")
    applied = [math.exp(x) / sum(math.exp(y) for y in logits) for x in logits]
    for name, record in analyse(tmp_path / "m").items():
        parts = [deltas[label][name] for label in LABELS]
        assert record.composition["weights"]["raw"] == logits
        assert record.composition["weights"]["normalized"] == pytest.approx(applied, rel=1e-12)
        assert record.composition["weights"]["normalize"] == "softmax"
        assert record.composition["weights"]["signs"] == [1, 1, 1]
        assert_spectrum(record, weighted(parts, applied))
        assert_composition_fields(record, parts, applied)


def test_negative_weights_keep_their_sign_and_concentration_uses_magnitudes(tmp_path):
    deltas = three_rounds(tmp_path / "m")
    weights = [0.5, -0.3, 0.2]
    write_manifest(tmp_path / "m", LABELS, weights)
    p = [0.5, 0.3, 0.2]  # |w| / Σ|w|
    entropy = -sum(x * math.log(x) for x in p)
    for name, record in analyse(tmp_path / "m").items():
        parts = [deltas[label][name] for label in LABELS]
        fields = record.composition["weights"]
        assert fields["signs"] == [1, -1, 1]
        assert fields["concentration"]["effective_number"] == pytest.approx(1 / sum(x * x for x in p))
        assert fields["concentration"]["normalized_entropy"] == pytest.approx(entropy / math.log(3))
        assert fields["concentration"]["max_share"] == pytest.approx(0.5)
        # the sign matters to the spectrum: Σ w_iΔW_i with −0.3, not +0.3
        assert_spectrum(record, weighted(parts, weights))
        assert_composition_fields(record, parts, weights)


def test_nested_manifest_flattens_and_multiplies_weights(tmp_path):
    deltas = three_rounds(tmp_path)
    write_manifest(tmp_path / "inner", ["../round0", "../round1"], [0.0, 1.0], normalize="softmax")
    outer = write_manifest(tmp_path / "outer.json", ["inner", "round2"], [0.5, 2.0])
    inner_applied = [1 / (1 + math.e), math.e / (1 + math.e)]
    flat = [0.5 * inner_applied[0], 0.5 * inner_applied[1], 2.0]
    for name, record in analyse(outer).items():
        parts = [deltas[label][name] for label in LABELS]
        assert [c.name for c in record.components] == ["inner/round0", "inner/round1", "round2"]
        assert record.composition["weights"]["normalized"] == pytest.approx(flat, rel=1e-12)
        assert_spectrum(record, weighted(parts, flat), bound=9)
        assert_composition_fields(record, parts, flat)


def test_layers_adapted_by_only_some_components_compose_those_present(tmp_path):
    q_only = [m for m in MODULES if m.endswith("q_proj")]
    first = random_adapter(tmp_path / "a", 2, 4.0, seed=1)
    second = random_adapter(tmp_path / "b", 3, 3.0, seed=2, modules=q_only)
    checkpoint = rankscope.load(write_manifest(tmp_path / "m", ["../a", "../b"], [0.0, 1.0], normalize="softmax"))
    assert any("only some components" in w for w in checkpoint.warnings)
    applied = [1 / (1 + math.e), math.e / (1 + math.e)]  # normalised over both components, also where one is absent
    for record in rankscope.analyze(checkpoint):
        if record.name in q_only:
            assert_spectrum(record, weighted([first[record.name], second[record.name]], applied), bound=5)
        else:
            assert [c.name for c in record.components] == ["a"]
            assert_spectrum(record, applied[0] * first[record.name], bound=2)


def test_labels_name_the_components(tmp_path):
    deltas = three_rounds(tmp_path)
    manifest = write_manifest(tmp_path / "m.json", LABELS, [1.0, 2.0, 3.0], labels=["warmup", "main", "polish"])
    for name, record in analyse(manifest).items():
        assert [c.name for c in record.components] == ["warmup", "main", "polish"]
        assert_spectrum(record, weighted([deltas[label][name] for label in LABELS], [1.0, 2.0, 3.0]))


def test_components_with_the_same_folder_name_from_different_runs(tmp_path):
    """run1/final and run2/final, no labels given: the default labels (folder names) collide, and the manifest
    must still load with distinct component names — not fail with "labels must be … distinct" about labels the
    user never wrote."""
    first = random_adapter(tmp_path / "run1" / "final", 2, 4.0, seed=1)
    second = random_adapter(tmp_path / "run2" / "final", 3, 3.0, seed=2)
    manifest = write_manifest(tmp_path / "m.json", ["run1/final", "run2/final"], [0.5, 0.5])
    for name, record in analyse(manifest).items():
        names = [c.name for c in record.components]
        assert len(set(names)) == 2 and "run1" in names[0] and "run2" in names[1], names
        assert_spectrum(record, weighted([first[name], second[name]], [0.5, 0.5]), bound=5)


def test_unknown_field_is_a_warning(tmp_path):
    three_rounds(tmp_path / "m")
    write_manifest(tmp_path / "m", LABELS, [0.6, 0.3, 0.1], trained_on="wikitext")
    assert any("'trained_on'" in w for w in rankscope.load(tmp_path / "m").warnings)
    result = cli("spectrum", tmp_path / "m", "-q")
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "trained_on" in warnings[0] and str(tmp_path / "m") in warnings[0]


def _cycle_self(root: Path) -> Path:
    return write_manifest(root / "m", [".", "round0"], [1.0, 1.0])


def _cycle_self_file(root: Path) -> Path:
    return write_manifest(root / "m" / "blend.json", ["blend.json"], [1.0])


def _cycle_two(root: Path) -> Path:
    write_manifest(root / "b", ["../a"], [1.0])
    return write_manifest(root / "a", ["../b", "../m/round0"], [1.0, 1.0])


def _cycle_symlinked_directory(root: Path) -> Path:
    os.symlink(".", root / "m" / "again")  # m/again/composition.json is m/composition.json
    return write_manifest(root / "m", ["round0", "again"], [1.0, 1.0])


def _missing(root: Path) -> Path:
    return write_manifest(root / "m", ["round0", "round7"], [1.0, 1.0])


def _count(root: Path) -> Path:
    return write_manifest(root / "m", LABELS, [0.5, 0.5])


def _per_layer_count(root: Path) -> Path:
    return write_manifest(root / "m", LABELS, {"default": [1.0, 1.0, 1.0], "per_layer": {"v_proj": [1.0, 2.0]}})


def _no_default(root: Path) -> Path:
    return write_manifest(root / "m", LABELS, {"per_layer": {"q_proj": [1.0, 2.0, 3.0]}})


def _bad_normalize(root: Path) -> Path:
    return write_manifest(root / "m", LABELS, [1.0, 1.0, 1.0], normalize="l1")


@pytest.mark.parametrize(
    "build, fragments",
    [
        (_cycle_self, ["composition.json", "cycle"]),
        (_cycle_self_file, ["blend.json", "cycle"]),
        (_cycle_two, ["composition.json", "cycle"]),
        (_cycle_symlinked_directory, ["composition.json", "cycle"]),
        (_missing, ["composition.json", "round7"]),
        (_count, ["composition.json", "2 weights for 3 components"]),
        (_per_layer_count, ["composition.json", "2 weights for 3 components", "v_proj"]),
        (_no_default, ["composition.json", "no weights for layer", "v_proj"]),
        (_bad_normalize, ["composition.json", "normalize", "'l1'"]),
    ],
    ids=lambda value: value.__name__.strip("_") if callable(value) else "",
)
def test_bad_manifests_give_one_line_errors(tmp_path, build, fragments):
    three_rounds(tmp_path / "m")
    path = build(tmp_path)
    line = error_line(cli("spectrum", path, "-q"))
    for fragment in fragments:
        assert fragment in line, line
    with pytest.raises(rankscope.CheckpointError):
        rankscope.load(path)


def test_symlink_loop_component_is_named_as_such(tmp_path):
    """A component that is a symlink loop: one line that says the path cannot be resolved (a loop), not that it
    does not exist — the path is there, it just points at itself."""
    three_rounds(tmp_path / "m")
    os.symlink("self", tmp_path / "m" / "self")  # self → self
    write_manifest(tmp_path / "m", ["round0", "self"], [1.0, 1.0])
    line = error_line(cli("spectrum", tmp_path / "m", "-q"))
    assert "self" in line and "composition.json" in line
    message = line.replace(str(tmp_path), "")
    assert any(word in message.lower() for word in ("symlink", "symbolic link", "resolve", "loop")), message


# == BoostLoRA single files ==================================================================================
def write_boostlora(directory: Path, ranks, raw_weights, config: dict | None, *, seed: int = 7) -> dict:
    """The layout of rankscope/formats/boostlora.py's docstring; returns {module: [(A, B) per component]}."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors, factors = {}, {}
    for j, module in enumerate(MODULES):
        factors[module] = []
        for i, rank in enumerate(ranks):
            a = gaussian((rank, IN), seed * 1000 + 10 * j + 2 * i)
            b = gaussian((OUT, rank), seed * 1000 + 10 * j + 2 * i + 1)
            tensors[f"{PREFIX}{module}.lora_A.{i}.weight"] = a
            tensors[f"{PREFIX}{module}.lora_B.{i}.weight"] = b
            factors[module].append((a, b))
        tensors[f"{PREFIX}{module}.boost_weights"] = torch.tensor(raw_weights[j], dtype=torch.float32)
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    if config is not None:
        (directory / "adapter_config.json").write_text(json.dumps(config))
    return factors


def softmax(values) -> list[float]:
    exps = [math.exp(v) for v in values]
    return [e / sum(exps) for e in exps]


def test_boostlora_lists_of_r_and_alpha_with_softmax(tmp_path):
    ranks, alphas = [2, 3, 4], [4.0, 3.0, 2.0]
    raw = [[0.5, -0.25, 1.0], [0.0, 0.0, 0.0], [2.0, 1.0, -3.0], [-0.5, 0.75, 0.125]]  # exact in float32
    config = {"peft_type": "BOOSTLORA", "r": ranks, "lora_alpha": alphas, "use_rslora": False,
              "num_components": 3, "weight_normalization": "softmax", "mode": "sum"}  # fmt: skip
    factors = write_boostlora(tmp_path / "b", ranks, raw, config)
    checkpoint = rankscope.load(tmp_path / "b")
    assert (checkpoint.family, checkpoint.adapter_type) == ("composition", "BOOSTLORA")
    assert checkpoint.skipped == []
    records = {r.name: r for r in rankscope.analyze(checkpoint)}
    assert list(records) == list(MODULES)
    for j, module in enumerate(MODULES):
        record = records[module]
        scales = [alpha / rank for rank, alpha in zip(ranks, alphas, strict=True)]
        parts = [s * b.double() @ a.double() for (a, b), s in zip(factors[module], scales, strict=True)]
        applied = softmax(raw[j])
        assert record.composition["weights"]["raw"] == pytest.approx(raw[j])
        assert record.composition["weights"]["normalized"] == pytest.approx(applied, rel=1e-12)
        assert record.params == sum(r * (OUT + IN) for r in ranks) + 3
        assert [c.scale for c in record.components] == pytest.approx([2.0, 1.0, 0.5])
        assert_spectrum(record, weighted(parts, applied), bound=9)
        assert_composition_fields(record, parts, applied)
    weights = records[MODULES[1]].composition["weights"]["concentration"]  # equal logits: uniform weights
    assert weights["normalized_entropy"] == pytest.approx(1.0) and weights["effective_number"] == pytest.approx(3.0)


def test_boostlora_scalar_r_and_alpha_rslora_sequential(tmp_path):
    raw = [[0.6, 0.3, 0.1]] * len(MODULES)
    config = {"peft_type": "BOOSTLORA", "r": 4, "lora_alpha": 8, "use_rslora": True, "num_components": 3,
              "weight_normalization": "none", "mode": "sequential"}  # fmt: skip
    factors = write_boostlora(tmp_path / "b", [4, 4, 4], raw, config)
    scale = 8 / math.sqrt(4)
    applied = [float(torch.tensor(w, dtype=torch.float32)) for w in raw[0]]  # stored in float32
    for module, record in analyse(tmp_path / "b").items():
        parts = [scale * b.double() @ a.double() for a, b in factors[module]]
        assert [c.scale for c in record.components] == pytest.approx([scale] * 3)
        assert_spectrum(record, weighted(parts, applied), bound=12)
        growth = record.composition["growth"]
        assert [g["components"] for g in growth] == [1, 2, 3]
        for t, entry in enumerate(growth, start=1):
            sigma = svdvals(weighted(parts[:t], applied[:t]))
            assert entry["rank_bound"] == 4 * t
            assert entry["metrics"]["erank"] == pytest.approx(erank_reference(sigma), rel=1e-7)


def test_boostlora_detected_by_boost_weights_without_config(tmp_path):
    raw = [[1.0, 2.0]] * len(MODULES)
    factors = write_boostlora(tmp_path / "bare", [3, 2], raw, None)
    checkpoint = rankscope.load(tmp_path / "bare" / "adapter_model.safetensors")
    assert (checkpoint.family, checkpoint.adapter_type) == ("composition", "BOOSTLORA")
    assert any("lora_alpha" in w for w in checkpoint.warnings)  # α unknown: scale 1 assumed, and said
    for module, record in {r.name: r for r in rankscope.analyze(checkpoint)}.items():
        parts = [b.double() @ a.double() for a, b in factors[module]]
        assert [c.scale for c in record.components] == [1.0, 1.0]
        assert_spectrum(record, weighted(parts, [1.0, 2.0]), bound=5)


def test_boostlora_bad_input(tmp_path):
    config = {"peft_type": "BOOSTLORA", "r": 4, "lora_alpha": [8, 8], "num_components": 3}
    write_boostlora(tmp_path / "alphas", [4, 4, 4], [[1.0, 1.0, 1.0]] * len(MODULES), config)
    line = error_line(cli("spectrum", tmp_path / "alphas", "-q"))
    assert "adapter_config.json" in line and "lora_alpha lists 2 values for 3 components" in line

    config = {"peft_type": "BOOSTLORA", "r": 4, "lora_alpha": 8, "num_components": 3}
    write_boostlora(tmp_path / "broken", [4, 4, 4], [[1.0, 1.0, 1.0]] * len(MODULES), config)
    file = tmp_path / "broken" / "adapter_model.safetensors"
    tensors = load_file(str(file))
    del tensors[f"{PREFIX}{MODULES[1]}.lora_B.2.weight"]
    tensors[f"{PREFIX}{MODULES[2]}.lora_A.1.weight"] = torch.full((4, IN), float("nan"))
    save_file(tensors, str(file))
    result = cli("spectrum", tmp_path / "broken", "-q")
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if "invalid" in line]
    assert len(warnings) == 2 and all(str(file) in line for line in warnings)
    assert f"{MODULES[1]}" in warnings[0] and "lora_B.2.weight" in warnings[0]
    assert f"{MODULES[2]}.lora_A.1.weight" in warnings[1] and "NaN" in warnings[1]
    records = analyse(tmp_path / "broken")
    assert [records[m].valid for m in MODULES] == [True, False, False, True]


# == PEFT: a multi-adapter folder, --compose, and add_weighted_adapter(cat) ====================================
ADAPTERS = {"default": (2, 4), "second": (3, 5), "third": (4, 16)}
PEFT_WEIGHTS = [0.5, 0.3, 0.2]


@pytest.fixture(scope="module")
def peft_folder(tmp_path_factory):
    """PEFT's add_adapter + save_pretrained: d/ (default), d/second/, d/third/, d/cat_adapter/ (the cat
    combination with PEFT_WEIGHTS). Returns d and PEFT's own get_delta_weight per adapter and layer, float64."""
    from peft import LoraConfig, get_peft_model
    from torch import nn

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q_proj = nn.Linear(16, 20)
            self.v_proj = nn.Linear(16, 8)  # Σ r_i = 9 > 8: the composite's bound is capped by the shape

    torch.manual_seed(0)
    base = nn.Module()
    base.layers = nn.ModuleList([Block(), Block()])
    configs = {
        name: LoraConfig(r=r, lora_alpha=alpha, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        for name, (r, alpha) in ADAPTERS.items()
    }
    model = get_peft_model(base, configs["default"])
    for name in ("second", "third"):
        model.add_adapter(name, configs[name])
    model.add_weighted_adapter(list(ADAPTERS), PEFT_WEIGHTS, "cat_adapter", combination_type="cat")
    directory = tmp_path_factory.mktemp("peft") / "d"
    model.save_pretrained(str(directory))
    model.double()  # float32 → float64 is exact: PEFT's ΔW below carries no rounding
    deltas: dict[str, dict[str, torch.Tensor]] = {name: {} for name in [*ADAPTERS, "cat_adapter"]}
    for path, module in model.base_model.model.named_modules():
        if hasattr(module, "get_delta_weight") and hasattr(module, "lora_A"):
            for name in deltas:
                deltas[name][path] = module.get_delta_weight(name).detach().clone()
    return directory, deltas


def test_compose_adapters_of_a_peft_multi_adapter_folder(peft_folder):
    directory, deltas = peft_folder
    assert (directory / "second" / "adapter_config.json").is_file()
    records = analyse(directory, compose=list(ADAPTERS), weights=PEFT_WEIGHTS)
    assert sorted(records) == sorted(deltas["default"])
    for name, record in records.items():
        parts = [deltas[adapter][name] for adapter in ADAPTERS]
        assert [c.name for c in record.components] == list(ADAPTERS)
        assert_spectrum(record, weighted(parts, PEFT_WEIGHTS), bound=min(9, *parts[0].shape))
        assert_composition_fields(record, parts, PEFT_WEIGHTS)

    logits = [2.0, -1.0, 0.5]
    applied = softmax(logits)
    for name, record in analyse(directory, compose=["third", "default", "second"], weights=logits,
                                normalize="softmax").items():  # fmt: skip
        parts = [deltas[adapter][name] for adapter in ("third", "default", "second")]
        assert record.composition["weights"]["normalized"] == pytest.approx(applied, rel=1e-12)
        assert_spectrum(record, weighted(parts, applied))

    result = cli("spectrum", directory, "--compose", "default,second,third", "--weights", "0.5,0.3,0.2",
                 "--mode", "sequential", "--json", "-", "-q")  # fmt: skip
    assert result.exit_code == 0, result.output
    document = strict_json(result.stdout)
    assert document["checkpoint"]["config"]["components"] == list(ADAPTERS)
    for layer in document["layers"]:
        parts = [deltas[adapter][layer["name"]] for adapter in ADAPTERS]
        expected = svdvals(weighted(parts, PEFT_WEIGHTS))[: layer["rank_bound"]]
        assert layer["singular_values"] == pytest.approx(expected.tolist(), rel=1e-6, abs=1e-9 * float(expected[0]))
        assert len(layer["growth"]) == 3 and layer["weights"]["raw"] == PEFT_WEIGHTS


def test_compose_weight_count_mismatch_is_one_line(peft_folder):
    directory, _ = peft_folder
    line = error_line(cli("spectrum", directory, "--compose", "default,second,third", "--weights", "0.5,0.5", "-q"), 2)
    assert "2 numbers for 3 adapters" in line


def test_peft_cat_adapter_equals_the_manifest_of_its_inputs(peft_folder, tmp_path):
    directory, deltas = peft_folder
    cat_config = json.loads((directory / "cat_adapter" / "adapter_config.json").read_text())
    assert cat_config["r"] == cat_config["lora_alpha"] == 9  # PEFT writes scaling 1 for the cat adapter
    cat = analyse(directory / "cat_adapter")
    manifest = write_manifest(tmp_path / "mix.json", [str(directory), f"{directory}/second", f"{directory}/third"],
                              PEFT_WEIGHTS)  # fmt: skip
    composed = analyse(manifest)
    assert sorted(cat) == sorted(composed)
    for name, record in cat.items():
        assert record.family == "lora" and record.scale == 1.0
        # PEFT's cat adapter is Σ w_i·ΔW_i (up to the float32 rounding of the w_i·s_i·A_i it stores) ...
        reference = weighted([deltas[adapter][name] for adapter in ADAPTERS], PEFT_WEIGHTS)
        top = float(svdvals(reference)[0])
        assert float((deltas["cat_adapter"][name] - reference).abs().max()) <= 1e-6 * top
        assert_spectrum(record, deltas["cat_adapter"][name])
        # ... so the manifest of its inputs with the same weights has the same spectrum
        other = composed[name]
        assert other.rank_bound == record.rank_bound == min(9, *reference.shape)
        difference = torch.tensor(other.singular_values) - torch.tensor(record.singular_values)
        assert float(difference.abs().max()) <= 1e-6 * top


# == constructed cases with known answers =====================================================================
def flat_components(root: Path, k: int, r: int, *, shape=(24, 20), scale: float = 1.0, seed: int = 3) -> dict:
    """k components ΔW_i = U_i·V_iᵀ·scale on mutually orthogonal blocks of two random orthonormal bases: equal flat
    spectra (r values = scale), orthogonal on both sides. Returns {label: {module: ΔW}}."""
    out, inp = shape
    left, right = orthonormal(out, k * r, seed), orthonormal(inp, k * r, seed + 1)
    deltas = {}
    for i in range(k):
        a = right[:, i * r : (i + 1) * r].mT.float().contiguous()
        b = (scale * left[:, i * r : (i + 1) * r]).float()
        deltas[f"c{i}"] = write_adapter(root / f"c{i}", {MODULES[0]: (a, b)}, alpha=float(r))
    return deltas


def test_orthogonal_equal_flat_components(tmp_path):
    k, r = 3, 4
    deltas = flat_components(tmp_path / "m", k, r)
    weights = [0.5] * k
    (record,) = analyse(write_manifest(tmp_path / "m", [f"c{i}" for i in range(k)], weights)).values()
    parts = [deltas[f"c{i}"][MODULES[0]] for i in range(k)]
    assert_spectrum(record, weighted(parts, weights), bound=k * r)
    fields = record.composition
    assert record.metrics["numerical_rank"] == k * r
    assert fields["rank_gain"] == pytest.approx(k, rel=1e-6)
    assert fields["interference"] == pytest.approx(0.0, abs=1e-6)
    assert fields["energy_shares"]["values"] == pytest.approx([1 / k] * k, rel=1e-6)
    assert fields["energy_shares"]["concentration"]["normalized_entropy"] == pytest.approx(1.0, abs=1e-9)
    assert fields["energy_shares"]["concentration"]["effective_number"] == pytest.approx(k, rel=1e-9)
    assert fields["collapsed"] is False
    assert fields["rank_expansion"]["numerical_rank"] == fields["rank_expansion"]["component_numerical_rank_sum"]
    for i in range(k):
        for j in range(k):
            for key in ("left_overlap", "right_overlap", "cosine"):
                assert record.alignment[key][i][j] == pytest.approx(1.0 if i == j else 0.0, abs=1e-6)
            if i != j:
                assert record.alignment["left_min_angle"][i][j] == pytest.approx(90.0, abs=1e-3)
    assert_composition_fields(record, parts, weights)


def test_identical_components(tmp_path):
    a, b = gaussian((4, IN), 1), gaussian((OUT, 4), 2)
    first = write_adapter(tmp_path / "m" / "x", {MODULES[0]: (a, b)}, alpha=8.0)
    write_adapter(tmp_path / "m" / "y", {MODULES[0]: (a, b)}, alpha=8.0)
    (record,) = analyse(write_manifest(tmp_path / "m", ["x", "y"], [0.5, 0.5])).values()
    delta = first[MODULES[0]]
    assert record.rank_bound == 8
    assert record.metrics["numerical_rank"] == 4  # the declared bound is 8; the sum has the rank of one
    assert_spectrum(record, delta)  # 0.5·ΔW + 0.5·ΔW
    assert record.composition["rank_gain"] == pytest.approx(1.0, rel=1e-9)
    assert record.composition["interference"] == pytest.approx(1.0, rel=1e-9)  # 2·w1·w2/(w1² + w2²)
    for key in ("left_overlap", "right_overlap", "cosine"):
        assert record.alignment[key][0][1] == pytest.approx(1.0, abs=1e-9)
    assert record.alignment["left_mean_angle"][0][1] == pytest.approx(0.0, abs=1e-3)


def test_collapse_when_one_weight_dominates_equal_norm_components(tmp_path):
    deltas = flat_components(tmp_path / "m", 3, 2)
    weights = [10.0, 1.0, 1.0]
    labels = ["c0", "c1", "c2"]
    norms = [frob2(deltas[label][MODULES[0]]) for label in labels]
    assert norms == pytest.approx([norms[0]] * 3)
    write_manifest(tmp_path / "m", labels, weights)
    shares = [100 / 102, 1 / 102, 1 / 102]
    (record,) = analyse(tmp_path / "m").values()
    assert record.composition["energy_shares"]["values"] == pytest.approx(shares, rel=1e-6)
    assert record.composition["collapsed"] is True
    (relaxed,) = rankscope.analyze(rankscope.load(tmp_path / "m"), collapse_threshold=0.99)
    assert relaxed.composition["collapsed"] is False
    for extra, collapsed in (([], True), (["--collapse-threshold", "0.99"], False)):
        result = cli("spectrum", tmp_path / "m", "--json", "-", "-q", *extra)
        assert result.exit_code == 0, result.output
        document = strict_json(result.stdout)
        assert document["layers"][0]["collapsed"] is collapsed
        assert document["summary"]["composition"]["collapsed"] == int(collapsed)


def test_uniform_weights_concentration(tmp_path):
    three_rounds(tmp_path / "m")
    write_manifest(tmp_path / "m", LABELS, [0.25, 0.25, 0.25])
    for record in analyse(tmp_path / "m").values():
        concentration = record.composition["weights"]["concentration"]
        assert concentration["normalized_entropy"] == pytest.approx(1.0, abs=1e-12)
        assert concentration["effective_number"] == pytest.approx(3.0, rel=1e-12)
        assert concentration["gini"] == pytest.approx(0.0, abs=1e-12)
        assert concentration["max_share"] == pytest.approx(1 / 3)
        assert concentration["kl_from_uniform"] == pytest.approx(0.0, abs=1e-12)


def test_random_subspaces_overlap_at_their_baseline(tmp_path):
    """Random r-dimensional subspaces of R^m overlap r/m on average (E‖U1ᵀU2‖_F² = r²/m)."""
    m, n, r, layers = 40, 24, 3, 64
    modules = [f"model.layers.{i}.mlp.up_proj" for i in range(layers)]
    random_adapter(tmp_path / "m" / "x", r, 6.0, seed=11, modules=modules, shape=(m, n))
    random_adapter(tmp_path / "m" / "y", r, 6.0, seed=12, modules=modules, shape=(m, n))
    analysis = rankscope.analyze(rankscope.load(write_manifest(tmp_path / "m", ["x", "y"], [1.0, 1.0])))
    left = [record.alignment["left_overlap"][0][1] for record in analysis]
    right = [record.alignment["right_overlap"][0][1] for record in analysis]
    # per-layer std ≈ √2/m and √2/n for k = 3: the mean over 64 layers is within ~5% (1σ) of r/m and r/n
    assert sum(left) / layers == pytest.approx(r / m, rel=0.2)
    assert sum(right) / layers == pytest.approx(r / n, rel=0.2)
    summary = analysis.summary()["composition"]
    assert summary["mean_left_baseline"] == pytest.approx(r / m)
    assert summary["mean_right_baseline"] == pytest.approx(r / n)
    assert summary["mean_left_overlap"] == pytest.approx(sum(left) / layers)


def test_single_component(tmp_path):
    delta = random_adapter(tmp_path / "m" / "only", 3, 6.0, seed=5)
    write_manifest(tmp_path / "m", ["only"], [0.7])
    result = cli("spectrum", tmp_path / "m", "--json", "-", "-q")
    assert result.exit_code == 0, result.output
    for layer in strict_json(result.stdout)["layers"]:
        assert layer["weights"]["concentration"]["normalized_entropy"] == 0.0
        assert layer["weights"]["concentration"]["effective_number"] == 1.0
        assert layer["energy_shares"]["values"] == [1.0]
        assert layer["energy_shares"]["concentration"]["effective_number"] == 1.0
        assert layer["collapsed"] is False
        assert layer["rank_gain"] == pytest.approx(1.0, rel=1e-9)
        assert layer["interference"] == pytest.approx(0.0, abs=1e-12)
        assert layer["alignment"]["cosine"] == [[pytest.approx(1.0)]]
        expected = svdvals(0.7 * delta[layer["name"]])[:3]
        assert layer["singular_values"] == pytest.approx(expected.tolist(), rel=1e-6)


def test_zero_components_and_zero_weights_have_no_nan(tmp_path):
    zero = {m: (gaussian((2, IN), j), torch.zeros(OUT, 2)) for j, m in enumerate(MODULES)}
    write_adapter(tmp_path / "z" / "z0", zero, 4.0)
    write_adapter(tmp_path / "z" / "z1", zero, 4.0)
    live = random_adapter(tmp_path / "z" / "live", 3, 3.0, seed=9)
    random_adapter(tmp_path / "z" / "twin", 3, 3.0, seed=9)  # the same factors: 1·ΔW − 1·ΔW = 0
    cases = {
        "cancel": (["live", "twin"], [1.0, -1.0]),
        "all_zero": (["z0", "z1"], [0.5, 0.5]),
        "one_zero": (["z0", "live"], [0.5, 0.5]),
        "zero_weights": (["live", "z1"], [0.0, 0.0]),
    }
    for case, (components, weights) in cases.items():
        result = cli("spectrum", write_manifest(tmp_path / "z" / f"{case}.json", components, weights), "--json", "-")
        assert result.exit_code == 0, (case, result.output)
        document = strict_json(result.stdout)
        for layer in document["layers"]:
            assert layer["valid"], layer["error"]
            alignment = layer["alignment"]
            if case == "one_zero":
                assert layer["energy_shares"]["values"] == [0.0, 1.0]
                assert alignment["cosine"][0] == [None, None] and alignment["left_overlap"][1][0] is None
                assert alignment["cosine"][1][1] == pytest.approx(1.0)
                expected = svdvals(0.5 * live[layer["name"]])[:3]
                assert layer["singular_values"][:3] == pytest.approx(expected.tolist(), rel=1e-6)
                continue
            if case == "cancel":  # the composite is 0 up to rounding: interference −1, nothing above τ
                top = float(svdvals(live[layer["name"]])[0])
                assert max(layer["singular_values"]) <= 1e-12 * top
                assert layer["interference"] == pytest.approx(-1.0, abs=1e-9)
                assert layer["metrics"]["count_above"]["0.005"] == 0
                assert alignment["cosine"][0][1] == pytest.approx(1.0)
                continue
            assert max(layer["singular_values"]) == 0.0
            assert layer["energy_shares"]["values"] is None
            assert set(layer["energy_shares"]["concentration"].values()) == {None}
            assert layer["interference"] is None and layer["collapsed"] is False
            if case == "all_zero":
                assert layer["rank_gain"] is None
                assert all(v is None for matrix in alignment.values() for row in matrix for v in row)
            else:
                assert set(layer["weights"]["concentration"].values()) == {None}
                assert layer["weights"]["signs"] == [0, 0]


def test_sequential_growth_curve(tmp_path):
    """Round t's entry is the spectrum of Σ_{i≤t} w_i·ΔW_i; the third round repeats the first (no new rank)."""
    a0, b0 = gaussian((3, IN), 21), gaussian((OUT, 3), 22)
    a1, b1 = gaussian((2, IN), 23), gaussian((OUT, 2), 24)
    parts = [
        write_adapter(tmp_path / "s" / "r0", {MODULES[0]: (a0, b0)}, 3.0)[MODULES[0]],
        write_adapter(tmp_path / "s" / "r1", {MODULES[0]: (a1, b1)}, 2.0)[MODULES[0]],
        write_adapter(tmp_path / "s" / "r2", {MODULES[0]: (a0, b0)}, 3.0)[MODULES[0]],
    ]
    weights = [0.6, 0.3, 0.1]
    write_manifest(tmp_path / "s", ["r0", "r1", "r2"], weights, mode="sequential")
    final = svdvals(weighted(parts, weights))
    thresholds = tuple(float(x) for x in (final[1] + final[2]) / 2 * torch.tensor([0.5, 1.0]))
    checkpoint = rankscope.load(tmp_path / "s")
    (record,) = rankscope.analyze(checkpoint, thresholds=thresholds)
    growth = record.composition["growth"]
    assert [g["components"] for g in growth] == [1, 2, 3]
    assert [g["rank_bound"] for g in growth] == [3, 5, 8]
    for t, entry in enumerate(growth, start=1):
        sigma = svdvals(weighted(parts[:t], weights[:t]))
        metrics = entry["metrics"]
        assert metrics["erank"] == pytest.approx(erank_reference(sigma), rel=1e-7)
        assert metrics["numerical_rank"] == numerical_rank_reference(sigma, (OUT, IN))
        for tau in thresholds:
            assert min(abs(float(s) - tau) for s in sigma) > 1e-6 * tau  # no σ on the threshold
            assert metrics["count_above"][str(tau)] == int((sigma > tau).sum())
    assert [g["metrics"]["numerical_rank"] for g in growth] == [3, 5, 5]
    assert_spectrum(record, weighted(parts, weights), bound=8)


# == the components command and the spectrum summary ===========================================================
def test_components_command_json_and_csv(tmp_path):
    deltas = three_rounds(tmp_path / "m")
    weights = [0.6, 0.3, 0.1]
    write_manifest(tmp_path / "m", LABELS, weights)
    out_json, out_csv = tmp_path / "c.json", tmp_path / "c.csv"
    result = cli("components", tmp_path / "m", "--json", out_json, "--csv", out_csv)
    assert result.exit_code == 0, result.output
    assert "round1" in result.stdout  # the table names the components
    document = strict_json(out_json.read_text())
    assert document["schema"] == "rankscope.components/1"
    assert [layer["name"] for layer in document["layers"]] == list(MODULES)
    assert document["summary"]["layers"] == len(MODULES)
    rows = list(csv.DictReader(io.StringIO(out_csv.read_text())))
    assert [(row["layer"], row["component"]) for row in rows] == [(m, label) for m in MODULES for label in LABELS]
    for row in rows:
        parts = [deltas[label][row["layer"]] for label in LABELS]
        energies = [w**2 * frob2(p) for w, p in zip(weights, parts, strict=True)]
        index = LABELS.index(row["component"])
        assert float(row["weight"]) == weights[index]
        assert float(row["energy_share"]) == pytest.approx(energies[index] / sum(energies), rel=1e-9)
        assert int(row["rank_bound"]) == RANKS_ALPHAS[index][0]
        assert float(row["erank"]) == pytest.approx(erank_reference(svdvals(parts[index])), rel=1e-7)
        assert float(row["layer_erank"]) == pytest.approx(erank_reference(svdvals(weighted(parts, weights))), rel=1e-7)


def test_spectrum_of_a_composition_shows_the_composition_summary(tmp_path):
    three_rounds(tmp_path / "m")
    write_manifest(tmp_path / "m", LABELS, [0.6, 0.3, 0.1])
    result = cli("spectrum", tmp_path / "m")
    assert result.exit_code == 0, result.output
    assert "composition:" in result.stdout and "collapsed" in result.stdout
    out = tmp_path / "s.json"
    assert cli("spectrum", tmp_path / "m", "--json", out, "-q").exit_code == 0
    document = strict_json(out.read_text())
    layer = document["layers"][0]
    for key in ("components", "alignment", "weights", "energy_shares", "rank_gain", "interference", "collapsed"):
        assert key in layer, key
    assert document["summary"]["composition"]["layers"] == len(MODULES)


def test_components_of_a_plain_lora_is_an_error(tmp_path):
    random_adapter(tmp_path / "plain", 4, 8.0, seed=1)
    line = error_line(cli("components", tmp_path / "plain", "-q"))
    assert "no composed layers" in line and str(tmp_path / "plain") in line
