"""PEFT tuners whose layers share state across the whole model (TinyLoRA, UniLoRA, FRoD): read by building the model.

A TinyLoRA layer indexes trained vectors assigned across every layer (``tinylora_v.<i>``), a UniLoRA layer reads
its entries of one vector laid out over the whole model (``unilora_theta_d``), a FRoD layer's projection comes from
a joint decomposition of every base layer of its kind (``frod_V.<kind>``; its ``U`` is recomputed from the base at
load). None can be rebuilt one layer at a time, so here the whole base model is built and PEFT loads the adapter
into it as it would for inference:

1. the base directory's ``config.json`` names the architecture; transformers builds it and loads its weights in
   float64 (``from_pretrained(dtype=float64)``, offline, no remote code);
2. ``PeftModel.from_pretrained(model, adapter_dir)`` (PEFT's own API) loads the adapter;
3. W₀ of every tuner layer is copied, ``merge_and_unload()`` merges every layer, and ΔW = W_merged − W₀ (and
   Δb where the bias moved) is each layer's dense update.

Cost: the whole base model in float64 (8 bytes a parameter) plus one float64 ΔW per targeted module, held from
read time (where 8 bytes × the base's parameters exceed half the RAM, the read is refused naming the size).
A narrower dtype inside ``merge()``, or inside the load where PEFT recomputes a tensor the file does not hold
(FRoD's ``U``), gives ``exact: false`` with a warning.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ...core.base import BaseWeights, as_matrix
from ...core.checkpoint import MODULES_TO_SAVE, Checkpoint, Layer, Skipped
from ...core.errors import CheckpointError
from ...core.naming import layer_name
from ...core.update import DenseUpdate
from .peft_tuner import PEFT_PREFIX, _DtypeWatch, kind_of, matrix_shape, peft_config
from .reader import build_checkpoint
from .source import AdapterSource


def memory_limit() -> int:
    """Half the physical RAM (the default of ``--max-memory``): the most the float64 base model may take."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (ValueError, OSError, AttributeError):  # no sysconf (Windows): 8 GiB
        return 8 << 30


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


@dataclass
class WholeModel:
    """What the merge gave: the layers, the keys not analysed, and the narrower dtypes PEFT computed in."""

    layers: list[Layer]
    skipped: list[Skipped]
    shared_params: int
    merge_narrow: set[torch.dtype]  # inside merge()
    load_narrow: set[torch.dtype]  # while loading, where PEFT recomputed a tensor the file does not hold
    recomputed: list[str]  # tuner tensors PEFT computed at load (not in the file)

    @property
    def narrow(self) -> set[torch.dtype]:
        return self.merge_narrow | self.load_narrow


def _architecture(base_dir: Path, peft_type: str, where: Path):
    """The base's transformers config and model class, or a one-line refusal."""
    config_path = base_dir / "config.json"
    if not base_dir.is_dir() or not config_path.is_file():
        raise CheckpointError(
            f"{peft_type}'s layers share state across the whole model, so rankscope builds the whole model with "
            f"transformers and loads the adapter with PEFT: base must be a model directory with config.json, "
            f"not {base_dir}",
            path=where,
            argument="base",
        )
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(base_dir, local_files_only=True)
    except Exception as exc:  # a model type this transformers does not know, a broken config
        raise CheckpointError(f"transformers cannot read the base config: {exc}", path=config_path) from exc
    name = (getattr(config, "architectures", None) or [None])[0]
    architecture = getattr(transformers, name, None) if name else None
    if architecture is None:
        raise CheckpointError(
            f"transformers {transformers.__version__} has no model class {name!r} (the config's architectures), "
            f"which {peft_type} needs to build the whole base model",
            path=config_path,
        )
    return config, architecture


def _base_model(base_dir: Path, config, architecture, peft_type: str) -> nn.Module:
    """The whole base model in float64 on the CPU, refused first where it would not fit in memory."""
    with torch.device("meta"):
        shell = architecture._from_config(config)
    needed = 8 * sum(p.numel() for p in shell.parameters())
    if needed > memory_limit():
        raise CheckpointError(
            f"{peft_type} is read by building the whole base model in float64: it needs {_size(needed)}, above half "
            f"the RAM ({_size(memory_limit())})",
            path=base_dir,
        )
    try:
        return architecture.from_pretrained(base_dir, dtype=torch.float64, local_files_only=True)
    except Exception as exc:
        raise CheckpointError(f"transformers cannot load the base model: {exc}", path=base_dir) from exc


