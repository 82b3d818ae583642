"""``rankscope report``: the self-contained HTML page, the report folder, and the command.

The page is parsed here with the standard library's HTML parser (what a browser would build from it): hostile
checkpoint strings must arrive as text, never as elements; nothing may be fetched; each figure and table must
hold the records' own values. The per-layer plots are checked against spectra and cumulative energies computed
here from the stored factors. The real-browser checks are in ``test_report_browser.py``.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import math
import os
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import rankscope
from rankscope.analysis.comparison import compare
from rankscope.cli import main
from rankscope.core import forked
from rankscope.core.errors import RankscopeError
from rankscope.core.forked import fork_available
from rankscope.figures.style import PALETTE
from rankscope.report import bundle, drawing
from rankscope.report.bundle import MARKER, check_target, write_report
from rankscope.report.html import figure_slots, inline_svg, layer_svg, report_html
from rankscope.report.model import SeriesView, cumulative_energy

from .factories import llama_like, lora_config, random_factors, write_lora

HOSTILE = ("<img src=x onerror=alert(1)>", "<script>alert(2)</script>")
SAFE_ID = re.compile(r"^[A-Za-z0-9_.-]+$")


# -- parsing the page -----------------------------------------------------------------------------------------
class Page(HTMLParser):
    """Elements (tag, attributes), text outside scripts and styles, and the scripts' and styles' own text."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.elements: list[tuple[str, dict]] = []
        self.texts: list[str] = []
        self.scripts: list[str] = []
        self.styles: list[str] = []
        self._inside: list[str] = []
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.elements.append((tag, dict(attrs)))
        if tag in ("script", "style"):
            self._inside.append(tag)

    def handle_endtag(self, tag):
        if self._inside and self._inside[-1] == tag:
            self._inside.pop()

    def handle_data(self, data):
        if not self._inside:
            self.texts.append(data)
        elif self._inside[-1] == "script":
            self.scripts.append(data)
        else:
            self.styles.append(data)

    @property
    def text(self) -> str:
        return "".join(self.texts)

    def tags(self, name: str) -> list[dict]:
        return [attrs for tag, attrs in self.elements if tag == name]


def table_rows(page_text: str, table_id: str) -> list[list[tuple[str, dict]]]:
    """The body rows of one table: each cell as (text, attributes)."""

    class Rows(HTMLParser):
        def __init__(self):
            super().__init__(convert_charrefs=True)
            self.inside = False
            self.body = False
            self.rows: list[list[list]] = []
            self.cell: list | None = None

        def handle_starttag(self, tag, attrs):
            attrs = dict(attrs)
            if tag == "table":
                self.inside = attrs.get("id") == table_id
            elif self.inside and tag == "tbody":
                self.body = True
            elif self.inside and self.body and tag == "tr":
                self.rows.append([])
            elif self.inside and self.body and tag == "td":
                self.cell = ["", attrs]
                self.rows[-1].append(self.cell)

        def handle_endtag(self, tag):
            if tag == "table":
                self.inside = self.body = False
            elif tag == "td":
                self.cell = None

        def handle_data(self, data):
            if self.cell is not None:
                self.cell[0] += data

    parser = Rows()
    parser.feed(page_text)
    return [[(text, attrs) for text, attrs in row] for row in parser.rows]


def assert_self_contained(text: str) -> Page:
    """No element that fetches anything; links only within the page or to the report's own files; a CSP that
    forbids requests and allows exactly the page's own script, by its hash."""
    page = Page(text)
    tags = {tag for tag, _ in page.elements}
    assert not tags & {"img", "iframe", "link", "object", "embed", "audio", "video", "source", "base", "form"}
    for tag, attrs in page.elements:
        assert "src" not in attrs, (tag, attrs)
        assert not any(name.startswith("on") for name in attrs), (tag, attrs)
        for name in ("href", "xlink:href"):
            target = attrs.get(name)
            if target is not None and not (tag == "image" and target.startswith("data:image/png;base64,")):
                assert not re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I), (tag, target)  # no scheme: no http:, data:
                assert not target.startswith("//"), target
    for style in page.styles:
        assert "url(" not in style.replace("url(#", "") and "@import" not in style
    assert len(page.tags("script")) == 1
    policy = next(
        attrs["content"] for attrs in page.tags("meta") if attrs.get("http-equiv") == "Content-Security-Policy"
    )
    digest = base64.b64encode(hashlib.sha256(page.scripts[0].encode()).digest()).decode()
    assert f"script-src 'sha256-{digest}'" in policy and "default-src 'none'" in policy
    assert "connect-src" not in policy and "unsafe-eval" not in policy
    return page


