"""``rankscope report`` over a sweep folder and over a training run directory: the page's tables hold the sweep's rows
(read back with pandas) and ``rankscope trajectory --json``'s values; a planted all-zero layer is an outlier; bad
input is one line and an exit code, nothing written."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from rankscope.cli import main
from tests.factories import lora_config, random_factors, write_lora

pandas = pytest.importorskip("pandas", reason="the sweep tables need pandas (the sweep extra)")
pytest.importorskip("pyarrow", reason="Parquet tables need pyarrow (the sweep extra)")

RUN = Path(__file__).resolve().parent.parent / "examples" / "checkpoints" / "trajectory"
DEAD = ("lora-1", "model.layers.1.self_attn.v_proj")
CHROMIUM = Path("/usr/bin/chromium")  # Debian's chromium, as tests/test_report_browser.py drives it
BROWSER_FLAGS = ["--no-sandbox", "--disable-background-networking", "--disable-component-update"]


class Tables(HTMLParser):
    """Every ``<table id=…>``'s header and rows: numbers as their exact ``data-v``, text as shown."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, dict] = {}
        self._table = self._row = self._cell = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table" and "id" in attrs:
            self._table = self.tables.setdefault(attrs["id"], {"head": [], "rows": []})
        elif self._table is not None and tag == "tr":
            self._row = []
        elif self._table is not None and tag in ("td", "th"):
            self._cell = {"v": attrs.get("data-v"), "text": ""}

    def handle_data(self, data):
        if self._cell is not None:
            self._cell["text"] += data

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None and self._row is not None:
            self._row.append(self._cell)
            self._cell = None
        elif tag == "tr" and self._row is not None:
            if all(c["v"] is None for c in self._row) and not self._table["head"]:
                self._table["head"] = [c["text"].strip().rstrip("▲▼ ") for c in self._row]
            else:
                self._table["rows"].append(self._row)
            self._row = None
        elif tag == "table":
            self._table = None


def tables(page: Path) -> dict[str, list[dict]]:
    parser = Tables()
    parser.feed(page.read_text(encoding="utf-8"))
    out = {}
    for name, t in parser.tables.items():
        out[name] = [
            {h: (float(c["v"]) if c["v"] is not None else c["text"].strip()) for h, c in zip(t["head"], r, strict=True)}
            for r in t["rows"]
        ]
    return out


def invoke(*args):
    return CliRunner().invoke(main, [*map(str, args)], catch_exceptions=False)


@pytest.fixture(scope="module")
def swept(tmp_path_factory) -> Path:
    """Four LoRAs (r = 2, 4, 8, 8) and a damaged one swept to Parquet; lora-1's ``v_proj`` of block 1 has B = 0
    (a dead layer)."""
    root = tmp_path_factory.mktemp("zoo")
    for seed, rank in enumerate((2, 4, 8, 8)):
        modules = {f"model.layers.{i}.self_attn.{name}": random_factors(12, 12, rank, 100 * seed + 10 * i + j)
                   for i in range(2) for j, name in enumerate(("q_proj", "v_proj"))}  # fmt: skip
        if f"lora-{seed}" == DEAD[0]:
            a, b = modules[DEAD[1]]
            modules[DEAD[1]] = (a, torch.zeros_like(b))
        write_lora(root / "zoo" / f"lora-{seed}", modules, lora_config(r=rank, lora_alpha=2 * rank))
    broken = root / "zoo" / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text(json.dumps(lora_config(r=4)))
    (broken / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    result = invoke("sweep", root / "zoo", "-o", root / "out", "--jobs", "1", "-q")
    assert result.exit_code == 0, result.output  # a failed checkpoint is a row of the tables and a warning
    return root / "out"


def test_sweep_report_tables_are_the_sweeps_rows_and_the_dead_layer_is_an_outlier(swept, tmp_path):
    out = tmp_path / "report"
    result = invoke("report", swept, "-o", out, "--figures", "svg")
    assert result.exit_code == 0, result.output
    assert {p.name for p in out.iterdir()} == {"index.html", "outliers.csv", "checkpoints.csv", "figures",
                                               ".rankscope-report"}  # fmt: skip
    assert sorted(p.name for p in (out / "figures").iterdir()) == [
        "erank_vs_r.svg", "utilization_by_family.svg", "utilization_by_module.svg", "utilization_by_r.svg"]  # fmt: skip
    page = tables(out / "index.html")
    checkpoints = pandas.read_parquet(swept / "checkpoints.parquet").set_index("id")
    layers = pandas.read_parquet(swept / "layers.parquet")
    means = layers[layers["valid"]].groupby("id")[["utilization", "erank"]].mean()
    shown = {row["id"]: row for row in page["checkpoint-table"]}
    assert sorted(shown) == sorted(checkpoints.index)
    for name, row in shown.items():
        assert row["status"] == checkpoints.loc[name, "status"]
        assert row["seconds"] == checkpoints.loc[name, "seconds"]
        if name == "broken":
            assert row["status"] == "error" and row["mean erank"] == "—"
            continue
        assert row["r"] == checkpoints.loc[name, "r"]
        assert row["layers"] == checkpoints.loc[name, "layers"]
        assert row["mean utilization"] == pytest.approx(means.loc[name, "utilization"], rel=1e-12)
        assert row["mean erank"] == pytest.approx(means.loc[name, "erank"], rel=1e-12)
    # the outliers are exactly the planted layer (every other layer is a full-rank random product) and the failure
    dead, failed = page["outlier-table"]
    assert (dead["id"], dead["layer"], dead["what"]) == (*DEAD, "dead")
    assert dead["sigma_max"] == 0 and dead["r"] == 4
    assert (failed["id"], failed["what"]) == ("broken", "error")
    assert failed["detail"] == checkpoints.loc["broken", "error"] != ""
    assert "2 outliers" in result.output


def test_sweep_report_bad_input_is_one_line(swept, tmp_path):
    result = invoke("report", swept, "-o", tmp_path / "r", "--threshold", "0.1")
    assert result.exit_code == 2 and "does not apply to a sweep folder" in result.output
    assert not (tmp_path / "r").exists()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "layers.csv").write_text("id,layer\n")
    (broken / "checkpoints.csv").write_bytes(b"\xff\xfe\x00garbage")
    result = invoke("report", broken, "-o", tmp_path / "r2")
    assert result.exit_code == 1
    assert len(result.output.strip().splitlines()) == 1 and "checkpoints.csv" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "r2").exists()
    result = invoke("report", swept, "-o", swept)  # over its own input
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1


