"""Library errors speak of arguments, the CLI of flags (issue 12): ``RankscopeError.spelled`` and the messages.

A library error names the Python argument (``pass base=PATH``, ``use to='peft'``) in ``argument=``; the CLI writes
it as its flag (``--base PATH``, ``--to peft``) through ``cli.app.flag``. Checked three ways: ``spelled`` on its
own, a scan of every error the package constructs (no flag in a library message, no argument re-spelled inside
prose such as "the base model"), and real errors through the Python API and the CLI.
"""

from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import rankscope
from rankscope.cli import main
from rankscope.cli.app import flag
from rankscope.core.errors import CheckpointError, RankscopeError, UsageProblem, keyword_form, mention

from .factories import PREFIX, lora_config, random_factors, write_lora

PACKAGE = Path(rankscope.__file__).parent
FLAG = re.compile(r"(?<![\w-])(--[a-z]|-[a-z] [A-Z]{2,}\b)")  # --base, -o DIR


# -- spelled on its own ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "argument", "spelled"),
    [
        ("use to='peft' or to='kohya'", "to", "use --to peft or --to kohya"),
        ("the folder exists; pass force=True to replace it", "force", "the folder exists; pass --force to replace it"),
        ("workers die: run with jobs=1 to see why.", "jobs", "workers die: run with --jobs 1 to see why."),
        ("pick one with adapter=NAME or give its folder", "adapter", "pick one with --adapter NAME or give its folder"),
        # a keyword form wins over an earlier prose mention of the same word
        (
            "needs the base model's weights: pass base=PATH (the base model directory)",
            "base",
            "needs the base model's weights: pass --base PATH (the base model directory)",
        ),
        ("Parquet needs pyarrow (or give table='csv')", "table", "Parquet needs pyarrow (or give --table csv)"),
        # without a keyword form: the first whole-word mention only, never inside a path, flag or file name
        ("layers 'x' matches no layers", "layers", "--layers 'x' matches no layers"),
        ("runs/base or base.json: base must be a folder", "base", "runs/base or base.json: --base must be a folder"),
        ("no tensor in base.", "base", "no tensor in --base."),
        ("basement and base_layer are not base", "base", "basement and base_layer are not --base"),
        ("nothing said of it", "base", "nothing said of it"),
    ],
)
def test_spelled(message, argument, spelled):
    assert RankscopeError(message, argument=argument).spelled(flag) == spelled


def test_spelled_several_arguments_and_the_flags_table():
    error = UsageProblem("energies and rel_thresholds and from_list=FILE", argument=("energies", "rel_thresholds"))
    assert error.spelled(flag) == "--energy and --rel-threshold and from_list=FILE"
    assert RankscopeError("from_list=FILE cannot be read", argument="from_list").spelled(flag) == (
        "--from FILE cannot be read"
    )
    assert UsageProblem("inputs name no checkpoint", argument="inputs").spelled(flag) == "INPUTS name no checkpoint"
    assert RankscopeError("choose another out_dir", argument="out_dir").spelled(flag) == "choose another --output"
    # a backslash in a spelling is written as it is (no regex escapes of its own)
    assert RankscopeError("base=PATH, base", argument="base").spelled(lambda _: r"\1\g<0>") == r"\1\g<0> PATH, base"


def test_spelled_leaves_the_path_and_tensor_prefix_alone():
    error = CheckpointError("base (the base model): no such file", path="/x/base", key="base", argument="base")
    assert str(error) == "/x/base: tensor 'base': base (the base model): no such file"
    assert error.spelled(flag) == "/x/base: tensor 'base': --base (the base model): no such file"


# -- every error the package constructs --------------------------------------------------------------------------


def _error_classes(trees: list[ast.Module]) -> set[str]:
    """RankscopeError and every class deriving from it (by name, to a fixed point)."""
    names, grew = {"RankscopeError"}, True
    while grew:
        grew = False
        for tree in trees:
            for node in ast.walk(tree):
                if isinstance(node, ast.ClassDef) and node.name not in names:
                    bases = {b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in node.bases}
                    if bases & names:
                        names.add(node.name)
                        grew = True
    return names