# -- checkpoints ----------------------------------------------------------------------------------------------
def fake_svg(slot_id: str) -> str:
    """What a matplotlib SVG looks like to the page: a prolog, ids, references to them, a global style rule."""
    return (
        '<?xml version="1.0" encoding="utf-8" standalone="no"?>\n<!DOCTYPE svg PUBLIC "-//W3C//DTD SVG 1.1//EN" '
        '"http://www.w3.org/Graphics/SVG/1.1/DTD/svg11.dtd">\n<!-- Created with matplotlib -->\n'
        '<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" width="234pt" '
        'height="144pt" viewBox="0 0 234 144"><defs><style type="text/css">*{stroke-linecap: butt}</style>'
        '<clipPath id="p0"><rect width="234" height="144"/></clipPath><path id="g1" d="M0 0h1"/></defs>'
        f'<g clip-path="url(#p0)"><use xlink:href="#g1"/><text>{slot_id}</text></g></svg>\n'
    )


@pytest.fixture()
def quick_figures(monkeypatch):
    """For tests about the folder rather than the figures: stand-in SVGs instead of drawing (seconds each)."""

    def start(items, labels, slots, folder, formats, *, processes=1, helpers=None):
        return lambda progress=None: ({slot.id: fake_svg(slot.id) for slot in slots}, [])

    monkeypatch.setattr(bundle, "start_drawing", start)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    paths = {"lora": llama_like(root / "lora", layers=3, hidden=16, rank=4, seed=0)}
    paths["other"] = llama_like(root / "other", layers=3, hidden=16, rank=2, seed=50)
    factors = {f"model.layers.{i}.{name}": random_factors(12, 12, 3, 7 + i) for i, name in enumerate(HOSTILE)}
    factors["model.layers.0.self_attn.q_proj"] = random_factors(12, 12, 3, 9)
    a, _ = random_factors(12, 12, 3, 10)
    factors["model.layers.1.self_attn.v_proj"] = (a, torch.zeros(12, 3))  # a zero update: every σ is 0
    bad_a, bad_b = random_factors(12, 12, 3, 11)
    bad_b[0, 0] = float("nan")
    factors["model.layers.2.self_attn.k_proj"] = (bad_a, bad_b)  # not finite: an invalid layer
    config = lora_config(r=3, lora_alpha=6, target_modules=list(HOSTILE), note='"><script>alert(3)</script>')
    paths["hostile"] = write_lora(root / "hostile", factors, config)
    composition = root / "boost"
    for t, (rank, alpha) in enumerate(((2, 4.0), (3, 3.0), (4, 16.0))):
        parts = {f"model.layers.{i}.self_attn.{m}": random_factors(10, 8, rank, 100 * t + 2 * i + j)
                 for i in range(2) for j, m in enumerate(("q_proj", "v_proj"))}  # fmt: skip
        write_lora(composition / f"round{t}", parts, lora_config(r=rank, lora_alpha=alpha))
    manifest = {"format": "rankscope.composition/1", "mode": "sequential", "components": ["round0", "round1", "round2"],
                "weights": [0.6, 0.3, 0.1], "normalize": "none"}  # fmt: skip
    (composition / "composition.json").write_text(json.dumps(manifest))
    paths["boost"] = composition
    return paths


@pytest.fixture(scope="module")
def analyses(adapters) -> dict[str, rankscope.Analysis]:
    return {name: rankscope.analyze(rankscope.load(path)) for name, path in adapters.items()}


def page_of(items, labels, comparison=None, **kwargs) -> tuple[str, list]:
    slots = figure_slots(items, labels, comparison)
    text = report_html(items, labels, comparison, {s.id: fake_svg(s.id) for s in slots}, **kwargs)
    return text, slots


# -- the page -------------------------------------------------------------------------------------------------
def test_hostile_strings_render_as_text_and_nothing_is_fetched(analyses):
    label = "<b onmouseover=alert(4)>x</b>"
    text, _ = page_of([analyses["hostile"]], [label])
    page = assert_self_contained(text)
    for name in (*HOSTILE, label, '"><script>alert(3)</script>'):
        assert name in page.text  # as text, unescaped once by the parser: the reader sees the name
    assert "model.layers.0.<img src=x onerror=alert(1)>" in page.text
    assert not page.tags("img") and all(not attrs for attrs in page.tags("b"))


