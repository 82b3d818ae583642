"""The sweep's two tables on disk: ``layers`` (one row per checkpoint and layer) and ``checkpoints`` (one row per
checkpoint), as Parquet (pyarrow) or CSV, each rewritten atomically (a temporary file renamed over the old one)."""

from __future__ import annotations

import os
from pathlib import Path

from ..core.errors import RankscopeError, UsageProblem

TABLES = ("parquet", "csv")
LAYERS, CHECKPOINTS = "layers", "checkpoints"


def require_pandas():
    try:
        import pandas
    except ImportError as exc:
        raise RankscopeError("a sweep needs pandas: pip install 'rankscope[sweep]'") from exc
    return pandas


def check_table(table: str) -> None:
    """``table`` is one of :data:`TABLES`; Parquet needs pyarrow (a one-line hint where it is missing)."""
    if table not in TABLES:
        raise UsageProblem(f"table must be one of {', '.join(TABLES)}, found {table!r}", argument="table")
    require_pandas()
    if table == "parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError as exc:
            raise RankscopeError(
                "Parquet tables need pyarrow: pip install 'rankscope[sweep]' (or give table='csv')", argument="table"
            ) from exc


def table_path(out_dir: Path, name: str, table: str) -> Path:
    return Path(out_dir) / f"{name}.{table}"


def frame(rows: list[dict], columns: list[str] | None = None):
    """A DataFrame of ``rows`` with their columns in first-seen order (``columns`` where there are no rows)."""
    pandas = require_pandas()
    if not rows:
        return pandas.DataFrame(columns=columns or [])
    order: dict[str, None] = {}
    for row in rows:
        order.update(dict.fromkeys(row))
    return pandas.DataFrame(rows, columns=list(order))


def write_frame(data, path: Path, table: str) -> None:
    """Write ``data`` to ``path`` atomically: a temporary file beside it, then a rename over the old one."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        if table == "parquet":
            data.to_parquet(temporary, index=False)
        else:
            data.to_csv(temporary, index=False)
        os.replace(temporary, path)
    except OSError as exc:
        temporary.unlink(missing_ok=True)
        raise RankscopeError(f"{path}: cannot write ({exc.strerror or exc})") from exc


def read_frame(path: Path, table: str):
    """The table at ``path`` (None where there is none)."""
    pandas = require_pandas()
    if not path.is_file():
        return None
    try:
        return pandas.read_parquet(path) if table == "parquet" else pandas.read_csv(path)
    except Exception as exc:  # a table another tool damaged: say which, do not guess
        raise RankscopeError(f"{path}: cannot read the earlier sweep's table ({type(exc).__name__}: {exc})") from exc


def records(data) -> list[dict]:
    """A DataFrame's rows as dicts, missing values as None (what a fresh sweep's rows hold)."""
    if data is None or data.empty:
        return []
    cleaned = data.astype(object).where(data.notna(), None)
    return cleaned.to_dict("records")
