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
    layers_dir = llama_like(tmp_path / "layers", layers=1, hidden=8, rank=2)  # the argument's name in the path
    with pytest.raises(rankscope.CheckpointError) as nothing:
        rankscope.analyze(rankscope.load(layers_dir), layers="zzz")
    assert str(nothing.value) == f"{layers_dir}: layers 'zzz' matches no layer name"
    assert nothing.value.spelled(lambda name: f"--{name}") == f"{layers_dir}: --layers 'zzz' matches no layer name"
    with pytest.raises(rankscope.UsageProblem, match="threads must be None") as threads:
        rankscope.analyze(analysis.checkpoint, threads=2)
    assert threads.value.arguments == ("threads",)
