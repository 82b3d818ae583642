"""``rankscope plot`` of a training run (``trajectory``, ``trajectory-heatmap``, ``drift``): a file of every format,
the same bytes for the same command, the values drawn against a dense float64 reference, and bad input (one line,
exit 2 for usage, no file)."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from rankscope.cli import main
from rankscope.cli.plot import RUN_KINDS
from rankscope.trajectory.build import checkpoint_trajectory
from rankscope.trajectory.discover import run_checkpoints

from .factories import lora_config, random_factors, write_lora
from .test_figures import media_box
from .test_plot_cli import one_line_error, written_alone
from .test_trajectory import HIDDEN, MODULES, RANK, _dense, _drift_run, _line

pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """checkpoint-100 … checkpoint-400 of three layers (two q_proj, one down_proj), trainer_state.json each."""
    return _drift_run(tmp_path_factory.mktemp("plot-run"))


def plot(*args) -> object:
    return CliRunner().invoke(main, ["plot", *map(str, args)], catch_exceptions=False)


def test_the_run_kinds_are_the_trajectory_figures():
    from rankscope.figures import KINDS

    assert RUN_KINDS == ("trajectory", "trajectory-heatmap", "drift") and not set(RUN_KINDS) & set(KINDS)
    result = plot("--help")
    for kind in RUN_KINDS:
        assert f"\n    {kind} " in result.output, kind


@pytest.mark.parametrize("suffix", [".pdf", ".png", ".svg"])
@pytest.mark.parametrize("kind", RUN_KINDS)
def test_every_run_kind_to_every_format(kind, suffix, run, tmp_path):
    out = tmp_path / f"{kind}{suffix}"
    written_alone(plot(kind, run, "-o", out), out, 486.0 if kind == "trajectory-heatmap" else 234.0)


@pytest.mark.parametrize("kind", RUN_KINDS)
def test_same_command_same_bytes(kind, run, tmp_path):
    extra = ("--metric", "stable_rank") if kind != "drift" else ()
    for name in ("a.pdf", "b.pdf", "a.svg", "b.svg"):
        result = plot(kind, run, *extra, "-o", tmp_path / name, "-q", "--width", "4")
        assert result.exit_code == 0 and result.stderr == "", result.output
    assert (tmp_path / "a.pdf").read_bytes() == (tmp_path / "b.pdf").read_bytes()
    assert (tmp_path / "a.svg").read_bytes() == (tmp_path / "b.svg").read_bytes()
    assert media_box((tmp_path / "a.pdf").read_bytes())[0] == pytest.approx(288.0)


def _erank(sigma: torch.Tensor) -> float:
    p = sigma[sigma > 0] / sigma.sum()
    return math.exp(-float((p * p.log()).sum()))


def test_the_values_drawn_are_a_dense_reference(run):
    """The lines of ``trajectory`` are the per-type means of erank from a dense float64 SVD of each checkpoint's
    B·A; the heatmap's cells are each layer's count of σ > 10 (3 or 4 here: σ lie between 7 and 50)."""
    from rankscope.analysis.options import AnalysisOptions
    from rankscope.figures import trajectory as F

    entries = run_checkpoints(run)
    result = checkpoint_trajectory(entries, AnalysisOptions(thresholds=(10.0,)))
    spectra = {step: {m: torch.linalg.svdvals(_dense(path, m)) for m in MODULES} for step, path in entries}
    fig = F.metric_by_step_figure(result, "erank")
    drawn = fig.axes[0].get_lines()
    assert len(drawn) == 2  # q_proj, down_proj
    expected = {
        "q_proj": [(_erank(s[MODULES[0]]) + _erank(s[MODULES[1]])) / 2 for s in spectra.values()],
        "down_proj": [_erank(s[MODULES[2]]) for s in spectra.values()],
    }
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    for name, line in zip(legend, drawn, strict=True):
        assert list(line.get_xdata()) == [100, 200, 300, 400]
        assert list(line.get_ydata()) == pytest.approx(expected[name], rel=1e-9)
    heat = F.layer_step_heatmap(result, "count_above[10]")
    cells = heat.axes[0].collections[0].get_array()
    counts = [[int((spectra[step][m] > 10).sum()) for step in spectra] for m in MODULES]
    assert len({c for row in counts for c in row}) > 1  # the cells tell the layers and steps apart
    order = [MODULES[0], MODULES[2], MODULES[1]]  # model order: layer 0's q_proj and down_proj, then layer 1
    assert cells.reshape(3, 4).tolist() == [counts[MODULES.index(m)] for m in order]


def test_a_callback_jsonl_is_a_run_too(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text(_line(5, [1.0, 0.5]) + "\n" + _line(10, [1.0, 0.9]) + "\n")
    result = plot("trajectory", path, "-o", tmp_path / "t.svg")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "t.svg").read_bytes().startswith(b"<?xml")
    assert "drift is not available" in result.stderr  # the trajectory's own note


@pytest.fixture(scope="module")
def bad_inputs(run, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("plot-bad")
    adapter = write_lora(root / "adapter", {MODULES[0]: random_factors(HIDDEN, HIDDEN, RANK, 0)}, lora_config())
    jsonl = root / "log.jsonl"
    jsonl.write_text(_line(5, [1.0, 0.5]) + "\n")
    return {"run": run, "adapter": adapter, "log.jsonl": jsonl}


BAD = [
    (("trajectory", "run", "--labels", "a"), 2, ("--labels",)),
    (("trajectory-heatmap", "run", "--layer", MODULES[0]), 2, ("--layer",)),
    (("drift", "run", "--metric", "erank"), 2, ("--metric", "not drift")),
    (("trajectory", "run", "--drift-k", "2"), 2, ("--drift-k", "not trajectory")),
    (("drift", "run", "--drift-k", "0"), 2, ("--drift-k",)),
    (("trajectory", "run", "--vmin", "0"), 2, ("--vmin",)),
    (("trajectory-heatmap", "run", "adapter"), 2, ("is a run folder",)),
    (("drift", "log.jsonl", "adapter"), 2, ("read on its own",)),
    (("trajectory", "adapter"), 1, ("not a training run",)),
    (("trajectory", "missing-run"), 1, ("missing-run", "no such file")),
    (("drift", "log.jsonl"), 1, ("no drift",)),
    (("trajectory", "run", "--metric", "bogus"), 1, ("unknown metric",)),
    (("trajectory-heatmap", "run", "--metric", "count_above[0.02]"), 1, ("count_above[0.02]", "--threshold")),
]


@pytest.mark.parametrize(("args", "code", "words"), BAD, ids=[" ".join(b[0]) for b in BAD])
def test_bad_input_leaves_no_file(args, code, words, bad_inputs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # "missing-run" is relative
    out = tmp_path / "fig.pdf"
    result = plot(*[str(bad_inputs[a]) if a in bad_inputs else a for a in args], "-o", out)
    one_line_error(result, code, *words)
    assert list(tmp_path.iterdir()) == []


def test_one_panel_figures_draw_into_the_callers_axes(run):
    """figures/_panel.one_axes, shared by the trajectory and zoo figures: one Axes given, its figure returned;
    two, refused."""
    from matplotlib.figure import Figure

    from rankscope.figures import FigureInputError
    from rankscope.figures import trajectory as F
    from rankscope.figures.zoo import distribution_figure

    result = checkpoint_trajectory(run_checkpoints(run))
    fig = Figure()
    ax = fig.subplots()
    assert F.drift_figure(result, ax=ax) is fig and len(ax.get_lines()) == 3
    other = Figure()
    assert distribution_figure({"r=4": [1.0, 2.0]}, value_label="erank", group_label="r", ax=other.subplots()) is other
    with pytest.raises(FigureInputError, match="draws 1 panel here; ax= gave 2 axes"):
        F.metric_by_step_figure(result, "erank", ax=Figure().subplots(1, 2))


def _top_k_overlap(w_a: torch.Tensor, w_b: torch.Tensor, k: int) -> float:
    """‖U_a,kᵀ U_b,k‖_F² / k from dense float64 SVDs: the overlap of the top-k left singular subspaces."""
    u_a, u_b = torch.linalg.svd(w_a)[0][:, :k], torch.linalg.svd(w_b)[0][:, :k]
    return float((u_a.T @ u_b).pow(2).sum()) / k


def test_drift_k_is_the_k_of_the_drift_drawn(run, tmp_path, monkeypatch):
    """``plot drift --drift-k 1`` draws the mean over layers of 1 − (left + right overlap)/2 of the top singular
    vector alone, from dense float64 SVDs of each checkpoint's B·A; without it the drift of all r = 4 differs."""
    from rankscope.figures import trajectory as F

    drawn = []
    real = F.drift_figure
    monkeypatch.setattr(F, "drift_figure", lambda t, **kw: drawn.append(real(t, **kw)) or drawn[-1])

    def previous_line(*extra) -> list[float]:
        result = plot("drift", run, "-o", tmp_path / "d.svg", "-q", *extra)
        assert result.exit_code == 0, result.output
        fig = drawn.pop()
        legend = [t.get_text() for t in fig.legends[0].get_texts()]
        line = fig.axes[0].get_lines()[legend.index("subspace drift vs t−1")]
        assert list(line.get_xdata()) == [200, 300, 400]
        return list(line.get_ydata())

    entries = run_checkpoints(run)
    expected = []
    for (_, before), (_, now) in itertools.pairwise(entries):
        drifts = []
        for module in MODULES:
            w_now, w_before = _dense(now, module), _dense(before, module)
            left, right = _top_k_overlap(w_now, w_before, 1), _top_k_overlap(w_now.T, w_before.T, 1)
            drifts.append(1 - (left + right) / 2)
        expected.append(sum(drifts) / len(drifts))
    top_one = previous_line("--drift-k", "1")
    assert top_one == pytest.approx(expected, abs=1e-9)
    assert previous_line()[:2] != pytest.approx(top_one[:2], abs=1e-3)  # the option changes what is drawn