def test_summary_tables_and_sortable_cells_hold_the_records_values(analyses):
    analysis = analyses["lora"]
    text, _ = page_of([analysis], ["lora"])
    page = assert_self_contained(text)
    assert "6/6" in page.text and f"{analysis.checkpoint.params:,}" in page.text
    rows = table_rows(text, "layer-table")
    assert len(rows) == len(analysis.layers) == 6
    header = ["layer", "module", "index", "m×n", "r≤", "σ₁", "‖ΔW‖F", "#σ>0.005", "erank", "stable rank",
              "90% energy", "utilisation", "status"]  # fmt: skip
    headers = re.findall(r"<th scope=\"col\" data-type=\"(\w+)\"[^>]*>(.*?)</th>", text.split('id="layer-table"')[1])
    assert [re.sub("<[^>]+>", "", h).replace("&gt;", ">") for _, h in headers[: len(header)]] == header
    for row, record in zip(rows, analysis.layers, strict=True):
        assert row[0][0] == record.name and row[1][0] == record.module_type
        metrics = record.metrics
        expected = [record.layer_index, 16 * 16, record.rank_bound, metrics["sigma_max"], metrics["frobenius"],
                    metrics["count_above"]["0.005"], metrics["erank"], metrics["stable_rank"],
                    metrics["energy_rank"]["0.9"], metrics["utilization"]]  # fmt: skip
        assert [float(cell[1]["data-v"]) for cell in row[2:12]] == [float(v) for v in expected]  # exact: repr
        assert row[12][0] == "ok"
    module_rows = table_rows(text, "modules-0")
    assert [r[0][0] for r in module_rows] == ["q_proj", "v_proj", "all"]
    erank = [r.metrics["erank"] for r in analysis.layers if r.module_type == "q_proj"]
    assert float(module_rows[0][5][1]["data-v"]) == pytest.approx(sum(erank) / len(erank), rel=1e-12)


def test_invalid_and_zero_layers_are_shown_for_what_they_are(analyses):
    text, _ = page_of([analyses["hostile"]], ["h"])
    page = Page(text)
    rows = {row[0][0]: row for row in table_rows(text, "layer-table")}
    assert rows["model.layers.2.self_attn.k_proj"][12][0] == "invalid"
    assert "data-v" not in rows["model.layers.2.self_attn.k_proj"][8][1]  # no erank: sorts last, shows —
    assert rows["model.layers.2.self_attn.k_proj"][8][0] == "—"
    assert "layer model.layers.2.self_attn.k_proj is invalid" in " ".join(page.text.split())
    assert "zero update: every σ is 0" in page.text
    assert rows["model.layers.1.self_attn.v_proj"][8][1]["data-v"] == "0.0"


def series(label: str, sigma: list[float], rank_bound: int, style: int = 0) -> SeriesView:
    return SeriesView(label, style, tuple(sigma), tuple(cumulative_energy(sigma)), rank_bound)


def _polylines(svg: str) -> list[list[tuple[float, float]]]:
    return [[tuple(map(float, p.split(","))) for p in points.split()]
            for points in re.findall(r'<polyline points="([^"]+)"', svg)]  # fmt: skip


def test_layer_plot_places_spectrum_thresholds_bound_and_cumulative_energy(adapters, analyses):
    """σ_i on a log axis (equal ratios, equal steps), τ between the σ above and below it, the rank bound at the
    last index, and the cumulative energy Σ_{i≤k}σ_i²/Σσ² — each against values computed here from the factors."""
    a, b = random_factors(16, 16, 4, 0)
    sigma = torch.linalg.svdvals(2.0 * b.double() @ a.double())[:4]  # α/r = 8/4
    record = analyses["lora"].layers[0]
    assert record.name == "model.layers.0.self_attn.q_proj"
    tau = float((sigma[1] + sigma[2]) / 2)  # a threshold inside the spectrum
    svg = layer_svg([series("x", record.singular_values, 4)], [tau], [0.9])
    spectrum, energy = _polylines(svg)
    ys = torch.tensor([y for _, y in spectrum], dtype=torch.float64)
    logs = torch.log10(sigma)
    slope = (ys[0] - ys[-1]) / (logs[0] - logs[-1])
    assert slope < 0
    assert torch.allclose(ys, ys[0] + slope * (logs - logs[0]), atol=0.15)  # 0.1 px rounding
    tau_y = float(re.search(r'<path d="M48 ([\d.]+)H318" stroke="#7b8794"', svg).group(1))
    assert abs(tau_y - float(ys[0] + slope * (math.log10(tau) - logs[0]))) < 0.15
    assert spectrum[1][1] < tau_y < spectrum[2][1]
    bound_x = float(re.search(r'<path d="M([\d.]+) 14V156" stroke="#b54708"', svg).group(1))
    assert bound_x == spectrum[3][0] and "r≤4" in svg
    cumulative = torch.cumsum(sigma**2, 0) / (sigma**2).sum()
    top, bottom = 14, 190 - 34
    expected = bottom - (bottom - top) * cumulative
    assert torch.allclose(torch.tensor([y for _, y in energy], dtype=torch.float64), expected, atol=0.06)
    # the first series' style of the paper figures (figures.style): its colour, solid, its marker on every point
    line = re.search(r"<polyline [^>]*>", svg).group(0)
    assert f'stroke="{PALETTE[0]}"' in line and "stroke-dasharray" not in line
    assert all(f'marker-{at}="url(#mk-0)"' in line for at in ("start", "mid", "end"))
    assert re.search(r'<marker id="mk-0"[^>]*><path d="M4 0A4 4', svg)  # MARKERS[0] is "o": a circle


