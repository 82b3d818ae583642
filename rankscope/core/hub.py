"""Hugging Face hub ids as inputs: ``owner/name[@revision]`` → the local snapshot folder holding its files.

An existing local path always wins: ``resolve_adapter``/``resolve_base`` return a path that exists (or that does
not look like an id) unchanged. Otherwise the id is fetched with ``huggingface_hub.snapshot_download``, asking
only for the files that are read — an adapter's ``adapter_config.json`` and weights (``adapter_model.safetensors``
/ ``.bin``, diffusers' ``pytorch_lora_weights.safetensors``), a base model's ``config.json`` and safetensors
weights (one file or the shards of its index; a diffusers pipeline's component folders the same way). The cache
is the one huggingface_hub uses (``HF_HUB_CACHE``, else ``HF_HOME``/hub, read when called); ``HF_HUB_OFFLINE``
(read when called, too) reads the cache only; ``HF_TOKEN`` is huggingface_hub's own. huggingface_hub is the
optional extra ``rankscope[hub]``, imported only when an id is resolved.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from .base import COMPONENTS
from .errors import CheckpointError

# owner/name as the hub spells repo ids, then an optional @revision (a branch, tag or commit; refs/pr/1 too)
_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]*[A-Za-z0-9_])(?:@(?P<revision>[\w./-]+))?$")
_TRUE = ("1", "true", "yes", "on")
_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".json")

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin", "pytorch_lora_weights.safetensors")
_WEIGHT_STEMS = ("model", "diffusion_pytorch_model")  # a transformers model's and a diffusers component's


def parse_hub_id(text: str | os.PathLike) -> tuple[str, str | None] | None:
    """``(repo_id, revision)`` when ``text`` reads as ``owner/name[@revision]``, else None."""
    match = _HUB_ID.match(str(text))
    if match is None or ".." in match["repo"] or match["repo"].endswith(_FILE_SUFFIXES):
        return None  # a path (``runs/final.safetensors``, ``a/../b``), never a repository
    return match["repo"], match["revision"]


def _is_id(path: str | os.PathLike) -> tuple[str, str | None] | None:
    return None if Path(path).exists() else parse_hub_id(path)


def resolve_adapter(path: str | os.PathLike, adapter: str | None = None) -> str | os.PathLike | Path:
    """The local folder of the adapter that ``path`` names: ``path`` itself unless it is a hub id not on disk.

    ``adapter`` (a multi-adapter repo's sub-folder) adds that folder's adapter files to those fetched. A repository
    with a ``config.json`` and no adapter files is a model: its weights are fetched as a base model's are (a full
    fine-tune, read against ``--base``).
    """
    found = _is_id(path)
    if found is None:
        return path
    patterns = [*ADAPTER_FILES, "pytorch_lora_weights.safetensors", "config.json"]
    named = adapter is not None and adapter != "default"
    if named:
        patterns += [f"{adapter}/{name}" for name in ADAPTER_FILES]
    snapshot = _snapshot(*found, patterns, what="adapter")
    inside = snapshot / adapter if named else snapshot
    adapted = any((inside / name).is_file() for name in ADAPTER_WEIGHTS)
    if not adapted and not named and (snapshot / "config.json").is_file():
        return resolve_base(path)  # a model's repository, no adapter in it: a full fine-tune (read with --base)
    if not adapted:
        wanted = inside / ADAPTER_WEIGHTS[0]
        raise CheckpointError(f"the cached snapshot lacks {_inner(wanted, snapshot)} (or .bin) ({snapshot})", path=path)
    return snapshot


def resolve_base(path: str | os.PathLike) -> str | os.PathLike | Path:
    """The local folder of the base model that ``path`` names: ``path`` itself unless it is a hub id not on disk.

    Only ``config.json`` and the safetensors weights are fetched (with a pipeline's component folders).
    """
    found = _is_id(path)
    if found is None:
        return path
    patterns = ["config.json", "model_index.json"]
    for folder in ("", *(f"{component}/" for component in COMPONENTS)):
        patterns.append(f"{folder}config.json")
        for stem in _WEIGHT_STEMS:
            patterns += [f"{folder}{stem}.safetensors", f"{folder}{stem}.safetensors.index.json"]
            patterns.append(f"{folder}{stem}-*-of-*.safetensors")
    snapshot = _snapshot(*found, patterns, what="base model")
    folders = [snapshot / c for c in COMPONENTS if (snapshot / c).is_dir()]
    if (snapshot / "model_index.json").is_file() and folders:
        for folder in folders:
            _check_weights(path, snapshot, folder)
    else:
        _check_weights(path, snapshot, snapshot)
    return snapshot


def _check_weights(hub_id: str | os.PathLike, snapshot: Path, folder: Path) -> None:
    """A cached folder must hold its weights: every shard its index lists, else one whole weights file."""
    for stem in _WEIGHT_STEMS:
        index = folder / f"{stem}.safetensors.index.json"
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                raise CheckpointError(f"unreadable shard index {index} ({exc})", path=hub_id) from exc
            for shard in shards:
                if not (folder / shard).is_file():
                    missing = _inner(folder / shard, snapshot)
                    raise CheckpointError(f"the cached snapshot lacks {missing} ({snapshot})", path=hub_id)
            return
        if (folder / f"{stem}.safetensors").is_file():
            return
    wanted = folder / ("model.safetensors" if folder == snapshot else "diffusion_pytorch_model.safetensors")
    missing = _inner(wanted, snapshot)
    raise CheckpointError(f"the cached snapshot lacks {missing} (or an index of shards) ({snapshot})", path=hub_id)


def _inner(file: Path, snapshot: Path) -> str:
    return file.relative_to(snapshot).as_posix()


def _cache_dir() -> str | None:
    """huggingface_hub's cache as the environment names it now (the library reads it once, at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]) / "hub")
    return None


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def _snapshot(repo_id: str, revision: str | None, patterns: list[str], *, what: str) -> Path:
    """The snapshot folder of ``repo_id`` at ``revision`` (default: main) with the files ``patterns`` allow."""
    name = f"{repo_id}@{revision}" if revision else repo_id
    try:
        import huggingface_hub
        from huggingface_hub import constants, errors
    except ImportError as exc:
        raise CheckpointError(
            f"{name!r} looks like a Hugging Face hub id, and no such local path exists; reading from the hub "
            "needs the hub extra: pip install 'rankscope[hub]'"
        ) from exc
    local_only = offline() or bool(constants.HF_HUB_OFFLINE)
    try:
        folder = huggingface_hub.snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=_cache_dir(),
            allow_patterns=patterns,
            local_files_only=local_only,
        )
    except errors.IncompleteSnapshotError as exc:
        raise CheckpointError(f"hub {what}: the cached snapshot is incomplete ({exc})", path=name) from exc
    except errors.LocalEntryNotFoundError as exc:
        why = "the hub is offline (HF_HUB_OFFLINE)" if local_only else "the hub cannot be reached"
        message = f"no such local path; as a hub {what} it is not in the local cache, and {why}"
        raise CheckpointError(message, path=name) from exc
    except errors.RevisionNotFoundError as exc:
        raise CheckpointError(f"hub {what}: no revision {revision!r} on the hub", path=name) from exc
    except errors.GatedRepoError as exc:
        raise CheckpointError(
            f"hub {what}: the repository is gated; accept its terms and set HF_TOKEN", path=name
        ) from exc
    except errors.RepositoryNotFoundError as exc:
        raise CheckpointError(
            "no such local path, and no such hub repository (or a private one: set HF_TOKEN)", path=name
        ) from exc
    except (errors.HfHubHTTPError, errors.HFValidationError, OSError) as exc:
        raise CheckpointError(f"hub {what}: {type(exc).__name__}: {exc}", path=name) from exc
    return Path(folder)
