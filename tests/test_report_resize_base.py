"""The report's suggested ranks (issue 16) and its measures against the base (issue 18).

References: the bundled trained LoRA r=32 read here with safetensors, ΔW = (α/r)·B·A in float64 and its dense
float64 SVD (``torch.linalg.svdvals``) with the energy rule written here (the smallest k with
Σ_{i≤k}σ²/Σσ² ≥ P); the relative update ‖ΔW‖_F/‖W₀‖_F from the bundled tiny base's weights; the base columns and
the heatmap's cells against the records in the report's own summary.json.
"""

from __future__ import annotations

import csv
import html
import json
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import rankscope
from rankscope.cli import main

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "checkpoints"
ADAPTER = EXAMPLES / "adapters" / "lora-r32"
BASE = EXAMPLES / "tiny-base"


def reference_deltas() -> dict[str, torch.Tensor]:
    """Layer name → ΔW = (α/r)·B·A in float64, straight from the adapter's files."""
    config = json.loads((ADAPTER / "adapter_config.json").read_text())
    assert not config.get("use_rslora") and not config.get("rank_pattern") and not config.get("alpha_pattern")
    scale = config["lora_alpha"] / config["r"]
    tensors = load_file(str(ADAPTER / "adapter_model.safetensors"))
    deltas = {}
    for key, a in tensors.items():
        if key.endswith(".lora_A.weight"):
            name = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            b = tensors[key.replace("lora_A", "lora_B")]
            deltas[name] = scale * b.double() @ a.double()
    return deltas


def energy_rank(delta: torch.Tensor, fraction: float) -> int:
    """The smallest k with Σ_{i≤k}σ²/Σσ² ≥ P, σ from a dense float64 SVD."""
    energy = torch.linalg.svdvals(delta) ** 2
    kept = torch.cumsum(energy, 0) / energy.sum()
    return int(torch.nonzero(kept >= fraction)[0]) + 1


def layer_table(page: str) -> tuple[list[str], list[list[tuple[str, str | None]]]]:
    """The page's layer table: its column titles and, per row, (text, data-v) of each cell."""
    block = page.split('id="layer-table"')[1].split("</table>")[0]
    head, body = block.split("</thead>")
    titles = [html.unescape(re.sub("<[^>]+>", "", t)) for t in re.findall(r"<th [^>]*>(.*?)</th>", head)]
    rows = []
    for row in re.findall(r"<tr[^>]*>(.*?)</tr>", body):
        cells = re.findall(r"<td([^>]*)>(.*?)</td>", row)
        rows.append(
            [
                (html.unescape(re.sub("<[^>]+>", "", text)), (re.findall(r'data-v="([^"]*)"', attrs) or [None])[0])
                for attrs, text in cells
            ]
        )
    return titles, rows


@pytest.fixture(scope="module")
def based(tmp_path_factory) -> Path:
    """``rankscope report`` of the trained LoRA r=32 with ``--base`` and the default rule (energy:0.95)."""
    out = tmp_path_factory.mktemp("resize_base") / "report"
    result = CliRunner().invoke(main, ["report", str(ADAPTER), "--base", str(BASE), "-o", str(out), "-q",
                                       "--figures", "svg"])  # fmt: skip
    assert result.exit_code == 0, result.output
    return out


def test_suggested_ranks_match_a_dense_svd_energy_rule(based):
    expected = {name: energy_rank(delta, 0.95) for name, delta in reference_deltas().items()}
    assert len(expected) == 12 and len(set(expected.values())) > 3  # the layers differ: the test can tell them apart

    titles, rows = layer_table((based / "index.html").read_text())
    column = titles.index("suggested r")
    assert {row[0][0]: int(row[column][1]) for row in rows} == expected

    with open(based / "layers.csv", newline="") as handle:
        records = list(csv.DictReader(handle))
    assert {r["name"]: int(r["suggested_rank[energy:0.95]"]) for r in records} == expected

    markdown = (based / "summary.md").read_text()
    assert "suggested r (energy:0.95)" in markdown
    for name, rank in expected.items():
        line = next(x for x in markdown.splitlines() if x.startswith(f"| {name.replace('_', chr(92) + '_')} |"))
        assert line.split("|")[8].strip() == str(rank)

    assert (based / "figures" / "resize.svg").is_file()
    page = (based / "index.html").read_text()
    assert "Energy kept against total rank" in page and "energy:0.95" in page


