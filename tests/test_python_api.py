"""The Python surface a notebook user meets: short reprs, indexing, scalar options, errors that say what exists."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

import rankscope

from .factories import llama_like


@pytest.fixture(scope="module")
def analysis(tmp_path_factory):
    directory = llama_like(tmp_path_factory.mktemp("api") / "adapter", layers=12, hidden=24, rank=4)
    return rankscope.analyze(rankscope.load(directory), thresholds=0.01)


def test_reprs_are_short_and_say_what_it_is(analysis):
    checkpoint = analysis.checkpoint
    for text in (repr(checkpoint), repr(analysis), repr(checkpoint.layers[0]), repr(analysis[0])):
        assert len(text) < 400 and "tensor(" not in text, text
    assert repr(checkpoint).startswith("Checkpoint(") and "24 layers" in repr(checkpoint)
    assert "FactoredUpdate(24×24, inner dim 4" in repr(checkpoint.layers[0])
    assert repr(analysis).endswith("24 layers)")


def test_records_by_position_and_by_name(analysis):
    first = analysis[0]
    assert analysis[first.name] is first and analysis[-1] is analysis.layers[-1]
    with pytest.raises(KeyError, match="no layer named 'nope'"):
        analysis["nope"]


def test_a_single_threshold_is_a_tuple_and_missing_parameters_are_named(analysis):
    assert analysis.options.thresholds == (0.01,)
    record = analysis[0]
    assert record.metric("count_above", 0.01) == 4
    with pytest.raises(KeyError, match=r"computed for 0\.01 only, not 0\.02"):
        record.metric("count_above", 0.02)
    with pytest.raises(KeyError, match="no metric 'erankk'; the metrics are count_above"):
        record.metric("erankk")
    with pytest.raises(KeyError, match="needs a parameter"):
        record.metric("count_above")


def test_to_pandas_one_row_per_layer_with_flat_metrics(analysis):
    frame = analysis.to_pandas()
    assert list(frame["name"]) == [record.name for record in analysis]
    assert frame.loc[0, "count_above[0.01]"] == analysis[0].metric("count_above", 0.01)
    assert frame.loc[3, "erank"] == pytest.approx(analysis[3].metric("erank"))
    assert set(frame["module_type"]) == {"q_proj", "v_proj"} and frame["valid"].all()


def test_top_level_functions_and_no_name_shared_with_a_submodule(analysis, tmp_path):
    """With a lazy façade, ``rankscope.compare`` would turn into the module ``rankscope/compare.py`` once anything
    imported it: no public name may be a submodule's."""
    package = Path(rankscope.__file__).parent
    for name in rankscope.__all__:
        assert not (package / f"{name}.py").exists() and not (package / name).is_dir(), name
    comparison = rankscope.compare([analysis, analysis], ["a", "b"])
    assert isinstance(comparison, rankscope.Comparison) and len(comparison.layers) == len(analysis)
    assert rankscope.write_report([analysis], tmp_path / "r", formats=()) == []
    assert (tmp_path / "r" / "index.html").is_file()
    figure = rankscope.spectrum_figure([analysis], ["a"])
    assert type(figure).__name__ == "Figure"


def test_library_errors_name_arguments_and_the_cli_respells_them(analysis, tmp_path):
    """A library error speaks of ``analyze``'s arguments (``layers``), not of flags; ``spelled`` lets a front end
    write them its way (the CLI: ``--layers``), and never touches the file name in front of the message."""
    with pytest.raises(rankscope.UsageProblem) as bad_regex:
        rankscope.analyze(analysis.checkpoint, layers="(")
    assert str(bad_regex.value).startswith("layers '(' is not a valid regular expression")
    assert "--" not in str(bad_regex.value) and bad_regex.value.arguments == ("layers",)
    with pytest.raises(rankscope.UsageProblem, match=r"^rel_thresholds: ratio -1 must be") as negative:
        rankscope.analyze(analysis.checkpoint, rel_thresholds=(-1,))
    assert negative.value.spelled(lambda name: "--rel-threshold").startswith("--rel-threshold: ratio -1 must")
    with pytest.raises(rankscope.UsageProblem, match=r"^rel_thresholds: ratio 2 must be in \[0, 1\)"):
        rankscope.analyze(analysis.checkpoint, rel_thresholds=(2,))  # σ > 2σ₁ would count nothing
    layers_dir = llama_like(tmp_path / "layers", layers=1, hidden=8, rank=2)  # the argument's name in the path
    with pytest.raises(rankscope.CheckpointError) as nothing:
        rankscope.analyze(rankscope.load(layers_dir), layers="zzz")
    assert str(nothing.value) == f"{layers_dir}: layers 'zzz' matches no layer name"
    assert nothing.value.spelled(lambda name: f"--{name}") == f"{layers_dir}: --layers 'zzz' matches no layer name"
    with pytest.raises(rankscope.UsageProblem, match="threads must be None") as threads:
        rankscope.analyze(analysis.checkpoint, threads=2)
    assert threads.value.arguments == ("threads",)


class _Html(HTMLParser):
    """The elements and text of a ``_repr_html_``; fails on anything that would fetch."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.text: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        for name, value in attrs:
            assert not (name in ("src", "href") and value and not value.startswith("#")), (tag, name, value)

    def handle_data(self, data):
        self.text.append(data)


def test_notebook_html_is_a_small_summary_with_one_small_figure(analysis, tmp_path):
    checkpoint = analysis.checkpoint
    shown = _Html(checkpoint._repr_html_())
    assert len(checkpoint._repr_html_()) < 3000 and "table" in shown.tags
    assert "q_proj" in shown.text and "v_proj" in shown.text and "24×24" in shown.text  # module types, shapes
    page = rankscope.analysis_html(analysis)
    parsed = _Html(page)
    assert parsed.tags.count("svg") == 1 and len(page) < 100_000
    tables = page[: page.index("<svg")]
    assert len(tables) < 4000 and "tensor(" not in page
    erank = analysis.summary()["by_module"]["q_proj"]["metrics"]["erank"]["mean"]
    assert f"{erank:.2f}" in parsed.text  # the table holds the summary's own numbers
    ids = re.findall(r'\bid="([^"]+)"', page + rankscope.analysis_html(analysis))  # each display its own ids: no clash
    assert len(ids) == len(set(ids))
    other_path = llama_like(tmp_path / "b", layers=12, hidden=24, rank=4, seed=5)
    other = rankscope.analyze(rankscope.load(other_path), thresholds=0.01)
    comparison = rankscope.compare([analysis, other], ["a", "b"])
    html = rankscope.comparison_html(comparison)
    parsed = _Html(html)
    assert len(html) < 5000 and "svg" not in parsed.tags
    assert "a" in parsed.text and "b" in parsed.text and any("reaches" in t for t in parsed.text)
