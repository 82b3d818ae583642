"""The layering of docs/architecture.md, checked on the source: data flows one way, modules stay small."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "rankscope"
# a layer → the top-level parts of the package it may import from (besides itself)
ALLOWED = {
    "core": set(),
    "measures": {"core"},
    "analysis": {"core", "measures"},
    "formats": {"core"},
    "resize": {"core", "measures", "analysis", "formats"},
    "trajectory": {"core", "measures", "analysis", "formats"},
    "integrations": {"core", "measures", "analysis", "formats"},
    "sweeps": {"core", "measures", "analysis", "formats", "trajectory"},
    "figures": {"core", "analysis", "measures", "resize", "trajectory"},
    "report": {"core", "analysis", "measures", "figures", "formats", "resize", "trajectory", "sweeps"},
    "cli": {
        "core",
        "analysis",
        "measures",
        "figures",
        "formats",
        "report",
        "resize",
        "trajectory",
        "sweeps",
        "integrations",
    },
}


def _imported_parts(path: Path, source: str | None = None) -> set[str]:
    """The top-level parts of rankscope a module imports (relative imports resolved; also those inside functions)."""
    module = path.relative_to(PACKAGE.parent).with_suffix("").parts
    package = module[:-1]  # a module's package; an __init__'s own package
    parts = set()
    for node in ast.walk(ast.parse(path.read_text() if source is None else source)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(package[: len(package) - (node.level - 1)])
                target = [*base, *(node.module.split(".") if node.module else [])]
                names = [[*target, alias.name] for alias in node.names] if not node.module else [target]
            else:
                names = [node.module.split(".")] if node.module else []
            parts |= {name[1] for name in names if len(name) > 1 and name[0] == "rankscope"}
        elif isinstance(node, ast.Import):
            parts |= {a.name.split(".")[1] for a in node.names if a.name.startswith("rankscope.")}
    return parts


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_each_layer_imports_only_the_layers_below_it(layer):
    wrong = {}
    for path in sorted((PACKAGE / layer).rglob("*.py")):
        parts = _imported_parts(path) - {layer, "__version__"}
        if parts - ALLOWED[layer]:
            wrong[str(path.relative_to(PACKAGE))] = sorted(parts - ALLOWED[layer])
    assert not wrong, f"imports against the layering: {wrong}"


def test_no_module_outside_report_and_cli_imports_report():
    offenders = [
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if path.relative_to(PACKAGE).parts[0] not in ("report", "cli", "__init__.py")
        and "report" in _imported_parts(path)
    ]
    assert offenders == []


def test_no_module_is_over_500_lines():
    long = {
        str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > 500
    }
    assert long == {}


def test_the_layering_check_sees_an_upward_import():
    """The checker itself: a deferred import of report from analysis is found."""
    records = PACKAGE / "analysis" / "records.py"
    assert "report" not in _imported_parts(records)
    upward = records.read_text() + "\n\ndef _f():\n    from ..report.json import dumps\n"
    assert "report" in _imported_parts(records, upward)