def test_base_columns_and_heatmap_hold_the_records(based):
    document = json.loads((based / "summary.json").read_text())
    records = {layer["name"]: layer["base"] for layer in document["layers"]}
    titles, rows = layer_table((based / "index.html").read_text())
    columns = [titles.index(t) for t in ("‖ΔW‖/‖W₀‖", "σ₁/σ₁(W₀)", "amplification", "intruders")]
    for row in rows:
        base = records[row[0][0]]
        shown = [float(row[c][1]) for c in columns]
        expected = [base["relative_update"], base["relative_sigma_max"], base["amplification"],
                    base["intruders"]["count"]]  # fmt: skip
        assert shown == [float(v) for v in expected]  # exact: the cells carry repr of the record's values
        assert row[columns[3]][0] == f"{base['intruders']['count']}/{base['intruders']['top_k']}"
    assert sum(base["intruders"]["count"] for base in records.values()) > 0  # the counts are not all zero

    # the relative update is ‖ΔW‖_F/‖W₀‖_F with W₀ read from the base here
    weights = load_file(str(BASE / "model.safetensors"))
    for name, delta in reference_deltas().items():
        w0 = weights[f"{name}.weight"].double()
        assert records[name]["relative_update"] == pytest.approx(
            float(torch.linalg.matrix_norm(delta) / torch.linalg.matrix_norm(w0)), rel=1e-9
        )

    with open(based / "layers.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            assert float(row["relative_update"]) == records[row["name"]]["relative_update"]
            assert int(row["intruders"]) == records[row["name"]]["intruders"]["count"]

    # the heatmap's cells are the records' values (drawn from the report model's figure spec)
    from rankscope.report.build import build_report
    from rankscope.report.drawing import _figure

    analysis = rankscope.analyze(rankscope.load(ADAPTER, base=BASE))
    report = build_report([analysis], ["lora-r32"])
    (spec,) = [s for s in report.figures if s.kind == "base-heatmap"]
    fig = _figure(spec, [analysis], ["lora-r32"])
    # a block's panel title is a text of its Axes (one Axes per block, issue 15)
    panels = {t.get_text(): ax.collections[0].get_array().compressed().tolist() for ax in fig.axes for t in ax.texts}
    assert sorted(panels["‖ΔW‖ / ‖W₀‖ (Frobenius)"]) == sorted(b["relative_update"] for b in records.values())
    counts = sorted(float(b["intruders"]["count"]) for b in records.values())
    assert sorted(panels["intruder dimensions (of the top 10)"]) == counts
    assert (based / "figures" / "base-heatmap.svg").is_file()


def test_rule_none_leaves_the_suggestion_out_and_no_base_no_base_columns(tmp_path):
    out = tmp_path / "plain"
    result = CliRunner().invoke(main, ["report", str(ADAPTER), "-o", str(out), "-q", "--suggest-rule", "none",
                                       "--figures", "svg"])  # fmt: skip
    assert result.exit_code == 0, result.output
    titles, _ = layer_table((out / "index.html").read_text())
    assert "suggested r" not in titles and "intruders" not in titles and titles[-1] == "status"
    header = (out / "layers.csv").read_text().splitlines()[0]
    assert "suggested_rank" not in header and "intruders" not in header
    assert "suggested r" not in (out / "summary.md").read_text()
    figures = {p.stem for p in (out / "figures").iterdir()}
    assert "resize" not in figures and "base-heatmap" not in figures and "erank-heatmap" in figures


@pytest.mark.parametrize("rule", ["energy:1.5", "bogus", "fixed:-2"])
def test_bad_rule_exits_2_before_reading(tmp_path, rule):
    out = tmp_path / "never"
    result = CliRunner().invoke(main, ["report", str(tmp_path / "missing"), "-o", str(out), "--suggest-rule", rule])
    assert result.exit_code == 2, result.output
    assert "--suggest-rule" in result.output and "energy:P" in result.output
    assert not out.exists()


def test_several_checkpoints_get_one_resize_figure_with_a_panel_each(based):
    from rankscope.report.build import build_report
    from rankscope.report.drawing import _figure
    from rankscope.resize.suggest import suggest

    r32 = rankscope.analyze(rankscope.load(ADAPTER))
    r8 = rankscope.analyze(rankscope.load(EXAMPLES / "adapters" / "lora-r8"))
    report = build_report([r32, r8], ["r32", "r8"], suggest_rule="fixed:4")
    (resize,) = [s for s in report.figures if s.kind == "resize"]
    assert (resize.id, resize.members) == ("resize", (0, 1))
    assert "fixed:4" in resize.rules and not any(s.kind == "base-heatmap" for s in report.figures)
    # each panel is its checkpoint's: the rule's point at the total rank and retained energy suggest() gives
    fig = _figure(resize, [r32, r8], ["r32", "r8"])
    panels = {ax.get_title(loc="left"): ax for ax in fig.axes}
    assert set(panels) == {"r32", "r8"}
    for label, analysis in (("r32", r32), ("r8", r8)):
        want = suggest(analysis, "fixed:4")
        points = {(float(line.get_xdata()[0]), float(line.get_ydata()[0]))
                  for line in panels[label].lines if len(line.get_xdata()) == 1}  # fmt: skip
        total = sum(layer.rank for layer in want.layers)
        assert any(x == total and y == pytest.approx(want.retained_energy) for x, y in points)
    column = [c.title for c in report.layers.columns].index("suggested r")
    assert {row.cells[column].value for row in report.layers.rows} == {4}
    assert len(report.layers.rows) == len(r32.layers) + len(r8.layers)


def test_plot_kinds_resize_and_base_heatmap(tmp_path):
    runner = CliRunner()
    for kind, extra in (("resize", []), ("base-heatmap", ["--base", str(BASE)])):
        out = tmp_path / f"{kind}.svg"
        result = runner.invoke(main, ["plot", kind, str(ADAPTER), "-o", str(out), "-q", *extra])
        assert result.exit_code == 0, result.output
        assert out.read_text().startswith("<?xml") or "<svg" in out.read_text()
    result = runner.invoke(main, ["plot", "base-heatmap", str(ADAPTER), "-o", str(tmp_path / "no.svg"), "-q"])
    assert result.exit_code == 1 and "--base" in result.output
    assert not (tmp_path / "no.svg").exists()


def test_base_heatmap_of_several_checkpoints_one_scale_per_measure():
    """Several checkpoints against the base: one figure, a panel per checkpoint and measure, each measure on one
    colour scale (0 … the largest relative update of any checkpoint; 0 … k for intruders) with one colour bar."""
    from matplotlib.collections import QuadMesh

    from rankscope import figures

    analyses = [
        rankscope.analyze(rankscope.load(path, base=BASE)) for path in (ADAPTER, EXAMPLES / "adapters" / "lora-r8")
    ]
    fig = figures.base_heatmap_figure(analyses, ["r32", "r8"])
    bars = [ax for ax in fig.axes if hasattr(ax, "_colorbar")]
    blocks = [ax for ax in fig.axes if ax not in bars]  # one Axes per measure, its panels side by side in one mesh
    assert len(blocks) == 2 and len(bars) == 2
    assert [t.get_text() for ax in blocks for t in ax.texts] == ["r32", "r8", "r32", "r8"]
    meshes = [next(c for c in ax.collections if isinstance(c, QuadMesh)) for ax in blocks]
    assert [bar._colorbar.mappable for bar in bars] == meshes
    relative = [sorted(r.base["relative_update"] for r in a.layers if r.valid) for a in analyses]
    intruders = [sorted(float(r.base["intruders"]["count"]) for r in a.layers if r.valid) for a in analyses]
    columns = len({r.layer_index for a in analyses for r in a.layers})
    for mesh, want in zip(meshes, (relative, intruders), strict=True):
        values = mesh.get_array()  # the two panels, then a masked gap column between them
        panels = [values[:, :columns], values[:, columns + 1 :]]
        assert values[:, columns].mask.all()
        assert [sorted(p.compressed().tolist()) for p in panels] == [pytest.approx(w) for w in want]
    top = max(max(values) for values in relative)
    assert meshes[0].get_clim() == (0.0, pytest.approx(top))
    assert meshes[1].get_clim() == (0.0, 10.0)  # the top k of the intruder count
    # the labels as read (wrapped onto lines no longer than their bars)
    assert [" ".join(bar.get_ylabel().split()) for bar in bars] == [
        "‖ΔW‖ / ‖W₀‖ (Frobenius)",
        "intruder dimensions (of the top 10)",
    ]
