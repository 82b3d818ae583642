"""The HTML report in a real headless browser: Debian's chromium driven by playwright's Python API.

The page must load with no console error and no request beyond its own file, sort its table on a header click,
filter it, open a layer's detail from its link, show a hostile layer name as text without running it, look like
something (a screenshot that is not blank), and open a 224-layer report quickly. Skipped only where
/usr/bin/chromium or playwright is missing (``scripts/install-browser.sh`` installs the browser).
"""

from __future__ import annotations

import io
import time
from pathlib import Path

import pytest

import rankscope
from rankscope.report.bundle import write_report

from .factories import lora_config, random_factors, write_lora

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = ["--no-sandbox", "--disable-background-networking", "--disable-component-update"]
HOSTILE = "<img src=x onerror=alert(1)>"

if not CHROMIUM.exists():
    pytest.skip(f"{CHROMIUM} is missing (scripts/install-browser.sh installs it)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> dict[str, Path]:
    """Two checkpoints compared (one with a hostile layer name and a hostile label), and a 224-layer one."""
    root = tmp_path_factory.mktemp("browser")
    factors = {f"model.layers.{i}.self_attn.{m}": random_factors(16, 16, 4, 10 * i + j)
               for i in range(4) for j, m in enumerate(("q_proj", "v_proj"))}  # fmt: skip
    first = write_lora(root / "first", factors, lora_config(r=4, lora_alpha=8))
    hostile = dict(factors)
    hostile[f"model.layers.4.{HOSTILE}"] = random_factors(16, 16, 4, 99)
    second = write_lora(root / "second", hostile, lora_config(r=4, lora_alpha=4))
    analyses = [rankscope.analyze(rankscope.load(path)) for path in (first, second)]
    assert write_report(analyses, root / "pair", labels=["first", "<b>second</b>"], formats=()) == []
    big = {}
    for i in range(32):
        for j, module in enumerate(("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")):
            big[f"model.layers.{i}.mlp.{module}"] = random_factors(24, 16, 8, 7 * i + j)
    analysis = rankscope.analyze(rankscope.load(write_lora(root / "big", big, lora_config(r=8))))
    assert write_report([analysis], root / "big-report", formats=()) == []
    return {"pair": root / "pair" / "index.html", "big": root / "big-report" / "index.html"}


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS)
        yield instance
        instance.close()


class Visit:
    """A page opened on a file, with everything it logged, requested and tried to pop up."""

    def __init__(self, browser, path: Path, width: int = 1280) -> None:
        self.url = path.as_uri()
        self.page = browser.new_page(viewport={"width": width, "height": 900})
        self.errors: list[str] = []
        self.requests: list[str] = []
        self.dialogs: list[str] = []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.on("dialog", lambda d: (self.dialogs.append(d.message), d.dismiss()))
        started = time.monotonic()
        self.page.goto(self.url, wait_until="load")
        self.seconds = time.monotonic() - started

    def close(self) -> None:
        self.page.close()


@pytest.fixture()
def pair(browser, reports):
    visit = Visit(browser, reports["pair"])
    yield visit
    visit.close()


def column_values(page, table: str, column: int) -> list[float | None]:
    return page.eval_on_selector_all(
        f"#{table} tbody tr",
        f"""rows => rows.filter(r => !r.hidden).map(r => {{
            const v = r.cells[{column}].dataset.v; return v === undefined || v === "" ? null : parseFloat(v); }})""",
    )


def test_loads_without_errors_or_requests(pair):
    assert pair.errors == []
    assert [url for url in pair.requests if url != pair.url and not url.startswith("data:")] == []
    assert pair.page.title() == "rankscope — first vs <b>second</b>"


