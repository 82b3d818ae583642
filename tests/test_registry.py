"""The formats registry: every readable thing is a format (manifests too), helpers are not, names are checked
before any file is read, and third-party formats arrive through the ``rankscope.formats`` entry-point group."""

from __future__ import annotations

import json
import os
import pkgutil
import subprocess
import sys
import textwrap

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import rankscope
import rankscope.formats as registry
from rankscope.cli import main
from rankscope.formats import Format, FormatWarning, register_format

from .factories import assert_matches, random_factors, records, write_lora

BUILT_IN = {
    "adalora", "boostlora", "bora", "composition", "dora", "full-delta", "hydralora", "ia3", "kohya", "ln-tuning",
    "loha", "lokr", "lora", "melora", "peft-merge", "training", "vera",
}  # fmt: skip


@pytest.fixture
def fresh_registry(monkeypatch):
    """The registry as before discovery; whatever a test registers is gone afterwards."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_discovered", False)
    yield registry


def _adapter(tmp_path):
    a, b = random_factors(6, 5, 2, seed=3)
    path = write_lora(tmp_path / "adapter", {"lin": (a, b)}, {"peft_type": "LORA", "r": 2, "lora_alpha": 2})
    return path, {"lin": b.double() @ a.double()}


def _manifest(tmp_path):
    _, delta = _adapter(tmp_path)
    (tmp_path / "composition.json").write_text(json.dumps({"components": ["adapter"], "weights": [0.5]}))
    return tmp_path, {name: 0.5 * d for name, d in delta.items()}


# -- what is registered ----------------------------------------------------------------------------------------
def test_every_family_module_registers_a_format_and_helpers_are_none():
    assert set(registry.format_names()) == BUILT_IN
    modules = {m.name for m in pkgutil.iter_modules(registry.__path__) if not m.ispkg}
    readers = {fmt.read.__module__.rpartition(".")[2] for fmt in registry.formats()}
    assert modules == readers  # each top-level module is a family
    helpers = {m.name for m in pkgutil.iter_modules([f"{registry.__path__[0]}/common"])}
    assert {"source", "peft", "reader", "lycoris_math", "kohya_scale", "diffusers"} <= helpers
    assert not helpers & modules  # and the helpers live in common/, which the registry does not import


def test_listing_starts_with_the_manifest_then_follows_detection_order():
    result = CliRunner().invoke(main, ["formats"])
    assert result.exit_code == 0, result.output
    names = [line.split()[0] for line in result.stdout.splitlines() if not line.startswith(" ")]  # not needs/spectrum
    assert names[0] == "composition" and set(names) == BUILT_IN
    assert result.stdout.splitlines()[0] == (
        "composition  a composition.json manifest (or a directory holding one): weighted sum of adapters"
    )
    adapter_formats = [f for f in registry.detection_order() if f.reads == "adapter"]
    path_formats = [f.name for f in registry.detection_order() if f.reads == "path"]  # composition, full-delta
    assert [f.name for f in adapter_formats] == names[len(path_formats) :]
    assert [f.priority for f in adapter_formats] == sorted(f.priority for f in adapter_formats)


@pytest.mark.parametrize(
    ("fmt", "error", "match"),
    [
        ("not a Format", TypeError, "takes a rankscope.formats.Format"),
        (Format("Upper", "", bool, bool), ValueError, "must be lower-case"),
        (Format("lora", "", bool, bool), ValueError, "registered already"),
        (Format("toy", "", "detect", bool), TypeError, "detect and read must be functions"),
        (Format("toy", "", bool, bool, reads="url"), ValueError, "reads must be one of adapter, path"),
    ],
)
def test_register_format_is_a_checked_call(fresh_registry, fmt, error, match):
    with pytest.raises(error, match=match):
        register_format(fmt)


# -- names are checked first -----------------------------------------------------------------------------------
def test_an_unknown_format_is_a_usage_problem_before_any_file_is_touched(tmp_path, monkeypatch):
    def touched(*args, **kwargs):
        raise AssertionError("a file was looked at before the format name was checked")

    monkeypatch.setattr(registry, "locate", touched)
    monkeypatch.setattr(registry, "BaseWeights", touched)
    for path in (tmp_path / "does-not-exist", _adapter(tmp_path)[0]):
        with pytest.raises(rankscope.UsageProblem, match=r"^format 'nope' is unknown \(known: adalora, ") as info:
            rankscope.load(path, format="nope", base=tmp_path / "no-base")
        assert info.value.arguments == ("format",)
        assert info.value.spelled(lambda name: f"--{name}").startswith("--format 'nope' is unknown")


def test_library_usage_errors_name_arguments_not_flags(tmp_path):
    path, _ = _adapter(tmp_path)
    with pytest.raises(rankscope.UsageProblem, match=r"^alpha must be a finite positive number, found -1") as info:
        rankscope.load(path, alpha=-1.0)
    assert info.value.arguments == ("alpha",)
    with pytest.raises(rankscope.UsageProblem, match=r"^weights gives 1 numbers for 2 adapters in compose") as info:
        rankscope.load(path, compose=["default", "other"], weights=[1.0])
    assert info.value.arguments == ("weights", "compose")


# -- manifests are a format ------------------------------------------------------------------------------------
def test_format_composition_reads_a_manifest_as_detection_does(tmp_path):
    directory, deltas = _manifest(tmp_path)
    assert_matches(records(directory, format="composition"), deltas)
    assert_matches(records(directory / "composition.json", format="composition"), deltas)
    assert_matches(records(directory), deltas)
    assert rankscope.load(directory, format="composition").adapter_type == "COMPOSITION"


def test_format_composition_on_an_adapter_fails_clearly(tmp_path):
    path, _ = _adapter(tmp_path)
    with pytest.raises(rankscope.CheckpointError, match=r"not a composition manifest: expected a composition\.json"):
        rankscope.load(path, format="composition")
    with pytest.raises(rankscope.UsageProblem, match="adapter picks an adapter of a directory"):
        rankscope.load(_manifest(tmp_path / "m")[0], format="composition", adapter="default")
    result = CliRunner().invoke(main, ["spectrum", str(path), "--format", "composition", "-q"])
    assert result.exit_code == 1 and "not a composition manifest" in result.stderr


def test_format_lora_on_a_manifest_looks_for_adapter_files(tmp_path):
    directory, _ = _manifest(tmp_path)
    with pytest.raises(rankscope.CheckpointError, match="no adapter at the top of this directory"):
        rankscope.load(directory, format="lora")


# -- third-party formats ---------------------------------------------------------------------------------------
TOY_MODULE = '''
"""A third-party reader: <module>.toy_u (out, r) and <module>.toy_v (r, in), ΔW = u·v."""
import re

from rankscope.core.checkpoint import Checkpoint, Layer
from rankscope.core.update import FactoredUpdate
from rankscope.formats import Format

_KEY = re.compile(r"^(?P<module>.+)\\.toy_(?P<part>[uv])$")


def detect(source):
    return any(_KEY.match(key) for key in source.tensors)


def read(source, options):
    parts = {}
    for key in source.tensors:
        match = _KEY.match(key)
        if match:
            parts.setdefault(match["module"], {})[match["part"]] = source.tensors.get(key)
    layers = [
        Layer(name, FactoredUpdate(p["u"], p["v"]), (p["u"].shape[0], p["v"].shape[1]), p["u"].numel() + p["v"].numel(),
              family="toy")
        for name, p in parts.items()
    ]
    return Checkpoint(source.path, "toy", "TOY", {}, layers, weights_file=source.weights_path)


FORMAT = Format("toy", "a third-party toy format (toy_u, toy_v)", detect, read, priority=5)
'''


def _distribution(root, name: str, entry_points: str, module: str | None = None):
    """A minimal installed distribution in ``root``: ``<name>-0.1.dist-info`` and its module."""
    info = root / f"{name}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(textwrap.dedent(entry_points))
    if module is not None:
        (root / f"{name}.py").write_text(module)
    return root


@pytest.fixture
def toy_site(tmp_path, monkeypatch, fresh_registry):
    site = _distribution(
        tmp_path / "site", "rankscope_toy", "[rankscope.formats]\ntoy = rankscope_toy:FORMAT\n", TOY_MODULE
    )
    monkeypatch.syspath_prepend(str(site))
    yield site
    sys.modules.pop("rankscope_toy", None)


def _toy_file(tmp_path):
    generator = torch.Generator().manual_seed(11)
    u, v = torch.randn(7, 3, generator=generator), torch.randn(3, 5, generator=generator)
    path = tmp_path / "toy.safetensors"
    save_file({"blocks.0.proj.toy_u": u, "blocks.0.proj.toy_v": v}, str(path))
    return path, {"blocks.0.proj": u.double() @ v.double()}


def test_an_entry_point_format_is_listed_detected_and_forced(toy_site, tmp_path):
    result = CliRunner().invoke(main, ["formats"])
    assert result.exit_code == 0, result.output
    assert "toy          a third-party toy format (toy_u, toy_v)" in result.stdout.splitlines()
    path, deltas = _toy_file(tmp_path)
    checkpoint = rankscope.load(path)
    assert checkpoint.adapter_type == "TOY" and checkpoint.family == "toy"
    assert_matches(records(path), deltas)
    assert_matches(records(path, format="toy"), deltas)


def test_a_broken_entry_point_is_a_warning_naming_it(tmp_path, monkeypatch, fresh_registry):
    site = _distribution(
        tmp_path / "site",
        "rankscope_broken",
        """\
        [rankscope.formats]
        missing = rankscope_no_such_module:FORMAT
        notaformat = rankscope_broken:VALUE
        clash = rankscope_broken:CLASH
        """,
        "from rankscope.formats import Format\nVALUE = 3\nCLASH = Format('lora', 'x', bool, bool)\n",
    )
    monkeypatch.syspath_prepend(str(site))
    with pytest.warns(FormatWarning) as caught:
        names = registry.format_names()
    messages = sorted(str(w.message) for w in caught)
    assert len(messages) == 3
    assert messages[0].startswith("format entry point 'clash' (rankscope_broken:CLASH) skipped: ValueError: format ")
    assert "'missing' (rankscope_no_such_module:FORMAT) skipped: ModuleNotFoundError" in messages[1]
    assert "'notaformat' (rankscope_broken:VALUE) skipped: TypeError: it names a int" in messages[2]
    assert set(names) == BUILT_IN  # the built-in formats are untouched
    path, deltas = _adapter(tmp_path)
    assert_matches(records(path), deltas)
    result = CliRunner().invoke(main, ["formats"])  # discovery ran already: nothing more to say
    assert result.exit_code == 0 and "warning" not in result.stderr
    sys.modules.pop("rankscope_broken", None)


def test_the_cli_listing_warns_in_one_line(tmp_path, monkeypatch, fresh_registry):
    site = _distribution(tmp_path / "site", "rankscope_bad", "[rankscope.formats]\nbad = rankscope_nowhere:FORMAT\n")
    monkeypatch.syspath_prepend(str(site))
    result = CliRunner().invoke(main, ["formats"])
    assert result.exit_code == 0
    [line] = result.stderr.splitlines()
    assert line.startswith("rankscope: warning: format entry point 'bad' (rankscope_nowhere:FORMAT) skipped: ")


def test_discovery_is_lazy():
    """``import rankscope``, ``import rankscope.formats`` and ``rankscope --version`` never look for entry points."""
    code = textwrap.dedent(
        """
        import importlib.metadata, sys
        calls = []
        real = importlib.metadata.entry_points
        def spy(**kw):
            if kw.get("group") == "rankscope.formats":
                calls.append(kw)
            return real(**kw)
        importlib.metadata.entry_points = spy
        import rankscope
        rankscope.__version__
        from rankscope.cli import main
        try:
            main(["--version"])
        except SystemExit:
            pass
        import rankscope.formats
        assert calls == [], calls
        rankscope.formats.format_names()
        rankscope.formats.format_names()
        assert calls == [{"group": "rankscope.formats"}], calls
        print("lazy")
        """
    )
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("lazy")