def _template(node: ast.expr) -> str | None:
    """A message's literal text with ``{}`` for each interpolated value, or None where it is not literal."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _template(node.left), _template(node.right)
        return None if left is None or right is None else left + right
    return None


@functools.cache
def _library_errors() -> list[tuple[str, str, tuple[str, ...]]]:
    """(where, message template, arguments) of every RankscopeError raised or built outside ``cli/``."""
    files = [p for p in sorted(PACKAGE.rglob("*.py")) if "cli" not in p.relative_to(PACKAGE).parts]
    trees = [ast.parse(p.read_text(encoding="utf-8")) for p in files]
    classes = _error_classes(trees)
    found = []
    for path, tree in zip(files, trees, strict=True):
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call) or not node.args:
                continue
            name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
            message = _template(node.args[0])
            if name not in classes or message is None:
                continue
            arguments: tuple[str, ...] = ()
            for keyword in node.keywords:
                if keyword.arg == "argument":
                    try:
                        value = ast.literal_eval(keyword.value)
                    except ValueError:  # computed (``argument=name``): what it names is not known here
                        value = ()
                    arguments = (value,) if isinstance(value, str) else tuple(value or ())
            found.append((f"{path.relative_to(PACKAGE)}:{node.lineno}", message, arguments))
    return found


def test_the_scan_sees_the_errors():
    found = _library_errors()
    assert len(found) > 150
    assert any(args == ("base", "directional_only") and "base=PATH" in text for _, text, args in found)


def test_no_library_error_writes_a_flag():
    flagged = [f"{where}: {text}" for where, text, _ in _library_errors() if FLAG.search(text)]
    assert not flagged, "\n".join(flagged)


def test_no_argument_is_spelled_inside_prose():
    """The mention ``spelled`` turns into a flag is the argument, not a word of a sentence ("the base model",
    "the inputs"): a keyword form, or a whole-word mention not after "the" nor before "model"/"weight"."""
    wrong = []
    for where, text, arguments in _library_errors():
        for name in arguments:
            if re.search(keyword_form(name), text):
                continue
            found = re.search(mention(name), text)
            if found is None:
                continue  # named for code that catches it, not said in the words
            before, after = text[: found.start()], text[found.end() :]
            if before.endswith("the ") or re.match(r" (model|weight)", after):
                wrong.append(f"{where}: {name!r} in {text!r}")
    assert not wrong, "\n".join(wrong)


# -- real errors, through the Python API and through the CLI ------------------------------------------------------


def cli(*args: str):
    result = CliRunner().invoke(main, list(args))
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return result.exit_code, lines[0]


def dora_adapter(directory: Path) -> Path:
    a, b = random_factors(12, 16, 4, seed=1)
    magnitude = {f"{PREFIX}lin.lora_magnitude_vector.weight": torch.rand(12) + 0.5}
    return write_lora(directory, {"lin": (a, b)}, lora_config(use_dora=True, target_modules=["lin"]), extra=magnitude)


def test_dora_without_base(tmp_path):
    adapter = dora_adapter(tmp_path / "dora")
    with pytest.raises(CheckpointError) as caught:
        rankscope.load(adapter)
    library = str(caught.value)
    assert "pass base=PATH (the base model directory" in library and "directional_only=True" in library
    assert "--" not in library and caught.value.arguments == ("base", "directional_only")
    code, line = cli("spectrum", str(adapter))
    assert code == 1 and line.startswith(f"rankscope: error: {adapter / 'adapter_config.json'}: DoRA")
    assert "needs the base model's weights: pass --base PATH (the base model directory" in line
    assert "or --directional-only to analyse" in line


def test_base_errors(tmp_path):
    adapter = dora_adapter(tmp_path / "dora")
    missing = tmp_path / "missing"
    with pytest.raises(CheckpointError, match=r"missing: base \(the base model\): no such file") as caught:
        rankscope.load(adapter, base=missing)
    assert "--" not in str(caught.value)
    assert cli("spectrum", str(adapter), "--base", str(missing)) == (
        1,
        f"rankscope: error: {missing}: --base (the base model): no such file or directory",
    )
    wrong = tmp_path / "wrong.safetensors"
    save_file({"lin.weight": torch.randn(13, 16)}, str(wrong))
    with pytest.raises(CheckpointError, match=r"for layer 'lin' \(is base the model this adapter") as caught:
        rankscope.load(adapter, base=wrong)
    assert "--" not in str(caught.value)
    code, line = cli("spectrum", str(adapter), "--base", str(wrong))
    assert code == 1 and f"{wrong}: tensor 'lin.weight': the weight's shape [13, 16] does not match" in line
    assert line.endswith("(is --base the model this adapter was trained on?)")


def test_training_checkpoint_adapter_choice(tmp_path):
    path = tmp_path / "model.pt"
    tensors = {}
    for name in ("alpha", "beta"):
        a, b = random_factors(6, 8, 2, seed=len(name))
        tensors |= {f"{PREFIX}lin.lora_A.{name}.weight": a, f"{PREFIX}lin.lora_B.{name}.weight": b}
    tensors[f"{PREFIX}lin.base_layer.weight"] = torch.randn(6, 8)
    torch.save(tensors, path)
    with pytest.raises(CheckpointError, match=r"holds adapters alpha, beta: pick one with adapter=NAME$") as caught:
        rankscope.load(path)
    assert caught.value.arguments == ("adapter",)
    code, line = cli("spectrum", str(path))
    assert code == 1 and line.endswith("holds adapters alpha, beta: pick one with --adapter NAME")
    with pytest.raises(CheckpointError, match="no adapter named 'gamma' in this file: adapter=NAME picks"):
        rankscope.load(path, adapter="gamma")
    code, line = cli("spectrum", str(path), "--adapter", "gamma")
    assert code == 1 and "no adapter named 'gamma' in this file: --adapter NAME picks an adapter" in line


def test_report_folder(tmp_path):
    from rankscope.report.bundle import check_target

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(RankscopeError, match=r"pass force=True to replace it$") as caught:
        check_target(foreign, force=False)
    assert caught.value.spelled(flag).endswith("not written by rankscope report; pass --force to replace it")
    adapter = write_lora(tmp_path / "lora", {"q_proj": random_factors(8, 8, 2, seed=0)}, lora_config())
    code, line = cli("report", str(adapter), "-o", str(foreign), "--figures", "none")
    assert code == 1 and line.endswith("pass --force to replace it")
    (tmp_path / "file").write_text("")
    with pytest.raises(RankscopeError, match=r"not a report folder; choose another out_dir$"):
        check_target(tmp_path / "file")
    code, line = cli("report", str(adapter), "-o", str(tmp_path / "file"), "--figures", "none")
    assert code == 1 and line.endswith("not a report folder; choose another --output")


def test_an_unknown_device_is_a_usage_error(tmp_path):
    """A device torch does not know is the caller's mistake (exit 2, naming --device); CUDA asked for on a machine
    without it stays an error of the machine (exit 1)."""
    adapter = write_lora(
        tmp_path / "lora", {"lin": random_factors(12, 16, 4, seed=2)}, lora_config(target_modules=["lin"])
    )
    with pytest.raises(UsageProblem, match="'tpu' is not a device torch knows"):
        rankscope.analyze(rankscope.load(adapter), dense=True, device="tpu")
    code, line = cli("spectrum", str(adapter), "--dense", "--device", "tpu")
    assert code == 2 and line.startswith("rankscope: error: --device 'tpu' is not a device torch knows")
    if not torch.cuda.is_available():
        code, line = cli("spectrum", str(adapter), "--dense", "--device", "cuda")
        assert code == 1 and "CUDA is not available" in line
