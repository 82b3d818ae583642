"""What the outputs say in words: the scale the analysed update carries (α/√r for rsLoRA — its numbers were
right, its text said α/r — α/r for LoRA, and what ``--unscaled`` left out), and that a report of adapters sharing
no layer has no comparison."""

from __future__ import annotations

import json

from click.testing import CliRunner

from rankscope.cli import main

from .factories import lora_config, random_factors, write_lora

NAME = "model.layers.0.self_attn.q_proj"


def _outputs(directory, tmp_path, *flags: str) -> dict[str, str]:
    runner = CliRunner()
    terminal = runner.invoke(main, ["spectrum", str(directory), *flags])
    assert terminal.exit_code == 0, terminal.output
    document = json.loads(runner.invoke(main, ["spectrum", str(directory), "--json", "-", "-q", *flags]).stdout)
    out = tmp_path / f"report{len(flags)}"
    report = runner.invoke(main, ["report", str(directory), "-o", str(out), "--figures", "none", *flags])
    assert report.exit_code == 0, report.output
    return {
        "terminal": terminal.stdout,
        "json": document["scaling"],
        "html": (out / "index.html").read_text(),
        "markdown": (out / "summary.md").read_text(),
    }


def test_rslora_says_alpha_over_root_r_everywhere(tmp_path):
    rslora = write_lora(tmp_path / "rslora", {NAME: random_factors(16, 16, 4, 0)}, lora_config(use_rslora=True))
    for where, text in _outputs(rslora, tmp_path).items():
        assert "α/√r included" in text and "α/r" not in text, where
    for where, text in _outputs(rslora, tmp_path, "--unscaled").items():
        assert "without α/√r" in text, where


def test_plain_lora_says_alpha_over_r(tmp_path):
    lora = write_lora(tmp_path / "lora", {NAME: random_factors(16, 16, 4, 0)}, lora_config())
    for where, text in _outputs(lora, tmp_path).items():
        assert "α/r included" in text and "α/√r" not in text, where


def test_a_report_of_adapters_sharing_no_layer_says_that_no_comparison_applies(tmp_path):
    first = write_lora(tmp_path / "qv", {NAME: random_factors(16, 16, 4, 0)}, lora_config())
    other = "model.layers.0.self_attn.k_proj"
    second = write_lora(tmp_path / "ko", {other: random_factors(16, 16, 4, 1)}, lora_config())
    out = tmp_path / "report"
    result = CliRunner().invoke(main, ["report", str(first), str(second), "-o", str(out), "--figures", "none"])
    assert result.exit_code == 0, result.output
    page = (out / "index.html").read_text()
    sentence = "No comparison: no layer is shared by all of qv, ko"
    assert sentence in page and '<a href="#comparison">' in page
    assert sentence in (out / "summary.md").read_text()


def test_the_report_defines_its_measures_and_marks_a_zero_layer(tmp_path):
    a, b = random_factors(16, 16, 4, 0)
    zero = "model.layers.1.self_attn.q_proj"
    adapter = write_lora(tmp_path / "z", {NAME: (a, b), zero: (a.clone(), b * 0)}, lora_config())
    out = tmp_path / "report"
    result = CliRunner().invoke(main, ["report", str(adapter), "-o", str(out), "--figures", "none"])
    assert result.exit_code == 0, result.output
    page, markdown = (out / "index.html").read_text(), (out / "summary.md").read_text()
    for text in (page, markdown):
        assert "Roy &amp; Vetterli" in text or "Roy & Vetterli" in text
        assert "exp(−Σ pᵢ ln pᵢ), pᵢ = σᵢ / Σσ" in text and "Σσ² / σ₁²" in text
    assert '<section id="definitions">' in page and "overlap" not in page.split('id="definitions"')[1]
    assert '<td class="zero">zero</td>' in page


def test_captions_and_definitions_write_norms_and_sums_without_tex(tmp_path):
    adapter = write_lora(tmp_path / "lora", {NAME: random_factors(16, 16, 4, 0)}, lora_config())
    out = tmp_path / "report"
    assert CliRunner().invoke(main, ["report", str(adapter), "-o", str(out), "--figures", "svg"]).exit_code == 0
    page = (out / "index.html").read_text()
    visible = page.split("<body", 1)[1]
    assert "_{" not in visible and "‖_F" not in visible and "σ_i" not in visible
    assert "Σᵢ₌₁ᵏ σᵢ² / Σσ²" in visible
