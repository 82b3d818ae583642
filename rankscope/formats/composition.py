"""Weighted compositions of adapters (BoostLoRA-style): a ``composition.json`` manifest, or ``--compose``.

Manifest, in a directory (``d/composition.json``) or given as the file itself::

    {"format": "rankscope.composition/1",
     "mode": "sum",                      # or "sequential": boosting rounds, in order
     "components": ["round0", "round1", "round2"],   # paths relative to the manifest, any readable adapter
     "weights": [0.6, 0.3, 0.1],         # or {"default": [...], "per_layer": {"<layer regex>": [...]}}
     "normalize": "none"}                # or "softmax": the weights are logits

Per layer: ΔW = Σ_i w_i·ΔW_i over the components that adapt that layer. A component may itself be a manifest: it
flattens (its components join the parent's with weights multiplied); a cycle is an error. ``--compose a,b,c
--weights …`` builds the same from the adapters of a PEFT multi-adapter directory.

Registered as the format ``composition`` (``reads="path"``): detection asks it before looking for adapter files.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

from ..core.checkpoint import Checkpoint, Layer, Skipped
from ..core.compose import MODES, NORMALIZATIONS, compose_layer, layer_weights, normalize_weights
from ..core.errors import CheckpointError
from ..core.hub import parse_hub_id
from ..core.naming import model_order_key
from ..core.tensorfile import read_json
from . import Format, PathSource, ReadOptions, register_format

MANIFEST_NAME = "composition.json"
SCHEMA = "rankscope.composition/1"
_KNOWN_FIELDS = {"format", "mode", "components", "weights", "normalize", "labels", "description"}

Loader = Callable[[Path, tuple[Path, ...]], Checkpoint]


def manifest_path(path: Path) -> Path | None:
    """The manifest ``path`` names: the file itself (``*.json``) or ``composition.json`` in the directory."""
    if path.is_dir() and (path / MANIFEST_NAME).is_file():
        return path / MANIFEST_NAME
    if path.is_file() and path.suffix == ".json" and path.name != "adapter_config.json":
        return path
    return None


def _resolved(path: Path) -> Path:
    try:
        return path.resolve(strict=True)
    except FileNotFoundError as exc:
        raise CheckpointError("no such file or directory", path=path) from exc
    except (OSError, RuntimeError) as exc:  # a symlink loop raises one or the other, by Python version
        raise CheckpointError(f"cannot resolve the path ({exc})", path=path) from exc


def _choice(manifest: dict, field: str, allowed: Sequence[str], default: str, where: Path) -> str:
    value = manifest.get(field, default)
    if value not in allowed:
        raise CheckpointError(f"{field} must be one of {', '.join(allowed)}, found {value!r}", path=where)
    return value


def read_manifest(path: Path, loader: Loader, stack: tuple[Path, ...] = ()) -> Checkpoint:
    """Load the manifest at ``path`` and its components (through ``loader``) into a composed checkpoint."""
    manifest_file = manifest_path(path)
    if manifest_file is None:
        raise CheckpointError(
            f"not a composition manifest: expected a {MANIFEST_NAME} file (or a .json manifest), or a directory "
            f"holding {MANIFEST_NAME}",
            path=path,
        )
    key = _resolved(manifest_file)
    if key in stack:
        raise CheckpointError("composition cycle: this manifest includes itself", path=manifest_file)
    manifest = read_json(manifest_file)
    if manifest.get("format", SCHEMA) != SCHEMA:
        raise CheckpointError(f"format must be {SCHEMA!r}, found {manifest.get('format')!r}", path=manifest_file)
    warnings = [f"unknown field {name!r} ignored" for name in manifest if name not in _KNOWN_FIELDS]
    names = manifest.get("components")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise CheckpointError("components must be a non-empty list of paths", path=manifest_file)
    if "weights" not in manifest:
        raise CheckpointError("weights are missing (one number per component)", path=manifest_file)
    default = [Path(n).name or n for n in names]  # folder names, or the paths where those collide (run1/final …)
    labels = manifest.get("labels") or (default if len(set(default)) == len(default) else list(names))
    if not isinstance(labels, list) or len(labels) != len(names) or len(set(map(str, labels))) != len(labels):
        raise CheckpointError("labels must be a list of distinct names, one per component", path=manifest_file)
    components = []
    for name in names:
        component_path = manifest_file.parent / name
        if component_path.is_symlink():  # a symlink loop is named as such, not as a missing component
            try:
                component_path.resolve(strict=True)
            except (OSError, RuntimeError) as exc:
                message = f"component {name!r} is a symlink that cannot be resolved ({exc})"
                raise CheckpointError(message, path=manifest_file) from exc
        if not component_path.exists():
            if parse_hub_id(name) is None:
                raise CheckpointError(f"component {name!r} does not exist", path=manifest_file)
            component_path = Path(name)  # a hub id, fetched (or found in the cache) as the component is read
        components.append(loader(component_path, (*stack, key)))
    return compose_checkpoints(
        manifest_file,
        [str(label) for label in labels],
        components,
        weights_spec=manifest["weights"],
        normalize=_choice(manifest, "normalize", NORMALIZATIONS, "none", manifest_file),
        mode=_choice(manifest, "mode", MODES, "sum", manifest_file),
        config=manifest,
        warnings=warnings,
    )


def _parts(layer: Layer, label: str) -> list[tuple[Layer, float]] | None:
    """A nested composition's parts as (component layer named ``label/part``, applied weight); None otherwise."""
    if layer.family != "composition" or layer.components is None or layer.composition is None:
        return None
    weights = layer.composition.weights
    return [(replace(p, name=f"{label}/{p.name}"), w) for p, w in zip(layer.components, weights, strict=True)]