def test_dense_spectra_are_drawn_from_a_bounded_number_of_points():
    from rankscope.report.html.svg import _sample

    sigma = [1.0 / (i + 1) for i in range(4096)]
    indices = _sample(len(sigma))
    assert len(indices) <= 256 and indices[0] == 0 and indices[-1] == 4095 and indices == sorted(set(indices))
    svg = layer_svg([series("d", sigma, 4096)], [0.005], [0.9])
    line = re.search(r"<polyline [^>]*>", svg).group(0)
    assert len(_polylines(svg)[0]) == len(indices) and "marker-mid" not in line and len(svg) < 12_000
    # the series' marker on a few evenly spaced points only, as in the figures (issue 14: style.marked_points)
    assert 4 <= re.search(r'<path d="([^"]*)" fill="none" stroke="none"', svg).group(1).count("M") <= 10


def test_figures_inline_with_their_own_ids_and_scoped_styles(analyses):
    text, slots = page_of([analyses["lora"]], ["lora"], figure_formats=("pdf", "png"), companions=True)
    page = assert_self_contained(text)
    ids = [attrs["id"] for attrs in page.tags("clippath")]
    assert len(ids) == len(set(ids)) == len(slots)  # each figure's p0 renamed apart
    for slot in slots:
        assert slot.id in page.text
        assert f'href="figures/{slot.id}.pdf"' in text and f'href="figures/{slot.id}.png"' in text
    assert "<?xml" not in text and "DOCTYPE svg" not in text and "Created with matplotlib" not in text
    assert '<style type="text/css">*{' not in text
    assert len(re.findall(r'<style type="text/css">\.f\d+ \*\{stroke-linecap: butt\}</style>', text)) == len(slots)
    assert 'href="summary.json"' in text and 'href="layers.csv"' in text
    bare = report_html([analyses["lora"]], ["lora"])  # no figures: the page still stands
    assert "<figure" not in bare and "figures/" not in bare


def test_inline_svg_prefixes_ids_and_references():
    svg = inline_svg(fake_svg("a"), "f7-", 'cap "q" <x>')
    assert 'id="f7-p0"' in svg and "url(#f7-p0)" in svg and 'xlink:href="#f7-g1"' in svg
    assert 'aria-label="cap &quot;q&quot; &lt;x&gt;"' in svg and 'class="f7"' in svg
    assert svg.startswith("<svg") and ".f7 *{stroke-linecap: butt}" in svg
    # a colour spelled like an id stays a colour; only definitions, url(#…) and href="#…" are renamed
    body = '<defs><clipPath id="{0}c0ffee"/></defs><g clip-path="url(#{0}c0ffee)" fill="#c0ffee"/><text>#c0ffee)</text>'
    assert inline_svg(f"<svg>{body.format('')}</svg>", "f2-", "c").endswith(f"{body.format('f2-')}</svg>")


def test_figure_slots_one_spectrum_per_module_type_and_safe_ids(analyses):
    slots = figure_slots([analyses["hostile"]], ["h"])
    (modules,) = [s for s in slots if s.section == "modules"]  # one figure, a panel per module type (issue 15)
    assert modules.id == "spectrum-modules" and modules.kind == "spectrum" and modules.wide
    module_of = {r.name: r.module_type for r in analyses["hostile"].layers}
    # the canonical order of module types (core.naming.MODULE_ORDER: q, k, v, o …), other types after them in
    # order of first appearance — the same order as the figures' panels and every table
    order = ["q_proj", "k_proj", "v_proj", HOSTILE[0], HOSTILE[1]]
    assert list(dict.fromkeys(module_of[name] for name in modules.layers)) == order
    fig = drawing._figure(modules, [analyses["hostile"]], ["h"])
    # k_proj's only layer is invalid: no panel for it (as before, no figure for it)
    titles = [ax.get_title() for ax in fig.axes if ax.get_visible()]
    assert len(titles) == len(order) - 1
    for title, module in zip(titles, [m for m in order if m != "k_proj"], strict=True):
        head, _, tail = title.partition("…")  # a name too long for its panel keeps its start and its end
        assert title == module or (module.startswith(head) and module.endswith(tail) and head and tail), title
    assert all(SAFE_ID.match(s.id) for s in slots) and len({s.id for s in slots}) == len(slots)
    pair = [analyses["lora"], analyses["other"]]
    several = figure_slots(pair, ["a/b", "c d"], None)
    # several checkpoints: the overview spectrum already has a panel per module type; no second figure of them
    assert not [s for s in several if s.section == "modules"]
    overview = drawing._figure(next(s for s in several if s.id == "spectrum"), pair, ["a/b", "c d"])
    assert [ax.get_title() for ax in overview.axes if ax.get_visible()] == ["q_proj", "v_proj"]
    # one heatmap of every checkpoint, a panel each (issue 14/15), not one figure per checkpoint
    (heatmap,) = [s for s in several if s.kind == "erank-heatmap"]
    assert heatmap.id == "erank-heatmap" and heatmap.members == (0, 1) and heatmap.checkpoint is None
    compared = figure_slots(pair, ["a/b", "c d"], compare(pair, ["a/b", "c d"]))
    assert [(s.kind, s.layer) for s in compared if s.section == "comparison"] == [
        ("subspace-similarity", "model.layers.0.self_attn.q_proj")
    ]
    boost = figure_slots([analyses["boost"]], ["boost"])
    kinds = [s.kind for s in boost if s.section == "composition"]
    assert kinds[:2] == ["weights", "growth"] and "alignment" in kinds


