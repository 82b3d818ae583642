"""The example notebook runs from top to bottom in a fresh kernel (offline), and shows what it says it shows."""

from __future__ import annotations

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOK = Path(__file__).resolve().parent.parent / "examples" / "quickstart.ipynb"


def _outputs(cell) -> str:
    texts = []
    for output in cell.get("outputs", []):
        texts.append(output.get("text", ""))
        data = output.get("data", {})
        texts += [data.get("text/plain", ""), data.get("text/html", "")]
    return "\n".join(texts)


def test_the_quickstart_notebook_runs_and_shows_its_results():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    )
    client.execute()  # raises CellExecutionError on any failing cell
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    shown = [_outputs(cell) for cell in code]
    assert all("Traceback" not in text for text in shown)
    checkpoint, analysis = shown[1], shown[2]
    assert "<b>Checkpoint</b>" in checkpoint and "q_proj" in checkpoint and len(checkpoint) < 6000
    assert "<b>Analysis</b>" in analysis and "<svg" in analysis and len(analysis) < 150_000
    assert "erank" in shown[3] and "True" in shown[3]  # indexing by name gives the same record
    assert "module_type" in shown[4] and "utilization" in shown[4]  # the DataFrame
    assert "<b>Comparison</b>" in shown[5] and "lora-r32 reaches" in shown[5]
    assert "Figure" in shown[6]
    assert "index.html" in shown[7] and "summary.json" in shown[7]