@contextlib.contextmanager
def _quiet_transformers():
    """transformers' progress bar and log chatter off while it loads (a reader prints nothing), then as they were."""
    from transformers.utils import logging

    bar, verbosity = logging.is_progress_bar_enabled(), logging.get_verbosity()
    logging.disable_progress_bar()
    logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.set_verbosity(verbosity)
        if bar:
            logging.enable_progress_bar()


def _tuner_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The tuner layers of a loaded PeftModel by base-model module path."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    inner = model.base_model.model
    return {name: module for name, module in inner.named_modules() if isinstance(module, BaseTunerLayer)}


def read_whole_model(peft, source: AdapterSource, base_dir: Path) -> WholeModel:
    """ΔW = W_merged − W₀ of every module the adapter targets, from PEFT's ``merge_and_unload()`` of the whole model.

    ``base_dir`` is a Hugging Face model directory (``config.json`` + weights)."""
    peft_type, where = source.peft_type, source.where
    adapter_dir = (source.config_path or source.weights_path).parent
    with _quiet_transformers():
        config, architecture = _architecture(base_dir, peft_type, where)
        model = _base_model(base_dir, config, architecture, peft_type)
    try:
        adapter_config = peft_config(peft, source.config)
    except (TypeError, ValueError, ImportError) as exc:
        raise CheckpointError(
            f"PEFT {peft.__version__} cannot read this {peft_type} config: {exc}", path=where
        ) from exc
    if hasattr(adapter_config, "progressbar"):
        adapter_config.progressbar = False  # FRoD's decomposition would draw a bar on stderr
    load_watch = _DtypeWatch()
    with warnings.catch_warnings(), torch.no_grad(), load_watch:
        warnings.simplefilter("ignore")  # PEFT's own missing-key warning is replaced by the check below
        try:
            peft_model = peft.PeftModel.from_pretrained(model, str(adapter_dir), config=adapter_config)
        except Exception as exc:  # a tensor whose shape the base does not have, a base that is not the adapter's
            raise CheckpointError(
                f"PEFT cannot load this {peft_type} adapter into the base: {exc}", path=where
            ) from exc
    peft_model.to(torch.float64)
    layers = _tuner_layers(peft_model)
    if not layers:
        raise CheckpointError(f"PEFT wrapped no module of the base with this {peft_type} adapter", path=where)
    stored = set(source.tensors)
    untrained, recomputed = _not_in_file(peft_model, layers, stored)
    if untrained:  # left at PEFT's init, the merge would be of an adapter that was never trained
        more = f" (and {len(untrained) - 1} more)" if len(untrained) > 1 else ""
        raise CheckpointError(
            f"this {peft_type} adapter file has no tensor for PEFT's {untrained[0]!r}{more}: PEFT would leave it at "
            "its init",
            path=where,
        )
    bases = {path: layer.get_base_layer() for path, layer in layers.items()}
    before = {path: _weights(module) for path, module in bases.items()}
    merge_watch = _DtypeWatch()
    with warnings.catch_warnings(), torch.no_grad(), merge_watch:
        warnings.simplefilter("ignore")
        peft_model.merge_and_unload()
    load_narrow = load_watch.narrow if recomputed else set()
    narrow = merge_watch.narrow | load_narrow
    own = _own_params(source, layers)
    out = []
    for path, module in bases.items():
        w0, b0 = before.pop(path)
        delta = w0.neg_().add_(module.weight.detach())  # W_merged − W0, in W0's copy (the model is let go)
        bias = getattr(module, "bias", None)
        bias_delta = None if b0 is None or bias is None else bias.detach().to(torch.float64) - b0
        kind, shape = kind_of(module), tuple(module.weight.shape)
        out.append(_layer(path, as_matrix(delta, kind), kind, shape, own.get(path, 0), peft_type, not narrow))
        if bias_delta is not None and bool(bias_delta.any()):
            out[-1].bias_update, out[-1].bias_scaled = bias_delta, False  # the change itself, not scaled
        del delta
    skipped = [Skipped(key, MODULES_TO_SAVE) for key in sorted(stored) if ".modules_to_save." in key]
    shared = sum(math.prod(source.tensors.shape(k)) for k in stored if _owner(k, layers) is None) - sum(
        math.prod(source.tensors.shape(s.key)) for s in skipped
    )
    return WholeModel(out, skipped, shared, merge_watch.narrow, load_narrow, recomputed)


