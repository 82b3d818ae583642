"""Bad input through the CLI: the exit code, one line on stderr naming the file (and tensor), no traceback,
nothing half-written; a partly broken checkpoint is analysed where it can be and says where it cannot.

The checkpoints start from one real PEFT checkpoint (three Linear layers, r=4, α=8) and are damaged here.
Reference singular values come from the stored factors in float64 (``svdvals(s·B·A)``), never from rankscope.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from rankscope.cli import main

pytest.importorskip("peft")

PREFIX = "base_model.model."
LAYERS = ("down", "narrow", "up")  # MLP: up 16→24, down 24→16, narrow 16→3; model order is natural sort
R, ALPHA = 4, 8


# -- the template checkpoint and ways to damage it -----------------------------------------------------------


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """A real PEFT checkpoint: adapter_config.json + adapter_model.safetensors."""
    from . import peft_cases as pc

    case = pc.Case("mlp", pc.MLP, {"r": R, "lora_alpha": ALPHA, "target_modules": list(LAYERS)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model, _ = pc.build(case)
        directory = tmp_path_factory.mktemp("template")
        peft_model.save_pretrained(directory)
    return directory


def tensors_of(template: Path) -> dict[str, torch.Tensor]:
    return load_file(str(template / "adapter_model.safetensors"))


def config_of(template: Path) -> dict:
    return json.loads((template / "adapter_config.json").read_text())


def write_checkpoint(directory: Path, tensors: dict | None, config: dict | None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    if tensors is not None:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / "adapter_model.safetensors"))
    if config is not None:
        (directory / "adapter_config.json").write_text(json.dumps(config))
    return directory


def reference_sigma(tensors: dict, layer: str, scale: float) -> torch.Tensor:
    a = tensors[f"{PREFIX}{layer}.lora_A.weight"].double()
    b = tensors[f"{PREFIX}{layer}.lora_B.weight"].double()
    sigma = torch.linalg.svdvals(scale * b @ a)
    return sigma[: min(a.shape[0], *b.shape, a.shape[1])]


# -- running the CLI and checking how it failed --------------------------------------------------------------


def run(*args: str):
    result = CliRunner().invoke(main, ["spectrum", *map(str, args)])
    # anything but a clean exit is a crash that CliRunner caught
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exc_info
    assert "Traceback" not in result.output
    return result


def stderr_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


def assert_failed(result, out_dir: Path, *names: str) -> str:
    """Exit 1, exactly one line on stderr naming every string in ``names``, and ``out_dir`` left empty."""
    assert result.exit_code == 1, (result.exit_code, result.output)
    lines = stderr_lines(result)
    assert len(lines) == 1, lines
    for name in names:
        assert name in lines[0], (name, lines[0])
    assert "Usage:" not in result.stderr
    assert list(out_dir.iterdir()) == [], "a failed run left output behind"
    return lines[0]


def fail_run(path: Path, tmp_path: Path, *extra: str):
    """Run with ``--json`` and ``--csv`` into an empty folder (which must stay empty on failure)."""
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    return run(path, "--json", out / "report.json", "--csv", out / "report.csv", *extra), out


def _no_constants(name: str):
    raise AssertionError(f"the JSON holds {name}")


def json_run(path: Path, *extra: str) -> tuple[object, dict]:
    """Exit 0 and the JSON report from stdout (which must hold no NaN or Infinity)."""
    result = run(path, "--json", "-", *extra)
    assert result.exit_code == 0, result.output
    return result, json.loads(result.stdout, parse_constant=_no_constants)


# -- whole input unusable: exit 1 ----------------------------------------------------------------------------------


def test_missing_path(tmp_path):
    missing = tmp_path / "no-such-adapter"
    result, out = fail_run(missing, tmp_path)
    assert_failed(result, out, str(missing))


def test_directory_without_adapter(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "README.md").write_text("not an adapter")
    result, out = fail_run(empty, tmp_path)
    assert_failed(result, out, str(empty), "adapter_config.json")


def test_config_without_weights(template, tmp_path):
    directory = write_checkpoint(tmp_path / "ckpt", None, config_of(template))
    result, out = fail_run(directory, tmp_path)
    assert_failed(result, out, str(directory))


def test_corrupted_safetensors(template, tmp_path):
    directory = write_checkpoint(tmp_path / "ckpt", None, config_of(template))
    weights = directory / "adapter_model.safetensors"
    weights.write_bytes(os.urandom(4096))
    result, out = fail_run(directory, tmp_path)
    assert_failed(result, out, str(weights), "safetensors")


def test_truncated_safetensors(template, tmp_path):
    directory = write_checkpoint(tmp_path / "ckpt", None, config_of(template))
    data = (template / "adapter_model.safetensors").read_bytes()
    weights = directory / "adapter_model.safetensors"
    weights.write_bytes(data[: len(data) // 2])
    result, out = fail_run(directory, tmp_path)
    assert_failed(result, out, str(weights))


@pytest.mark.parametrize("text", ['{"r": 4, "lora_alpha": ', "[1, 2]", "\xff\xfe"], ids=["truncated", "list", "binary"])
def test_config_that_does_not_parse(template, tmp_path, text):
    directory = write_checkpoint(tmp_path / "ckpt", tensors_of(template), None)
    config = directory / "adapter_config.json"
    config.write_bytes(text.encode("latin-1"))
    result, out = fail_run(directory, tmp_path)
    assert_failed(result, out, str(config))


@pytest.mark.parametrize(
    ("patch", "flag"),
    [
        ({"peft_type": "OFT"}, "OFT"),
        ({"use_dora": True}, "use_dora"),
        ({"arrow_config": {"top_k": 2}}, "arrow_config"),  # routed per token: no static ΔW
    ],
    ids=["oft", "dora", "arrow"],
)
def test_unsupported_adapter_types_are_refused_by_name(template, tmp_path, patch, flag):
    directory = write_checkpoint(tmp_path / "ckpt", tensors_of(template), {**config_of(template), **patch})
    result, out = fail_run(directory, tmp_path)
    line = assert_failed(result, out, str(directory))
    assert flag.lower() in line.lower()


def test_invalid_rank_pattern_regex(template, tmp_path):
    config = {**config_of(template), "rank_pattern": {"up(": 2}}
    directory = write_checkpoint(tmp_path / "ckpt", tensors_of(template), config)
    result, out = fail_run(directory, tmp_path)
    assert_failed(result, out, str(directory / "adapter_config.json"), "up(")


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"lora_alpha": "sixteen"}, "lora_alpha"),
        ({"lora_alpha": 0}, "lora_alpha"),
        ({"r": "four"}, "r"),
        ({"r": None}, "r"),
        ({"rank_pattern": {"up": "two"}}, "up"),
        ({"rank_pattern": ["up"]}, "rank_pattern"),
        ({"alpha_pattern": {"up": None}}, "alpha_pattern value for up"),
    ],
    ids=["alpha_text", "alpha_zero", "r_text", "r_null", "rank_pattern_value", "rank_pattern_list", "alpha_null"],
)
def test_invalid_config_values(template, tmp_path, patch, field):
    directory = write_checkpoint(tmp_path / "ckpt", tensors_of(template), {**config_of(template), **patch})
    result, out = fail_run(directory, tmp_path)
    line = assert_failed(result, out, str(directory / "adapter_config.json"), field)
    assert "internal error" not in line


def test_single_layer_rank_mismatch(template, tmp_path):
    tensors = {k: v for k, v in tensors_of(template).items() if ".up." in k}
    b_key = f"{PREFIX}up.lora_B.weight"
    tensors[b_key] = torch.randn(24, R - 1)
    directory = write_checkpoint(tmp_path / "ckpt", tensors, config_of(template))
    result, out = fail_run(directory, tmp_path)
    assert_failed(result, out, str(directory / "adapter_model.safetensors"), b_key)


def test_single_layer_without_lora_b(template, tmp_path):
    tensors = {k: v for k, v in tensors_of(template).items() if ".up.lora_A." in k}
    directory = write_checkpoint(tmp_path / "ckpt", tensors, config_of(template))
    result, out = fail_run(directory, tmp_path)
    assert_failed(result, out, str(directory / "adapter_model.safetensors"), f"{PREFIX}up.lora_A.weight", "lora_B")


# -- untrusted pickles -----------------------------------------------------------------------------------------


class _OpensAFile:
    """Unpickling this would create ``path`` (``open(path, "w")``)."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