def test_run_report_has_the_trajectory_of_rankscope_trajectory(tmp_path):
    reference = tmp_path / "t.json"
    result = invoke("trajectory", RUN, "--json", reference, "-q")
    assert result.exit_code == 0, result.output
    expected = json.loads(reference.read_text())
    out = tmp_path / "run-report"
    result = invoke("report", RUN, "-o", out, "--figures", "none", "-q")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "trajectory.json").read_text()) == expected
    assert (out / "final" / "index.html").is_file() and (out / "final" / "summary.json").is_file()
    final = json.loads((out / "final" / "summary.json").read_text())
    assert final["checkpoint"]["path"] == expected["checkpoints"][-1]["path"]
    last = {r["name"]: r["metrics"] for r in expected["checkpoints"][-1]["layers"]}
    assert {r["name"]: r["metrics"] for r in final["layers"]} == last
    rows = tables(out / "index.html")["step-table"]
    assert [r["step"] for r in rows] == expected["steps"] and len(rows) == 12
    assert [r["σ > τ (all layers)"] for r in rows] == expected["headlines"]["rank_counts"]
    drift = {d["step"]: d for d in expected["step_drift"]}
    for row in rows[1:]:
        assert row["drift vs t−1"] == drift[row["step"]]["drift_previous"]
        assert row["drift vs final"] == drift[row["step"]]["drift_final"]
        assert row["relative change"] == drift[row["step"]]["relative_change"]
    assert rows[0]["drift vs t−1"] == "—"
    heads = expected["headlines"]
    text = (out / "index.html").read_text()
    assert f"<b>{heads['settled_step']}</b><span>settled from step" in text
    assert f"<b>{heads['saturation_step']}</b><span>rank saturated at step" in text