def compose_checkpoints(
    where: Path,
    labels: Sequence[str],
    checkpoints: Sequence[Checkpoint],
    *,
    weights_spec: object,
    normalize: str,
    mode: str,
    config: dict,
    warnings: Sequence[str] = (),
) -> Checkpoint:
    """Compose the layers of several checkpoints of the same base, matched by layer name."""
    by_name: dict[str, list[tuple[int, Layer]]] = {}
    for index, checkpoint in enumerate(checkpoints):
        for layer in checkpoint.layers:
            by_name.setdefault(layer.name, []).append((index, layer))
    layers = []
    partial = 0
    for name in sorted(by_name, key=model_order_key):
        raw = layer_weights(weights_spec, name, len(checkpoints), where=where)
        applied = normalize_weights(raw, normalize)
        parts, raw_parts, applied_parts, nested = [], [], [], False
        for index, layer in by_name[name]:
            inner = _parts(layer, labels[index])
            if inner is None:
                parts.append(replace(layer, name=labels[index]))
                raw_parts.append(raw[index])
                applied_parts.append(applied[index])
                continue
            nested = True
            for part, weight in inner:
                parts.append(part)
                applied_parts.append(applied[index] * weight)
        if nested:  # flattened weights are products of applied ones: record them as applied, unnormalised
            raw_parts, layer_normalize = list(applied_parts), "none"
        else:
            layer_normalize = normalize
        partial += len(by_name[name]) < len(checkpoints)
        layers.append(
            compose_layer(name, parts, raw_parts, weights=applied_parts, normalize=layer_normalize, mode=mode)
        )
    all_warnings = list(warnings)
    if partial:
        all_warnings.append(f"{partial} layer(s) adapted by only some components: each composes those present")
    for label, checkpoint in zip(labels, checkpoints, strict=True):
        all_warnings += [f"component {label}: {w}" for w in checkpoint.warnings]
    return Checkpoint(
        path=where.parent if where.name == MANIFEST_NAME else where,
        family="composition",
        adapter_type="COMPOSITION",
        config=config,
        layers=layers,
        skipped=[
            Skipped(f"{label}:{s.key}", s.reason, s.expected)
            for label, c in zip(labels, checkpoints, strict=True)
            for s in c.skipped
        ],
        warnings=all_warnings,
        notes=[f"{len(checkpoints)} components ({', '.join(labels)}), mode {mode}, weights normalised: {normalize}"],
        weights_file=where,
        shared_params=sum(c.shared_params for c in checkpoints),
    )


def manifest_json(names: Sequence[str], weights: Sequence[float], normalize: str, mode: str) -> dict:
    """The manifest that ``--compose`` stands for (recorded as the composed checkpoint's config)."""
    return {"format": SCHEMA, "mode": mode, "components": list(names), "weights": list(weights), "normalize": normalize}


def detect(source: PathSource) -> bool:
    return manifest_path(source.path) is not None


def read(source: PathSource, options: ReadOptions) -> Checkpoint:
    """The manifest's components, each loaded with the same options, composed layer by layer."""
    return read_manifest(source.path, source.load, source.stack)


register_format(
    Format(
        "composition",
        "a composition.json manifest (or a directory holding one): weighted sum of adapters",
        detect,
        read,
        priority=0,
        reads="path",
        needs="nothing (its components' needs)",
        spectrum="factored where its components are, else dense",
    )
)