class _RunsACommand:
    """Unpickling this would run ``touch path``."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def malicious_bin(template: Path, directory: Path, payload_cls) -> tuple[Path, Path]:
    """A .bin holding real LoRA tensors plus an object whose unpickling would create a marker file."""
    directory.mkdir(parents=True, exist_ok=True)
    marker = directory / "PWNED"
    state = dict(tensors_of(template))
    state["base_model.model.up.payload"] = payload_cls(marker)
    weights = directory / "adapter_model.bin"
    torch.save(state, weights)
    (directory / "adapter_config.json").write_text(json.dumps(config_of(template)))
    assert not marker.exists()
    return weights, marker


@pytest.mark.parametrize("payload", [_OpensAFile, _RunsACommand], ids=["open", "os_system"])
def test_pickle_that_weights_only_refuses(template, tmp_path, payload):
    weights, marker = malicious_bin(template, tmp_path / "ckpt", payload)
    result, out = fail_run(weights.parent, tmp_path)
    line = assert_failed(result, out, str(weights))
    assert "weights_only" in line
    assert not marker.exists(), "rankscope unpickled an arbitrary object"


def rankscope_command() -> list[str]:
    """The installed console script where there is one (as users run it), else ``python -m rankscope``."""
    script = Path(sys.executable).with_name("rankscope")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "rankscope"]


def test_pickle_refused_in_a_real_process(template, tmp_path):
    weights, marker = malicious_bin(template, tmp_path / "ckpt", _RunsACommand)
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("RANKSCOPE_DEBUG", None)
    process = subprocess.run(
        [*rankscope_command(), "spectrum", str(weights), "--json", str(out / "report.json")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert process.returncode == 1, process.stderr
    lines = [line for line in process.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert str(weights) in lines[0] and "weights_only" in lines[0]
    assert "Traceback" not in process.stderr + process.stdout
    assert not marker.exists()
    assert list(out.iterdir()) == []


def test_bin_that_is_not_a_mapping(template, tmp_path):
    weights = tmp_path / "ckpt" / "adapter_model.bin"
    weights.parent.mkdir()
    torch.save(list(tensors_of(template).values()), weights)
    result, out = fail_run(weights, tmp_path)
    assert_failed(result, out, str(weights), "mapping")


@pytest.mark.parametrize("damage", ["random", "truncated", "empty", "text"])
def test_damaged_bin(template, tmp_path, damage):
    weights = tmp_path / "ckpt" / "adapter_model.bin"
    weights.parent.mkdir()
    torch.save(dict(tensors_of(template)), weights)
    data = weights.read_bytes()
    weights.write_bytes(
        {"random": os.urandom(4096), "truncated": data[: len(data) // 2], "empty": b"", "text": b"hello\n"}[damage]
    )
    result, out = fail_run(weights, tmp_path)
    line = assert_failed(result, out, str(weights))
    # a damaged file is not a refused pickle: the message must not blame objects the file does not hold
    assert "objects other than tensors" not in line


# -- partly broken multi-layer checkpoints: exit 0, the broken layer listed -------------------------------------


def assert_partial(template_tensors: dict, document: dict, bad: str, *needles: str) -> None:
    layers = {layer["name"]: layer for layer in document["layers"]}
    assert list(layers) == list(LAYERS)
    broken = layers[bad]
    assert broken["valid"] is False and broken["metrics"] is None and broken["singular_values"] == []
    for needle in needles:
        assert needle in broken["error"], (needle, broken["error"])
    for name in LAYERS:
        if name == bad:
            continue
        assert layers[name]["valid"] is True and layers[name]["error"] is None
        got = torch.tensor(layers[name]["singular_values"], dtype=torch.float64)
        expected = reference_sigma(template_tensors, name, ALPHA / R)
        assert torch.allclose(got, expected, rtol=1e-9, atol=0), name


def assert_one_warning(result, weights: Path, *needles: str) -> None:
    """Exactly one stderr line reports the broken layer, naming the file and the tensor."""
    lines = [line for line in stderr_lines(result) if line.startswith("rankscope:") and "invalid" in line]
    assert len(lines) == 1, stderr_lines(result)
    assert str(weights) in lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_rank_mismatch_in_one_of_three_layers(template, tmp_path):
    tensors = tensors_of(template)
    b_key = f"{PREFIX}up.lora_B.weight"
    damaged = {**tensors, b_key: torch.randn(24, R - 1)}
    directory = write_checkpoint(tmp_path / "ckpt", damaged, config_of(template))
    weights = directory / "adapter_model.safetensors"

    result, document = json_run(directory)
    assert_partial(tensors, document, "up", b_key, "rank")
    assert_one_warning(result, weights, b_key)

    out = tmp_path / "out.json"
    strict = run(directory, "--strict", "--json", out)
    assert strict.exit_code == 1
    assert "strict" in strict.stderr
    # --strict fails the run but the report it wrote is complete: the invalid layer is in it
    assert_partial(tensors, json.loads(out.read_text()), "up", b_key)


def test_lora_a_without_lora_b(template, tmp_path):
    tensors = tensors_of(template)
    a_key = f"{PREFIX}narrow.lora_A.weight"
    damaged = {k: v for k, v in tensors.items() if k != f"{PREFIX}narrow.lora_B.weight"}
    directory = write_checkpoint(tmp_path / "ckpt", damaged, config_of(template))
    result, document = json_run(directory)
    assert_partial(tensors, document, "narrow", a_key, "lora_B")
    assert_one_warning(result, directory / "adapter_model.safetensors", a_key)


@pytest.mark.parametrize("factor", ["lora_A", "lora_B"])
def test_nan_and_inf_in_a_factor(template, tmp_path, factor):
    tensors = tensors_of(template)
    key = f"{PREFIX}down.{factor}.weight"
    bad = tensors[key].clone()
    bad[0, 0] = float("nan")
    bad[1, 1] = float("nan")
    bad[2, 0] = float("inf")
    bad[3, 1] = -float("inf")
    directory = write_checkpoint(tmp_path / "ckpt", {**tensors, key: bad}, config_of(template))
    result, document = json_run(directory)
    assert_partial(tensors, document, "down", key, "2 NaN", "2 Inf")
    assert_one_warning(result, directory / "adapter_model.safetensors", key)


def test_nan_everywhere_fails_the_whole_run(template, tmp_path):
    tensors = {k: torch.full_like(v, float("nan")) for k, v in tensors_of(template).items()}
    directory = write_checkpoint(tmp_path / "ckpt", tensors, config_of(template))
    result, out = fail_run(directory, tmp_path)
    assert_failed(result, out, str(directory / "adapter_model.safetensors"), "NaN")


def test_unknown_tensors_are_listed_as_skipped(template, tmp_path):
    tensors = tensors_of(template)
    extra = {
        "base_model.model.up.lora_C.weight": torch.zeros(2, 2),
        "base_model.model.unrelated.weight": torch.zeros(3),
        "optimizer_step": torch.tensor(7),
    }
    directory = write_checkpoint(tmp_path / "ckpt", {**tensors, **extra}, config_of(template))
    _, document = json_run(directory)
    assert {item["key"] for item in document["skipped"]} == set(extra)
    assert all(item["reason"] for item in document["skipped"])
    assert [layer["name"] for layer in document["layers"]] == list(LAYERS)
    assert all(layer["valid"] for layer in document["layers"])
    # the terminal output says so too: the adapter-looking ones (a factor of an unknown kind; a full weight,
    # which PEFT writes only for modules it saves whole) as a warning, the other as a note
    stderr = run(directory).stderr
    assert "2 module(s) with adapter weights NOT analysed: " in stderr
    assert "1 tensors not used" in stderr
    assert sorted(item["module"] for item in document["not_analysed"]) == ["unrelated", "up"]
    assert document["summary"]["not_analysed_modules"] == 2


def test_non_tensor_entries_of_a_bin_are_listed_as_skipped(template, tmp_path):
    weights = tmp_path / "ckpt" / "adapter_model.bin"
    weights.parent.mkdir()
    torch.save({**tensors_of(template), "global_step": 1200, "note": "epoch 3"}, weights)
    (weights.parent / "adapter_config.json").write_text(json.dumps(config_of(template)))
    _, document = json_run(weights.parent)
    skipped = {item["key"]: item["reason"] for item in document["skipped"]}
    assert set(skipped) == {"global_step", "note"}
    assert "not a tensor" in skipped["global_step"]


def test_unknown_adapter_name(template, tmp_path):
    directory = tmp_path / "multi"
    shutil.copytree(template, directory)
    shutil.copytree(template, directory / "second")
    result, out = fail_run(directory, tmp_path, "--adapter", "third")
    assert_failed(result, out, str(directory), "third", "default", "second")


# -- files without adapter_config.json: α from --alpha, from metadata, or unknown (scale 1) -----------------------


def singular_values_from(document: dict) -> dict[str, torch.Tensor]:
    return {layer["name"]: torch.tensor(layer["singular_values"], dtype=torch.float64) for layer in document["layers"]}


def assert_scaled_by(document: dict, tensors: dict, scales: dict[str, float]) -> None:
    sigma = singular_values_from(document)
    assert set(sigma) == set(scales)
    for name, scale in scales.items():
        assert torch.allclose(sigma[name], reference_sigma(tensors, name, scale), rtol=1e-9, atol=0), name
    for layer in document["layers"]:
        assert layer["scale"] == pytest.approx(scales[layer["name"]])


def test_bare_file_without_alpha_assumes_scale_one(template, tmp_path):
    tensors = tensors_of(template)
    bare = tmp_path / "lora.safetensors"
    save_file(tensors, str(bare))
    result, document = json_run(bare)
    warning = [line for line in stderr_lines(result) if "warning" in line]
    assert len(warning) == 1 and str(bare) in warning[0]
    assert "α is unknown" in warning[0] and "scale 1" in warning[0] and "--alpha" in warning[0]
    assert_scaled_by(document, tensors, dict.fromkeys(LAYERS, 1.0))


def test_bare_file_with_alpha_option(template, tmp_path):
    tensors = tensors_of(template)
    bare = tmp_path / "lora.safetensors"
    save_file(tensors, str(bare))
    result, document = json_run(bare, "--alpha", "16")
    assert not any("unknown" in line for line in stderr_lines(result))
    assert_scaled_by(document, tensors, dict.fromkeys(LAYERS, 16 / R))


def test_kohya_metadata_alpha_is_not_read_for_peft_layout(template, tmp_path):
    # diffusers, PEFT, LyCORIS and ComfyUI never read ss_network_alpha for lora_A/lora_B keys: α = r, and the
    # disagreement is said (kohya_scale's rule)
    tensors = tensors_of(template)
    bare = tmp_path / "kohya.safetensors"
    save_file(tensors, str(bare), metadata={"ss_network_alpha": "12.0", "ss_network_dim": str(R)})
    result, document = json_run(bare)
    assert any("disagrees: ss_network_alpha = 12" in line and str(bare) in line for line in stderr_lines(result))
    assert_scaled_by(document, tensors, dict.fromkeys(LAYERS, 1.0))


def test_diffusers_metadata_gives_alpha_and_patterns(template, tmp_path):
    tensors = tensors_of(template)
    bare = tmp_path / "diffusers.safetensors"
    metadata = {"r": R, "lora_alpha": 12, "alpha_pattern": {"up": 2}, "use_rslora": False}
    save_file(tensors, str(bare), metadata={"lora_adapter_metadata": json.dumps(metadata)})
    result, document = json_run(bare)
    assert any("lora_adapter_metadata" in line for line in stderr_lines(result))
    assert_scaled_by(document, tensors, {"down": 12 / R, "narrow": 12 / R, "up": 2 / R})


def test_kohya_metadata_that_does_not_parse_falls_back_to_scale_one(template, tmp_path):
    tensors = tensors_of(template)
    bare = tmp_path / "kohya.safetensors"
    save_file(tensors, str(bare), metadata={"ss_network_alpha": "not-a-number"})
    result, document = json_run(bare)
    assert any("scale 1" in line for line in stderr_lines(result))
    assert_scaled_by(document, tensors, dict.fromkeys(LAYERS, 1.0))


@pytest.mark.parametrize("target", ["itself", "gone"])
def test_a_link_that_leads_nowhere_is_named_as_one(tmp_path, target):
    """A symbolic link in a loop (or to a target that is gone) is said to be one, not "no such file"."""
    from .factories import one_line_error
    from .factories import run_spectrum as spectrum

    link = tmp_path / "adapter"
    link.symlink_to(link if target == "itself" else tmp_path / "removed")
    one_line_error(spectrum(link), str(link), "a symbolic link that leads nowhere")