def test_report_of_a_missing_path_or_labels_for_a_run_is_one_line(tmp_path):
    result = invoke("report", tmp_path / "nope", "-o", tmp_path / "r")
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1
    result = invoke("report", RUN, "-o", tmp_path / "r", "--labels", "a")
    assert result.exit_code == 2 and "--labels" in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_sweep_report_sorts_in_a_browser(swept, tmp_path):
    """The page's own script sorts the per-checkpoint table by r (headless Chromium, as test_report_browser.py)."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing (scripts/install-browser.sh installs it)")
    sync = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    out = tmp_path / "report"
    assert invoke("report", swept, "-o", out, "--figures", "none", "-q").exit_code == 0
    expected = sorted(pandas.read_parquet(swept / "checkpoints.parquet")["r"].dropna())
    column = 1 + list(tables(out / "index.html")["checkpoint-table"][0]).index("r")
    with sync.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=BROWSER_FLAGS)
        try:
            page = browser.new_page()
            page.goto((out / "index.html").as_uri())
            page.click("#checkpoint-table th:text-is('r')")
            shown = page.eval_on_selector_all(
                f"#checkpoint-table tbody tr td:nth-child({column})", "cells => cells.map(c => c.dataset.v ?? null)"
            )
        finally:
            browser.close()
    assert [float(v) for v in shown[:-1]] == expected and shown[-1] is None  # the failed checkpoint sorts last


def test_a_run_report_reads_and_analyses_each_checkpoint_once(tmp_path, monkeypatch):
    """The final checkpoint's analysis serves final/ and the trajectory's last step: every checkpoint is loaded
    once and analysed once (counted where every load and analysis goes through)."""
    import importlib

    analyze_module = importlib.import_module("rankscope.analysis.analyze")  # the package re-exports analyze()
    formats_module = importlib.import_module("rankscope.formats")

    run = tmp_path / "run"
    for step in (10, 20, 30):
        modules = {f"model.layers.0.self_attn.{name}": random_factors(12, 12, 2, step + i)
                   for i, name in enumerate(("q_proj", "v_proj"))}  # fmt: skip
        write_lora(run / f"checkpoint-{step}", modules, lora_config(r=2))
    loaded, analysed = [], []
    load, inner = formats_module.load, analyze_module._analyze
    monkeypatch.setattr(formats_module, "load", lambda path, **kw: loaded.append(Path(path).name) or load(path, **kw))
    monkeypatch.setattr(analyze_module, "_analyze", lambda c, *a: analysed.append(Path(c.path).name) or inner(c, *a))
    result = invoke("report", run, "-o", tmp_path / "r", "--figures", "none", "-q")
    assert result.exit_code == 0, result.output
    assert sorted(loaded) == sorted(analysed) == ["checkpoint-10", "checkpoint-20", "checkpoint-30"]
    final = json.loads((tmp_path / "r" / "final" / "summary.json").read_text())
    trajectory = json.loads((tmp_path / "r" / "trajectory.json").read_text())
    last = trajectory["checkpoints"][-1]["layers"]
    assert [r["singular_values"] for r in final["layers"]] == [r["singular_values"] for r in last]


def test_trajectory_o_writes_the_run_report_page_without_final(tmp_path):
    """One implementation: ``trajectory RUN -o`` and ``report RUN`` write the same page (but for the link to
    final/), the same figures byte for byte and the same trajectory.json and trajectory.csv."""
    import re

    report, alone = tmp_path / "report", tmp_path / "alone"
    assert invoke("report", RUN, "-o", report, "--figures", "svg", "-q").exit_code == 0
    assert invoke("trajectory", RUN, "-o", alone, "--figures", "svg", "-q").exit_code == 0
    assert sorted(p.name for p in report.iterdir()) == sorted([*(p.name for p in alone.iterdir()), "final"])
    for name in ("trajectory.json", "trajectory.csv"):
        assert (report / name).read_bytes() == (alone / name).read_bytes(), name
    figures = sorted(p.name for p in (alone / "figures").iterdir())
    assert figures == ["count_by_step.svg", "drift.svg", "erank_by_step.svg", "erank_heatmap.svg"]
    for name in figures:
        assert (report / "figures" / name).read_bytes() == (alone / "figures" / name).read_bytes(), name
    page = (report / "index.html").read_text()
    link = '<a href="final/index.html">Final checkpoint</a>'
    about = re.compile(r"<p>The final checkpoint \(<code>[^<]*</code>, step 300\) has the full report: "
                       r'<a href="final/index.html">final/index.html</a>\.</p>')  # fmt: skip
    assert link in page and about.search(page)
    assert about.sub("", page.replace(link, "")) == (alone / "index.html").read_text()


def test_run_report_takes_the_drift_options_of_rankscope_trajectory(tmp_path):
    """``report RUN --drift-k K --drift-threshold D`` writes the trajectory ``trajectory --drift-k K
    --drift-threshold D --json`` does (the k and the threshold reach the drift and the headlines), not the
    default's."""
    options = ("--drift-k", "1", "--drift-threshold", "0.5")
    reference, default = tmp_path / "t.json", tmp_path / "default.json"
    assert invoke("trajectory", RUN, "--json", reference, "-q", *options).exit_code == 0
    assert invoke("trajectory", RUN, "--json", default, "-q").exit_code == 0
    expected = json.loads(reference.read_text())
    assert expected["headlines"]["drift_threshold"] == 0.5
    assert expected["step_drift"] != json.loads(default.read_text())["step_drift"]  # k = 1 is not the default k
    out = tmp_path / "run-report"
    result = invoke("report", RUN, "-o", out, "--figures", "none", "-q", *options)
    assert result.exit_code == 0, result.output
    assert json.loads((out / "trajectory.json").read_text()) == expected
    settled = expected["headlines"]["settled_step"]
    assert "stays below 0.5" in (out / "index.html").read_text() and settled is not None


def test_drift_options_are_refused_where_there_is_no_run(swept, tmp_path):
    adapter = write_lora(tmp_path / "adapter", {"model.layers.0.self_attn.q_proj": random_factors(8, 8, 2, 0)},
                         lora_config(r=2))  # fmt: skip
    for option in (("--drift-k", "2"), ("--drift-threshold", "0.1")):
        result = invoke("report", adapter, "-o", tmp_path / "r", *option)
        assert result.exit_code == 2 and f"{option[0]} applies to a training run's report" in result.output
        assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "r").exists()
        result = invoke("report", swept, "-o", tmp_path / "r", *option)
        assert result.exit_code == 2 and f"{option[0]} does not apply to a sweep folder" in result.output


def test_the_cli_drift_threshold_default_is_the_library_default():
    from rankscope.cli.options import DRIFT_THRESHOLD
    from rankscope.trajectory.document import DEFAULT_DRIFT_THRESHOLD

    assert DRIFT_THRESHOLD == DEFAULT_DRIFT_THRESHOLD
