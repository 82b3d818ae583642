"""The Python surface a notebook user meets: short reprs, indexing, scalar options, errors that say what exists."""

from __future__ import annotations

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