def test_composition_section(analyses):
    analysis = analyses["boost"]
    text, _ = page_of([analysis], ["boost"])
    page = assert_self_contained(text)
    assert "composition" in [attrs.get("id") for attrs in page.tags("section")]
    rows = table_rows(text, "composition-table-0")
    composed = [r for r in analysis.layers if r.composition]
    assert len(rows) == len(composed) == 4
    for row, record in zip(rows, composed, strict=True):
        fields = record.composition
        assert row[0][0] == record.name and float(row[1][1]["data-v"]) == 3
        assert (
            float(row[5][1]["data-v"]) == fields["rank_gain"] and float(row[6][1]["data-v"]) == fields["interference"]
        )
        growth = " → ".join(f"{g['metrics']['erank']:.2f}" for g in fields["growth"])
        assert row[-1][0] == growth
    bars = re.findall(r'<div class="bar">(.*?)</div>', text)
    widths = [float(w) for w in re.findall(r"width:([\d.]+)%", bars[0])]
    assert widths == pytest.approx([60.0, 30.0, 10.0], abs=0.01)  # |w_i| / Σ|w| of 0.6, 0.3, 0.1
    assert "round0" in page.text and "Update cosine" in page.text


def test_comparison_section(analyses):
    items = [analyses["lora"], analyses["other"]]
    comparison = compare(items, ["r4", "r2"])
    text, _ = page_of(items, ["r4", "r2"], comparison)
    page = assert_self_contained(text)
    assert comparison.summary()["headlines"][0] in page.text
    rows = table_rows(text, "comparison-layers")
    assert len(rows) == len(comparison.layers) == 6
    first = comparison.layers[0]
    values = [comparison.values(r) for r in first.records]
    assert float(rows[0][2][1]["data-v"]) == values[0]["erank"] and float(rows[0][5][1]["data-v"]) == values[1]["erank"]
    layer_rows = table_rows(text, "layer-table")
    assert len(layer_rows) == 12 and {r[0][0] for r in layer_rows} == {"r4", "r2"}  # 6 layers each
    detail = re.search(r'<details class="layer" id="layer-1">.*?</details>', text, re.S).group(0)
    assert len(_polylines(detail)) == 4  # both checkpoints' spectra and energies in one plot