def _weights(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    bias = getattr(module, "bias", None)
    return module.weight.detach().to(torch.float64).clone(), None if bias is None else bias.detach().clone()


def _owner(key: str, layers: dict[str, nn.Module]) -> str | None:
    """The tuner layer a stored key belongs to (``base_model.model.<path>.<tuner tensor>``), else None (shared)."""
    if not key.startswith(PEFT_PREFIX):
        return None
    rest = key.removeprefix(PEFT_PREFIX)
    path = rest.rpartition(".")[0]
    while path and path not in layers:
        path = path.rpartition(".")[0]
    return path or None


def _own_params(source: AdapterSource, layers: dict[str, nn.Module]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for key in source.tensors:
        path = _owner(key, layers)
        if path is not None and ".modules_to_save." not in key:
            counts[path] = counts.get(path, 0) + math.prod(source.tensors.shape(key))
    return counts


def _not_in_file(model: nn.Module, layers: dict[str, nn.Module], stored: set[str]) -> tuple[list[str], list[str]]:
    """The tuner layers' floating-point parameters and buffers (persistent or not) that the file does not hold and
    that are no model-level tensor loaded from it (TinyLoRA's ``tinylora_v``): (parameters, buffers). PEFT left
    such a parameter at its init; such a buffer it computed at load (from the base, or from a seed)."""
    tensors = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    loaded = {id(t) for n, t in tensors if n.replace(".default", "") in stored}
    parameters, buffers = [], []
    for path, layer in layers.items():
        for found, named in (
            (parameters, layer.named_parameters(remove_duplicate=False)),
            (buffers, layer.named_buffers()),
        ):
            for name, tensor in named:
                if name.startswith("base_layer.") or not tensor.is_floating_point() or id(tensor) in loaded:
                    continue
                if f"{PEFT_PREFIX}{path}.{name.replace('.default', '')}" not in stored:
                    found.append(f"{path}.{name.replace('.default', '')}")
    return parameters, buffers


def _layer(path: str, matrix: torch.Tensor, kind: str, shape, params: int, peft_type: str, exact: bool) -> Layer:
    def build(dtype, device) -> torch.Tensor:
        return matrix.to(dtype=dtype, device=device)

    update = DenseUpdate(matrix_shape(kind, shape), build)
    return Layer(layer_name(path), update, shape, params, kind=kind, family=peft_type.lower(), exact=exact)


def read_whole(peft, source: AdapterSource, base: BaseWeights | None, reader: str, why: str) -> Checkpoint:
    """The checkpoint of a whole-model tuner (``why``: what its layers share), recorded as read by ``reader``."""
    peft_type = source.peft_type
    if base is None:
        raise CheckpointError(
            f"{peft_type}'s ΔW is read from PEFT's merge of the whole base model (W_merged − W0): pass base=PATH (the "
            "base model directory with config.json)",
            path=source.where,
            argument="base",
        )
    whole = read_whole_model(peft, source, base.path)
    warnings_ = []
    if whole.narrow:
        dtypes = ", ".join(sorted(str(d).removeprefix("torch.") for d in whole.narrow))
        where = [
            *(["inside merge()"] if whole.merge_narrow else []),
            *([f"at load, where it recomputes {whole.recomputed[0]!r} from the base"] if whole.load_narrow else []),
        ]
        warnings_.append(
            f"PEFT {peft.__version__}'s {peft_type} computes in {dtypes} {' and '.join(where)} although the model is "
            "float64: its ΔW carries that precision (exact: false)"
        )
    notes = [
        f"ΔW = W_merged − W0 from PEFT {peft.__version__}'s merge_and_unload() of the whole base model in float64 "
        f"(dense; {why})"
    ]
    return build_checkpoint(
        source,
        family=peft_type.lower(),
        adapter_type=peft_type,
        layers=whole.layers,
        skipped=whole.skipped,
        warnings=warnings_,
        notes=notes,
        config={
            **(source.config or {}),
            "reader": {"format": reader, "peft": peft.__version__, "route": "whole-model"},
        },
        shared_params=whole.shared_params,
    )
