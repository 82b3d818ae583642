"""``rankscope plot``: every kind to PDF/PNG/SVG, widths, and bad input (one-line error, exit code, no file)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from rankscope.cli import main

from .factories import llama_like, lora_config, random_factors, write_lora
from .test_figures import TINY_LORA, composition, media_box, rank8_rank64

pytest.importorskip("matplotlib")

MAGIC = {".pdf": b"%PDF", ".png": b"\x89PNG", ".svg": b"<?xml"}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("plot")
    small, large = rank8_rank64(root)
    return {
        "lora": llama_like(root / "lora", layers=2, hidden=12, rank=4, seed=1),
        "lora8": llama_like(root / "lora8", layers=2, hidden=12, rank=8, seed=2),
        "sequential": composition(root / "sequential"),
        "summed": composition(root / "summed", mode="sum"),
        "r8": small,
        "r64": large,
        "other": write_lora(
            root / "other", {"transformer.h.0.attn.c_attn": random_factors(8, 8, 2, 0)}, lora_config(r=2)
        ),
    }


def plot(*args) -> object:
    return CliRunner().invoke(main, ["plot", *map(str, args)], catch_exceptions=False)


ARGS = {
    "spectrum": ("lora", "lora8", "--labels", "r=4,r=8"),
    "energy": ("lora", "lora8"),
    "count-above": ("lora", "lora8", "--threshold", "0.01"),
    "erank-heatmap": ("lora", "--metric", "stable_rank"),
    "alignment": ("sequential", "--layer", "model.layers.1.self_attn.v_proj"),
    "weights": ("sequential",),
    "growth": ("sequential",),
    "subspace-similarity": ("r8", "r64", "--side", "left"),
}


def resolve(inputs: dict[str, Path], args: tuple[str, ...]) -> list[str]:
    return [str(inputs[a]) if a in inputs else a for a in args]


@pytest.mark.parametrize("suffix", [".pdf", ".png", ".svg"])
@pytest.mark.parametrize("kind", list(ARGS))
def test_every_kind_to_every_format(kind, suffix, inputs, tmp_path):
    out = tmp_path / f"{kind}{suffix}"
    written_alone(plot(kind, *resolve(inputs, ARGS[kind]), "-o", out), out, 486.0 if kind == "weights" else 234.0)


def written_alone(result, out: Path, width_points: float) -> None:
    """The command wrote ``out`` in the format of its suffix (a PDF ``width_points`` wide, fonts embedded as
    TrueType) and said so, leaving nothing else in its folder."""
    assert result.exit_code == 0, result.output
    assert out.read_bytes().startswith(MAGIC[out.suffix])
    assert f"wrote {out}" in result.stderr
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no temporary file left
    if out.suffix == ".pdf":
        data = out.read_bytes()
        assert b"/FontFile2" in data and b"/Type3" not in data
        assert media_box(data)[0] == pytest.approx(width_points)


@pytest.mark.parametrize(("width", "points"), [("column", 234.0), ("full", 486.0), ("4", 288.0)])
def test_width(width, points, inputs, tmp_path):
    out = tmp_path / "fig.pdf"
    result = plot("spectrum", inputs["lora"], "-o", out, "--width", width, "-q")
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    assert media_box(out.read_bytes())[0] == pytest.approx(points)


def test_same_command_same_bytes(inputs, tmp_path):
    for name in ("a.pdf", "b.pdf", "a.svg", "b.svg"):
        assert plot("count-above", inputs["lora"], inputs["lora8"], "-o", tmp_path / name, "-q").exit_code == 0
    assert (tmp_path / "a.pdf").read_bytes() == (tmp_path / "b.pdf").read_bytes()
    assert (tmp_path / "a.svg").read_bytes() == (tmp_path / "b.svg").read_bytes()


def test_layers_regex_and_layer_select_what_is_drawn(inputs, tmp_path):
    out = tmp_path / "one.svg"
    result = plot("spectrum", inputs["lora"], "-o", out, "--layers", r"layers\.1\.", "--layer",
                  "model.layers.1.self_attn.q_proj")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert out.exists()
    result = plot("subspace-similarity", inputs["lora"], inputs["lora8"], "-o", tmp_path / "s.png", "--layers",
                  r"layers\.0\.self_attn\.q_proj$")  # fmt: skip
    assert result.exit_code == 0, result.output  # one common layer left: no --layer needed


def one_line_error(result, code: int, *words: str) -> None:
    """The exit code, no traceback, and one error line holding ``words``."""
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if "rror:" in line]
    assert len(errors) == 1, result.stderr
    for word in words:
        assert word in errors[0], errors[0]


BAD = [
    (("nonsense", "lora"), 2, ("nonsense",)),
    (("weights", "lora"), 1, ("no composed layers", "weights needs a composition")),
    (("alignment", "lora"), 1, ("no composed layers",)),
    (("growth", "summed"), 1, ("sequential",)),
    (("alignment", "sequential"), 2, ("--layer", "model.layers.0.self_attn.q_proj")),
    (("alignment", "sequential", "--layer", "nope"), 1, ("nope",)),
    (("subspace-similarity", "r8"), 2, ("exactly two",)),
    (("subspace-similarity", "r8", "r64", "lora"), 2, ("exactly two",)),
    (("subspace-similarity", "lora", "lora8"), 2, ("--layer", "pick one of 4")),
    (("subspace-similarity", "lora", "lora8", "--layer", "nope"), 1, ("no layer named 'nope'",)),
    (("subspace-similarity", "r8", "lora"), 1, ("has shape (72, 80)",)),
    (("subspace-similarity", "r8", "other"), 1, ("share no layer",)),
    (("growth", "sequential", "lora"), 2, ("one checkpoint",)),  # erank-heatmap takes several (issue 14)
    (("erank-heatmap", "lora", "--metric", "bogus"), 1, ("unknown metric",)),
    (("spectrum", "lora", "--layer", "nope"), 1, ("no layer named 'nope'",)),
    (("spectrum", "lora", "lora8", "--labels", "a"), 2, ("--labels",)),
    (("spectrum", "lora", "--width", "huge"), 2, ("width",)),
    (("spectrum", "lora", "--metric", "erank"), 2, ("--metric",)),
    (("count-above", "lora", "--layer", "x"), 2, ("--layer",)),
    (("spectrum", "missing-dir"), 1, ("missing-dir",)),
]


@pytest.mark.parametrize(("args", "code", "words"), BAD, ids=[" ".join(b[0]) for b in BAD])
def test_bad_input_leaves_no_file(args, code, words, inputs, tmp_path):
    out = tmp_path / "fig.pdf"
    cwd = os.getcwd()
    os.chdir(tmp_path)  # "missing-dir" is relative
    try:
        result = plot(*resolve(inputs, args), "-o", out)
    finally:
        os.chdir(cwd)
    one_line_error(result, code, *words)
    assert list(tmp_path.iterdir()) == []


def test_bad_suffix_and_unwritable_output(inputs, tmp_path):
    one_line_error(plot("spectrum", inputs["lora"], "-o", tmp_path / "fig.jpg"), 2, ".pdf, .png, .svg")
    result = plot("spectrum", inputs["lora"], "-o", tmp_path / "no" / "fig.pdf")
    one_line_error(result, 1, "cannot write")
    assert list(tmp_path.iterdir()) == []


def test_real_process(tmp_path):
    out = tmp_path / "spectrum.png"
    proc = subprocess.run(
        [sys.executable, "-m", "rankscope", "plot", "spectrum", str(TINY_LORA), "-o", str(out), "-q"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "" and proc.stderr == ""
    assert out.read_bytes().startswith(b"\x89PNG")


def test_help_lists_every_kind():
    result = plot("--help")
    assert result.exit_code == 0
    for kind in ARGS:
        assert re.search(rf"^\s+{re.escape(kind)}\s", result.output, re.MULTILINE), kind