# -- the folder -----------------------------------------------------------------------------------------------
def test_report_folder_files(analyses, tmp_path):
    analysis = analyses["lora"]
    out = tmp_path / "report"
    assert write_report([analysis], out, labels=["lora"], formats=("pdf", "png")) == []
    assert (out / MARKER).is_file()
    document = json.loads((out / "summary.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert document["schema"] == "rankscope.spectrum/1" and len(document["layers"]) == 6
    assert document["layers"][0]["singular_values"] == analysis.layers[0].singular_values
    rows = list(csv.DictReader(io.StringIO((out / "layers.csv").read_text())))
    assert [r["name"] for r in rows] == [r.name for r in analysis.layers]
    markdown = (out / "summary.md").read_text()
    assert markdown.startswith("## lora") and "| q\\_proj |" in markdown
    slots = figure_slots([analysis], ["lora"])
    for slot in slots:
        assert (out / "figures" / f"{slot.id}.pdf").read_bytes().startswith(b"%PDF")
        assert (out / "figures" / f"{slot.id}.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert sorted(p.name for p in (out / "figures").iterdir()) == sorted(
        f"{s.id}.{fmt}" for s in slots for fmt in ("pdf", "png")
    )
    text = (out / "index.html").read_text()
    page = assert_self_contained(text)
    assert len(page.tags("svg")) >= len(slots) and "6/6" in page.text
    assert [p.name for p in tmp_path.iterdir()] == ["report"]  # no temporary folder left beside it


@pytest.mark.skipif(not fork_available(), reason="forked helpers run on Linux only")
def test_figures_drawn_by_forked_helpers_are_the_same_bytes(analyses, tmp_path, monkeypatch):
    items = [analyses["lora"], analyses["boost"]]
    original = drawing._figure

    def figure(slot, *args):
        if slot.kind == "energy":
            raise RuntimeError("drawing bug")  # wherever it is drawn, the same warning
        return original(slot, *args)

    monkeypatch.setattr(drawing, "_figure", figure)
    serial = write_report(items, tmp_path / "one", labels=["a", "b"], formats=("pdf",), processes=1)
    shared = write_report(items, tmp_path / "two", labels=["a", "b"], formats=("pdf",), processes=3)
    assert serial == shared and "figure energy left out: RuntimeError: drawing bug" in serial
    files = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*") if p.is_file())
    assert len(files) > 8 and files == sorted(p.relative_to(tmp_path / "two") for p in (tmp_path / "two").rglob("*")
                                              if p.is_file())  # fmt: skip
    for name in files:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name


def test_report_files_get_the_usual_permissions(analyses, tmp_path):
    mask = os.umask(0o022)
    try:
        write_report([analyses["boost"]], tmp_path / "r", formats=("svg",))
    finally:
        os.umask(mask)
    for path in [tmp_path / "r", *(tmp_path / "r").rglob("*")]:
        mode = path.stat().st_mode & 0o777
        assert mode == (0o755 if path.is_dir() else 0o644), (path, oct(mode))


def test_several_checkpoints_summary_csv_and_figures(analyses, tmp_path):
    items = [analyses["lora"], analyses["other"]]
    assert write_report(items, tmp_path / "r", labels=["=cmd", "r2"], formats=("svg",)) == []
    document = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert document["schema"] == "rankscope.report/1" and document["labels"] == ["=cmd", "r2"]
    assert document["comparison"]["schema"] == "rankscope.compare/1"
    assert [d["schema"] for d in document["spectra"].values()] == ["rankscope.spectrum/1"] * 2
    assert "comparison" in document["contents"] and "spectra" in document["contents"]
    rows = list(csv.DictReader(io.StringIO((tmp_path / "r" / "layers.csv").read_text())))
    assert len(rows) == 12 and next(iter(rows[0])) == "checkpoint"
    assert {r["checkpoint"] for r in rows} == {"'=cmd", "r2"}  # a label is not a spreadsheet formula
    assert (tmp_path / "r" / "summary.md").read_text().startswith("## Comparison:")
    figures = {p.name for p in (tmp_path / "r" / "figures").iterdir()}
    assert {
        "erank-heatmap.svg",
        "subspace-similarity.svg",
        "spectrum.svg",
    } <= figures


def test_an_existing_folder_is_replaced_only_when_rankscope_wrote_it(quick_figures, analyses, tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(RankscopeError, match="not written by rankscope report; pass force=True"):
        write_report([analyses["lora"]], foreign, formats=())
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    write_report([analyses["lora"]], foreign, formats=(), force=True)
    # --force replaces what rankscope writes and nothing else: the user's own file stays
    assert (foreign / "notes.txt").read_text() == "keep me" and (foreign / "index.html").is_file()
    write_report([analyses["other"]], foreign, formats=())  # ours now: replaced without --force
    assert json.loads((foreign / "summary.json").read_text())["layers"][0]["rank_bound"] == 2
    assert (foreign / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in foreign.iterdir()) == [
        MARKER, "index.html", "layers.csv", "notes.txt", "summary.json", "summary.md"
    ]  # fmt: skip
    empty = tmp_path / "empty"
    empty.mkdir()
    write_report([analyses["lora"]], empty, formats=())
    assert (empty / "index.html").is_file()
    file = tmp_path / "file"
    file.write_text("x")
    with pytest.raises(RankscopeError, match="not a report folder"):
        write_report([analyses["lora"]], file, formats=(), force=True)


def test_never_replaces_a_folder_holding_the_inputs_or_the_working_directory(
    quick_figures, adapters, analyses, tmp_path, monkeypatch
):
    holder = adapters["lora"].parent
    with pytest.raises(RankscopeError, match="refusing"):
        write_report([analyses["lora"]], holder, formats=(), force=True)
    assert adapters["lora"].is_dir()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x").write_text("x")
    for target in (".", tmp_path, tmp_path.parent):
        with pytest.raises(RankscopeError, match="refusing"):
            check_target(target, force=True)
    assert (tmp_path / "x").exists()


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, OSError])
def test_an_error_while_writing_leaves_the_old_report_and_no_debris(
    quick_figures, analyses, tmp_path, monkeypatch, interrupt
):
    out = tmp_path / "r"
    write_report([analyses["lora"]], out, formats=())
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}

    def fail(*args, **kwargs):
        raise interrupt("interrupted while rendering")

    monkeypatch.setattr(bundle, "report_markdown", fail)
    with pytest.raises(KeyboardInterrupt if interrupt is KeyboardInterrupt else RankscopeError):
        write_report([analyses["other"]], out, formats=())
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["r"]
    fresh = tmp_path / "fresh"
    with pytest.raises(KeyboardInterrupt if interrupt is KeyboardInterrupt else RankscopeError):
        write_report([analyses["other"]], fresh, formats=())
    assert not fresh.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["r"]


