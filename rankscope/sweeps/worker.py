"""One checkpoint of a sweep, start to finish, in whichever process runs it: its content hash, then load, analyse
and flatten into table rows. Never raises for a bad checkpoint: the error is its row."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from ..analysis.analyze import analyze
from ..analysis.options import AnalysisOptions
from ..analysis.summary import flat_base, flat_metrics
from ..core.errors import RankscopeError, one_line
from ..formats import load
from ..formats.common.source import locate
from .inputs import SweepItem, is_manifest

_CHUNK = 1 << 20
_threads = None  # a pool worker's single_threaded block, open for the life of its process


def content_hash(path: str | Path, adapter: str | None = None) -> str | None:
    """sha256 of an adapter's config and weights (``config\\0…weights\\0…``: the files' names do not count, so one
    adapter at two paths hashes alike); a composition manifest's folder hashes every file under it with its
    relative path.
    None where there is nothing to hash (a path that does not exist)."""
    path = Path(path)
    digest = hashlib.sha256()
    if path.exists() and is_manifest(path):
        folder = path if path.is_dir() else path.parent  # the manifest names adapters beside it
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        parts = [(str(p.relative_to(folder)), p) for p in files]
    else:
        try:
            source = locate(path, adapter)
            parts = [("config", source.config_path), ("weights", source.weights_path)]
        except RankscopeError:
            if not path.is_file():
                return None
            parts = [("weights", path)]  # a damaged file still has content: a duplicate of it is one too
    for role, file in parts:
        digest.update(role.encode() + b"\0")
        if file is None:
            continue
        with open(file, "rb") as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()


def config_fields(config: dict) -> dict:
    """The config fields a sweep's tables carry: base model, r, α, target modules, PEFT type, rsLoRA, DoRA."""
    targets = config.get("target_modules")
    if isinstance(targets, (list, tuple, set)):
        targets = ",".join(sorted(map(str, targets)))
    return {
        "peft_type": _text(config.get("peft_type")),
        "base_model": _text(config.get("base_model_name_or_path")),
        "r": _number(config.get("r")),
        "alpha": _number(config.get("lora_alpha", config.get("alpha"))),
        "target_modules": _text(targets),
        "use_rslora": config.get("use_rslora") if isinstance(config.get("use_rslora"), bool) else None,
        "use_dora": config.get("use_dora") if isinstance(config.get("use_dora"), bool) else None,
    }


def _text(value: object) -> str | None:
    return None if value is None else str(value)


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def analyse_one(
    index: int,
    item: SweepItem,
    load_options: dict,
    settings: AnalysisOptions,
    skip_hashes: frozenset[str] = frozenset(),
) -> dict:
    """``{"index", "checkpoint": row, "layers": [rows], "resumed": bool}`` for one checkpoint. ``load_options`` are
    :func:`rankscope.formats.load`'s keyword arguments; a checkpoint whose hash is in ``skip_hashes`` (done by an
    earlier sweep: ``--resume``) is not read at all."""
    start = time.perf_counter()
    identity = {"id": item.id, "path": item.path, "run": item.run, "step": item.step}
    row: dict = {**identity, "status": "ok", "error": None}
    layers: list[dict] = []
    try:
        row["hash"] = content_hash(item.path, load_options.get("adapter"))
        if row["hash"] is not None and row["hash"] in skip_hashes:
            return {"index": index, "checkpoint": row, "layers": [], "resumed": True}
        checkpoint = load(item.path, **load_options)
        analysis = analyze(checkpoint, settings)
        if analysis.layers and len(analysis.invalid) == len(analysis.layers):
            place = checkpoint.weights_file or checkpoint.path
            raise RankscopeError(f"{place}: no layer can be analysed: {analysis.invalid[0].error}")
        fields = config_fields(checkpoint.config or {})
        row.update(
            family=checkpoint.family,
            adapter_type=checkpoint.adapter_type,
            **fields,
            layers=len(analysis.layers),
            invalid_layers=len(analysis.invalid),
            params=checkpoint.params,
            weights_file=str(checkpoint.weights_file) if checkpoint.weights_file else None,
            warnings=" | ".join(one_line(w, 300) for w in checkpoint.warnings + analysis.warnings) or None,
            config=json.dumps(checkpoint.config, sort_keys=True, default=str),
        )
        layers = [layer_row(identity, fields, record, scaled=not settings.unscaled) for record in analysis.layers]
    except RankscopeError as exc:
        row.update(status="error", error=str(exc))
    except Exception as exc:  # one bad checkpoint never stops a sweep: the unexpected is its row too
        row.update(status="error", error=one_line(f"{item.path}: internal error: {type(exc).__name__}: {exc}"))
    row.setdefault("hash", None)
    row["seconds"] = time.perf_counter() - start
    return {"index": index, "checkpoint": row, "layers": layers, "resumed": False}


def failed_row(index: int, item: SweepItem, message: str) -> dict:
    """The result of a checkpoint whose worker itself failed (not the checkpoint's reading)."""
    row = {"id": item.id, "path": item.path, "run": item.run, "step": item.step, "status": "error",
           "error": one_line(f"{item.path}: {message}"), "hash": None, "seconds": None}  # fmt: skip
    return {"index": index, "checkpoint": row, "layers": [], "resumed": False}


def layer_row(identity: dict, fields: dict, record, *, scaled: bool) -> dict:
    """One (checkpoint, layer) row: the checkpoint's identity and config fields, the layer's identity, shape and
    status, every metric flattened (``count_above[0.005]``) and, with ``--base``, the measures against it."""
    matrix = record.matrix_shape if len(record.matrix_shape) == 2 else (None, None)
    return {
        **identity,
        "base_model": fields["base_model"],
        "r": fields["r"],
        "alpha": fields["alpha"],
        "target_modules": fields["target_modules"],
        "family": record.family,
        "layer": record.name,
        "module_type": record.module_type,
        "layer_index": record.layer_index,
        "expert_index": record.expert_index,
        "kind": record.kind,
        "shape": "x".join(map(str, record.shape)),
        "m": matrix[0],
        "n": matrix[1],
        "rank_bound": record.rank_bound,
        "params": record.params,
        "scale": record.scale,
        "scaled": scaled,
        "exact": record.exact,
        "valid": record.valid,
        "error": record.error,
        # a composition whose components collapsed onto one direction (None: not a composition)
        "collapsed": (record.composition or {}).get("collapsed"),
        **flat_metrics(record),
        **(flat_base(record.base) if record.base is not None else {}),
    }


def pool_initializer() -> None:
    """A pool worker runs single-threaded for its whole life (it owns its process: see ``core.threads``)."""
    import signal

    from ..core.threads import single_threaded

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it ends the pool
    global _threads
    _threads = single_threaded()
    _threads.__enter__()


def ray_task(index: int, item: SweepItem, load_options: dict, settings: AnalysisOptions, skip: frozenset) -> dict:
    """One checkpoint as a Ray task: single-threaded while it runs (Ray gives it one CPU)."""
    from ..core.threads import single_threaded

    with single_threaded():
        return analyse_one(index, item, load_options, settings, skip)