def test_hostile_name_is_text_and_runs_nothing(pair):
    pair.page.wait_for_timeout(200)  # time for an onerror handler to fire, were there one
    assert pair.dialogs == []
    assert pair.page.eval_on_selector_all("img", "e => e.length") == 0
    assert pair.page.eval_on_selector_all("script", "e => e.length") == 1
    cell = pair.page.locator("#layer-table td.name", has_text=HOSTILE)
    assert cell.count() == 1 and cell.first.is_visible()
    assert cell.first.inner_text().replace("\u200b", "").replace("\n", "") == f"model.layers.4.{HOSTILE}"
    assert pair.page.locator("h1 span").inner_text() == "first vs <b>second</b>"


def test_table_sorts_on_header_click(pair):
    page = pair.page
    erank_column = 9  # checkpoint, layer, module, index, m×n, r≤, σ₁, ‖ΔW‖F, #σ>τ, erank
    header = page.locator("#layer-table thead th").nth(erank_column)
    assert header.inner_text().strip() == "erank"
    header.click()
    ascending = column_values(page, "layer-table", erank_column)
    assert header.get_attribute("aria-sort") == "ascending"
    assert ascending == sorted(ascending) and len(ascending) == 17
    header.click()
    descending = column_values(page, "layer-table", erank_column)
    assert descending == sorted(ascending, reverse=True)
    name_header = page.locator("#layer-table thead th").nth(1)
    name_header.click()
    names = page.eval_on_selector_all("#layer-table tbody tr td.name", "cells => cells.map(c => c.textContent)")
    indices = [int(n.split(".")[2]) for n in names]
    assert indices == sorted(indices)  # natural order: layers.4 after layers.3, whatever the text collation


def test_table_filters_as_you_type(pair):
    page = pair.page
    page.fill("input[data-filter=layer-table]", "v_proj second")
    visible = page.eval_on_selector_all("#layer-table tbody tr:not([hidden])", "rows => rows.map(r => r.textContent)")
    assert len(visible) == 4 and all("v_proj" in row and "<b>second</b>" in row for row in visible)
    assert page.locator("[data-count=layer-table]").inner_text() == "4 of 17 rows"
    page.fill("input[data-filter=layer-table]", "")
    assert page.locator("#layer-table tbody tr:not([hidden])").count() == 17


def test_layer_link_opens_its_detail(pair):
    page = pair.page
    link = page.locator("#layer-table td.name a").first
    target = link.get_attribute("href")
    link.click()
    detail = page.locator(f"details{target}")
    # the page opens the detail on 'hashchange', which fires after the click returns
    page.wait_for_function("sel => document.querySelector(sel).open", arg=f"details{target}", timeout=5000)
    assert detail.get_attribute("open") is not None
    assert detail.locator("svg.mini polyline").count() == 4  # both checkpoints: spectrum and cumulative energy
    assert detail.locator("svg.mini").first.bounding_box()["width"] > 300


def test_screenshots_are_not_blank(pair, tmp_path):
    from PIL import Image

    shots = {}
    shots["full"] = pair.page.screenshot(path=tmp_path / "full.png", full_page=True)
    pair.page.locator("#layer-table thead th").nth(9).click()
    shots["sorted"] = pair.page.locator("#layers").screenshot(path=tmp_path / "sorted.png")
    for name, png in shots.items():
        image = Image.open(io.BytesIO(png)).convert("L")
        histogram = image.histogram()
        dark = sum(histogram[:160]) / (image.width * image.height)
        assert image.height > 400 and 0.005 < dark < 0.6, (name, dark)  # text and lines on a light page
        assert len([count for count in histogram if count]) > 20, name  # more than a flat fill


def test_a_224_layer_report_opens_quickly(browser, reports):
    visit = Visit(browser, reports["big"])
    try:
        assert visit.errors == [] and visit.seconds < 10
        timing = visit.page.evaluate("performance.getEntriesByType('navigation')[0].domContentLoadedEventEnd")
        assert timing < 5000
        assert visit.page.locator("#layer-table tbody tr").count() == 224
        started = time.monotonic()
        visit.page.locator("#layer-table thead th").nth(8).click()  # erank
        assert time.monotonic() - started < 5
        values = column_values(visit.page, "layer-table", 8)
        assert values == sorted(values)
    finally:
        visit.close()