def test_a_figure_that_cannot_be_drawn_is_left_out_with_a_warning(analyses, tmp_path, monkeypatch):
    real = drawing._figure

    def broken(slot, items, labels, grids=None):
        if slot.kind == "energy":
            raise ValueError("no luck")
        return real(slot, items, labels, grids)

    monkeypatch.setattr(drawing, "_figure", broken)
    warnings = write_report([analyses["lora"]], tmp_path / "r", formats=("svg",))
    assert warnings == ["figure energy left out: ValueError: no luck"]
    assert not (tmp_path / "r" / "figures" / "energy.svg").exists()
    assert (tmp_path / "r" / "figures" / "spectrum.svg").is_file()


def test_a_224_layer_report_stays_small(tmp_path):
    factors = {}
    for i in range(32):
        for j, module in enumerate(("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")):
            factors[f"model.layers.{i}.mlp.{module}"] = random_factors(24, 16, 8, 7 * i + j)
    path = write_lora(tmp_path / "big", factors, lora_config(r=8, target_modules=["q_proj"]))
    analysis = rankscope.analyze(rankscope.load(path))
    write_report([analysis], tmp_path / "r", formats=())
    text = (tmp_path / "r" / "index.html").read_text()
    assert len(text.encode()) < 2_000_000
    page = Page(text)
    assert (
        len([d for d in page.tags("details") if d.get("class") == "layer"]) == 224
        and len(page.tags("figure")) == 4 + 1 + 1
    )  # overview + the resize figure (energy:0.95 by default) + the per-module spectra (a panel per type)
    assert len(table_rows(text, "layer-table")) == 224


# -- the command ----------------------------------------------------------------------------------------------
def cli(*args):
    return CliRunner().invoke(main, ["report", *map(str, args)], catch_exceptions=False)


def one_error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("rankscope: error: "), result.output
    assert "Traceback" not in result.output
    return lines[0]


def test_jobs_chooses_how_many_processes_draw_the_figures(adapters, tmp_path, monkeypatch):
    asked = []

    def start(items, labels, slots, folder, formats, *, processes=1, helpers=None):
        asked.append((processes, helpers is not None))
        return lambda progress=None: ({}, [])

    monkeypatch.setattr(bundle, "start_drawing", start)
    assert cli(adapters["lora"], "-o", tmp_path / "a", "--jobs", "3", "-q").exit_code == 0
    assert cli(adapters["lora"], "-o", tmp_path / "b", "-q").exit_code == 0
    assert cli(adapters["lora"], "-o", tmp_path / "d", "--jobs", "1", "-q").exit_code == 0
    cores = forked.default_processes()
    # helpers forked before the analysis where there is more than one process and a fork; none for --jobs 1
    assert asked == [(3, fork_available()), (cores, cores > 1 and fork_available()), (1, False)]
    refused = CliRunner().invoke(main, ["report", str(adapters["lora"]), "-o", str(tmp_path / "c"), "--jobs", "0"])
    assert refused.exit_code == 2 and "--jobs" in refused.output and not (tmp_path / "c").exists()


@pytest.mark.skipif(not fork_available(), reason="forked helpers run on Linux only")
def test_figures_of_helpers_forked_before_the_analysis_are_the_same_bytes(adapters, tmp_path, monkeypatch):
    # two adapters compared: a subspace-similarity figure too, whose grid is computed here and sent
    paths = (adapters["lora"], adapters["other"])
    assert cli(*paths, "-o", tmp_path / "one", "--jobs", "1", "-q", "--figures", "pdf,svg").exit_code == 0
    delivered = []
    completed = forked._completed

    def spy(work, count, finished, done):
        delivered.append((len(finished), count))  # what the helpers sent back before this process fills gaps
        return completed(work, count, finished, done)

    monkeypatch.setattr(forked, "_completed", spy)
    assert cli(*paths, "-o", tmp_path / "two", "--jobs", "2", "-q", "--figures", "pdf,svg").exit_code == 0
    assert len(delivered) == 1 and delivered[0][0] == delivered[0][1] > 0  # every figure drawn by the helpers
    files = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*") if p.is_file())
    assert Path("figures/subspace-similarity.pdf") in files
    assert files == sorted(p.relative_to(tmp_path / "two") for p in (tmp_path / "two").rglob("*") if p.is_file())
    for name in files:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name


def test_command_writes_a_report_and_runs_twice(adapters, tmp_path, monkeypatch):
    out = tmp_path / "r"
    with monkeypatch.context() as patch:  # the first run only has to leave a report of ours behind
        patch.setattr(bundle, "start_drawing", lambda *args, **kwargs: lambda progress=None: ({}, []))
        first = cli(adapters["boost"], "-o", out, "--figures", "svg", "--layers", "q_proj", "-q")
    assert first.exit_code == 0 and len(json.loads((out / "summary.json").read_text())["layers"]) == 2
    result = cli(adapters["boost"], "-o", out, "--figures", "svg")  # ours: replaced without --force
    assert result.exit_code == 0, result.output
    assert "report written to" in result.stderr and len(json.loads((out / "summary.json").read_text())["layers"]) == 4
    page = assert_self_contained((out / "index.html").read_text())
    assert "Composition" in page.text
    names = {p.name for p in (out / "figures").iterdir()}
    assert {"weights.svg", "growth.svg", "spectrum.svg", "spectrum-modules.svg"} <= names


def test_command_compares_several_with_labels(quick_figures, adapters, tmp_path):
    result = cli(
        adapters["lora"], adapters["other"], "-o", tmp_path / "r", "--labels", "a,b", "--figures", "none", "-q"
    )
    assert result.exit_code == 0, result.output
    assert result.stderr == "" and result.stdout == ""
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["labels"] == ["a", "b"]
    assert not (tmp_path / "r" / "figures").exists()  # --figures none: no empty folder


def test_default_labels_tell_alike_directories_apart():
    """The shortest path suffix that tells checkpoints apart; one rule for compare, report and plot."""
    from rankscope.core.naming import checkpoint_labels

    assert checkpoint_labels(["runs/a/final", "runs/b/final"]) == ["a/final", "b/final"]
    assert checkpoint_labels(["x/a/final", "y/a/final"]) == ["x/a/final", "y/a/final"]
    assert checkpoint_labels(["lora", "bora/"]) == ["lora", "bora"]
    assert checkpoint_labels(["lora", "./lora"]) == ["1: lora", "2: lora"]


def test_compare_labels_alike_directories_as_report_does(adapters, tmp_path):
    import shutil

    for run in ("a", "b"):
        shutil.copytree(adapters["lora"], tmp_path / "runs" / run / "final")
    result = CliRunner().invoke(
        main, ["compare", str(tmp_path / "runs/a/final"), str(tmp_path / "runs/b/final"), "--json", "-", "-q"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["labels"] == ["a/final", "b/final"]


def test_command_usage_and_input_errors(quick_figures, adapters, tmp_path):
    assert cli(adapters["lora"], "-o", tmp_path / "r", "--figures", "gif").exit_code == 2
    assert cli(adapters["lora"], "-o", tmp_path / "r", "--labels", "a,b").exit_code == 2
    assert cli(adapters["lora"]).exit_code == 2
    line = one_error_line(cli(tmp_path / "missing", "-o", tmp_path / "r"))
    assert "missing" in line
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "a.txt").write_text("a")
    line = one_error_line(cli(adapters["lora"], "-o", foreign))
    assert "--force" in line and (foreign / "a.txt").exists()
    assert not (tmp_path / "r").exists()
    line = one_error_line(cli(adapters["lora"], "-o", adapters["lora"].parent, "--force"))
    assert "refusing" in line and adapters["lora"].is_dir()


def test_checkpoints_that_share_no_layer_are_each_reported(tmp_path):
    one = write_lora(tmp_path / "one", {"model.layers.0.q": random_factors(8, 8, 2, 1)}, lora_config(r=2))
    two = write_lora(tmp_path / "two", {"encoder.block.0.k": random_factors(8, 8, 2, 2)}, lora_config(r=2))
    result = CliRunner().invoke(main, ["report", str(one), str(two), "-o", str(tmp_path / "r"), "--figures", "none"])
    assert result.exit_code == 0, result.output
    assert "no layer is shared by all of one, two" in result.stderr
    page = (tmp_path / "r" / "index.html").read_text()
    assert "model.layers.0.q" in page and "encoder.block.0.k" in page
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["labels"] == ["one", "two"]


def test_the_page_draws_the_spectrum_as_the_figures_do_without_the_numerical_zero_tail(adapters):
    """A dense SVD of a rank-4 16×16 update returns 12 values near 1e-17 past its numerical rank: the page, like
    the PDFs, draws the 4 that are there (the zero tail would be a flat line of noise at the bottom)."""
    from rankscope.report.build import build_report

    analysis = rankscope.analyze(rankscope.load(adapters["lora"]), dense=True)
    record = analysis[0]
    rank = record.metrics["numerical_rank"]
    assert rank == 4 < len(record.singular_values) == 16
    detail = build_report([analysis], ["lora"]).details[0]
    assert [len(s.sigma) for s in detail.series] == [rank]
    assert list(detail.series[0].sigma) == record.singular_values[:rank]
