"""One PEFT tuner layer at a time: a base module rebuilt from ``--base`` in float64, wrapped by PEFT, merged by PEFT.

This is the only place rankscope imports ``peft`` (the optional extra ``rankscope[peft]``): the registry, the
native readers and ``import rankscope`` never do. For one adapted module:

1. :func:`base_module` rebuilds the base layer (``nn.Linear``, ``nn.Embedding``, ``nn.Conv1d/2d/3d`` or
   transformers' GPT-2 ``Conv1D``) from its stored weight (and bias) in float64;
2. :func:`merged_delta` nests it under its own module path in an empty ``nn.Module`` (so that PEFT's
   ``target_modules``, ``rank_pattern``, ``layers_to_transform`` … see the name they were written for), calls
   ``peft.inject_adapter_in_model`` with the adapter's config and ``peft.set_peft_model_state_dict`` with this
   module's tensors (and the adapter's shared ones), then the tuner layer's own ``merge()`` (an OFT linear layer:
   PEFT's own rotation applied block by block, :func:`_block_rotation_delta`);
3. ΔW = W_merged − W0 (and Δb = b_merged − b0), while a :class:`_DtypeWatch` records whether any floating-point
   result inside ``merge()`` was narrower than float64 (a tuner that casts to float32 is not exact).
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ...core.errors import CheckpointError

PEFT_PREFIX = "base_model.model."


def import_peft(peft_type: str):
    """``peft``, or a one-line error saying which extra to install."""
    try:
        import peft
    except ImportError as exc:
        raise CheckpointError(f"reading {peft_type} needs the peft extra: pip install 'rankscope[peft]'") from exc
    return peft


class BaseLayout:
    """The base model's module classes, where its directory has a transformers ``config.json``: the model is
    built on the meta device (no memory, no weights), so each layer is rebuilt as the class it is (GPT-2's
    ``Conv1D``, an ``nn.Embedding``, a conv with its groups). Without one (a bare tensor file, a diffusers
    component), the class is told by the weight (see :func:`guessed_module`)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._modules: dict[str, nn.Module] | None = None
        self.problem: str | None = None  # why the layout could not be built (then every layer is guessed)

    def module(self, name: str) -> nn.Module | None:
        if self._modules is None:
            self._modules = self._build()
        return self._modules.get(name)

    def _build(self) -> dict[str, nn.Module]:
        config_path = self.path / "config.json"
        if not config_path.is_file():
            return {}
        try:
            import transformers

            config = transformers.AutoConfig.from_pretrained(self.path)
            architecture = getattr(transformers, (config.architectures or ["AutoModel"])[0], transformers.AutoModel)
            with torch.device("meta"), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if architecture is transformers.AutoModel:
                    model = transformers.AutoModel.from_config(config)
                else:
                    model = architecture._from_config(config)
        except Exception as exc:  # a config transformers cannot build: fall back to the weights' own shapes
            self.problem = f"{type(exc).__name__}: {exc}"
            return {}
        return dict(model.named_modules())


def kind_of(module: nn.Module) -> str:
    """The analysed kind of a base layer (as :func:`~...core.base.as_matrix` names them)."""
    if type(module).__name__ == "Conv1D":
        return "conv1d_gpt2"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, nn.modules.conv._ConvNd):
        return f"conv{module.weight.ndim - 2}d"
    return "linear"


def guessed_module(
    name: str, weight_shape: tuple[int, ...], has_bias: bool, fan_in_fan_out: bool, embedding: bool = False
) -> nn.Module:
    """A meta-device base layer told by its weight: a conv by the weight's rank (groups 1), GPT-2's ``Conv1D``
    where the config says ``fan_in_fan_out``, an ``nn.Embedding`` where the adapter's tensors say so
    (``embedding``: PEFT names them ``oft_embedding_R``, ``hira_embedding_A``) or by its name, else an
    ``nn.Linear``."""
    with torch.device("meta"):
        if len(weight_shape) in (3, 4, 5):
            conv = {3: nn.Conv1d, 4: nn.Conv2d, 5: nn.Conv3d}[len(weight_shape)]
            return conv(weight_shape[1], weight_shape[0], tuple(weight_shape[2:]), bias=has_bias)
        if fan_in_fan_out:
            from transformers.pytorch_utils import Conv1D

            return Conv1D(weight_shape[1], weight_shape[0])
        last = name.rsplit(".", 1)[-1]
        if embedding or "embed" in last or last in ("wte", "wpe", "shared"):
            return nn.Embedding(weight_shape[0], weight_shape[1])
        return nn.Linear(weight_shape[1], weight_shape[0], bias=has_bias)


def base_module(template: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """A float64 copy of the meta-device layer ``template`` holding ``weight`` (and ``bias``)."""
    module = copy.deepcopy(template).to_empty(device="cpu")
    module.weight = nn.Parameter(weight.to(torch.float64).clone(), requires_grad=False)
    if getattr(module, "bias", None) is not None or bias is not None:
        value = bias if bias is not None else torch.zeros(module.bias.shape)
        module.bias = nn.Parameter(value.to(torch.float64).clone(), requires_grad=False)
    return module


def _nest(path: str, module: nn.Module) -> nn.Module:
    """An empty model that holds ``module`` under ``path`` (``model.layers.0.self_attn.q_proj``)."""
    root = nn.Module()
    parent = root
    *parents, last = path.split(".")
    for segment in parents:
        child = nn.Module()
        parent.add_module(segment, child)
        parent = child
    parent.add_module(last, module)
    return root


class _DtypeWatch(TorchFunctionMode):
    """Records the narrower floating-point dtypes that torch calls produced from float64 tensors while active
    (a cast or an op that drops precision; a float32 constant such as ``torch.eye`` promoted later drops none)."""

    def __init__(self) -> None:
        super().__init__()
        self.narrow: set[torch.dtype] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        inputs = [*args, *(kwargs or {}).values()]
        wide = any(isinstance(v, torch.Tensor) and v.dtype == torch.float64 for v in _flat(inputs))
        if wide:
            for value in _flat([result]):
                if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != torch.float64:
                    self.narrow.add(value.dtype)
        return result


def _flat(values) -> list:
    out = []
    for value in values:
        out.extend(_flat(value) if isinstance(value, (tuple, list)) else [value])
    return out


@dataclass
class Merged:
    """What one module's merge gave: ΔW as stored (the base weight's layout), Δb (None where unchanged), and the
    narrower dtypes the tuner computed in (empty: float64 throughout)."""

    delta: torch.Tensor
    bias_delta: torch.Tensor | None
    narrow: set[torch.dtype]


def peft_config(peft, config: Mapping):
    """PEFT's config object for an adapter_config.json, with what a single-module model cannot have removed
    (``modules_to_save``: heads the adapter trains in full, read elsewhere; ``target_parameters``)."""
    fields = {k: v for k, v in config.items() if k not in ("modules_to_save", "target_parameters")}
    known = peft.PEFT_TYPE_TO_CONFIG_MAPPING[fields["peft_type"]]
    accepted = set(known.__dataclass_fields__)
    fields = {k: v for k, v in fields.items() if k in accepted}  # a newer PEFT's extra field is not this one's
    fields["inference_mode"] = True
    return known(**fields)


def merged_delta(*args, **kwargs) -> Merged:
    """:func:`_merged_delta` with PEFT's own warnings kept out of rankscope's output (a CUDA kernel that BOFT
    fails to build, a default it adjusts: they concern training, not this merge)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _merged_delta(*args, **kwargs)


def _merged_delta(
    peft, config, path: str, module: nn.Module, tensors: Mapping[str, torch.Tensor], *, prefix: str, shared, where
) -> Merged:
    """ΔW = W_merged − W0 of ``module`` (a float64 base layer named ``path``) from PEFT's own ``merge()``.

    ``tensors`` are the adapter's stored keys for this module and its shared ones (their last segments in
    ``shared``), spelled as saved; every parameter of PEFT's layer whose name holds ``prefix`` (the tuner's,
    ``oft_``) must be among them."""
    w0 = module.weight.detach().clone()
    b0 = module.bias.detach().clone() if getattr(module, "bias", None) is not None else None
    narrow: set[torch.dtype] = set()
    try:  # a PeftModel, as PEFT loads an adapter (tuners with state shared across layers need its tuner)
        model = peft.get_peft_model(_nest(path, module), config)
    except TypeError:  # a tuner whose init refuses float64 (PSOFT): initialised in float32, loaded in float64
        narrow.add(torch.float32)
        model = _wrap_float32(peft, config, path, module, where)
    except Exception as exc:  # PEFT's own check of the layer against the config (a block size that does not divide)
        raise CheckpointError(f"PEFT cannot wrap layer {path!r}: {exc}", path=where) from exc
    model.to(torch.float64)  # before loading: a float32 file's values load exactly into float64 parameters
    try:
        loaded = peft.set_peft_model_state_dict(model, _fitted(model, tensors, shared), adapter_name="default")
    except RuntimeError as exc:  # a tensor whose shape PEFT's layer does not have
        raise CheckpointError(f"PEFT cannot load the tensors of layer {path!r}: {exc}", path=where) from exc
    if loaded.unexpected_keys:
        raise CheckpointError(f"PEFT's layer for {path!r} has no place for {loaded.unexpected_keys[0]!r}", path=where)
    absent = set(loaded.missing_keys)
    # a parameter the tuner keeps once and ties into every layer (VBLoRA's vector bank) is loaded at the top
    tied = {key.split(".", 1)[1] for key in model.state_dict() if not key.startswith(PEFT_PREFIX) and key not in absent}
    missing = [
        key for key in loaded.missing_keys if prefix in key and ".default" in key and not key.endswith(tuple(tied))
    ]
    if missing:  # left at PEFT's init, the merge would be of an adapter that was never trained
        raise CheckpointError(f"layer {path!r} has no stored tensor for PEFT's {missing[0]!r}", path=where)
    layer = model.get_submodule(PEFT_PREFIX + path)
    if not hasattr(layer, "merge"):
        raise CheckpointError(f"PEFT's {type(layer).__name__} for layer {path!r} cannot merge", path=where)
    watch = _DtypeWatch()
    with torch.no_grad(), watch:
        delta = _block_rotation_delta(peft, layer)
        if delta is None:
            layer.merge(adapter_names=["default"])
    base = layer.get_base_layer()
    if delta is None:
        delta = base.weight.detach().to(torch.float64) - w0
    bias = getattr(base, "bias", None)
    bias_delta = None
    if b0 is not None and bias is not None:
        change = bias.detach().to(torch.float64) - b0
        bias_delta = change if bool(change.any()) else None
    return Merged(delta, bias_delta, narrow | watch.narrow)


def _block_rotation_delta(peft, layer: nn.Module) -> torch.Tensor | None:
    """ΔW of an OFT ``Linear``'s merge, W·Rᵀ − W with R PEFT's own rotation (``get_delta_weight``), taken block by
    block where R is block-diagonal (checked: every nonzero inside the diagonal blocks); None for any other layer.

    PEFT's ``merge()`` multiplies by R as a dense in × in matrix, in²·out multiply-adds — 0.24 TFLOP for a 4096 ×
    14336 layer, 0.84 for 14336 × 4096 — where the b × b blocks need in·b·out: the same products, the zeros left
    out."""
    oft = getattr(getattr(peft, "tuners", None), "oft", None)
    linear = getattr(oft, "Linear", None)
    if linear is None or type(layer) is not linear or "default" not in getattr(layer, "oft_R", {}):
        return None
    base = layer.get_base_layer()
    if type(base) is not nn.Linear or getattr(layer, "fan_in_fan_out", False):
        return None
    rotation = layer.get_delta_weight("default")
    weight = base.weight.detach()
    rows, columns = weight.shape
    size = int(getattr(layer.oft_R["default"], "block_size", 0) or 0)
    if size <= 0 or columns % size or tuple(rotation.shape) != (columns, columns) or rotation.dtype != weight.dtype:
        return None
    count = columns // size
    blocks = rotation.view(count, size, count, size).diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # R_k: count×b×b
    if int(torch.count_nonzero(rotation)) != int(torch.count_nonzero(blocks)):
        return None
    # (R·Wᵀ)ᵀ, as PEFT's merge forms it: column block k of the result is W[:, block k]·R_kᵀ
    merged = torch.einsum("mkc,kdc->mkd", weight.reshape(rows, count, size), blocks).reshape(rows, columns)
    return merged - weight


def _fitted(model: nn.Module, tensors: Mapping[str, torch.Tensor], shared: frozenset[str]) -> dict[str, torch.Tensor]:
    """The stored tensors, with the projections shared across layers (their last key segment in ``shared``) cut
    to this one layer's size.

    PEFT sizes a tuner's shared random projections (RandLoRA's, PVeRA's) by the largest layer of the whole
    model and each layer uses their leading block (``A[:, :in_features]``); a model of one layer makes them that
    layer's size, so a stored projection larger in some dimension is cut to its leading block. A layer's own
    tensors are never cut: one that does not fit is an error (a base that is not the adapter's)."""
    wanted = {key.replace(".default", ""): tuple(value.shape) for key, value in model.state_dict().items()}
    fitted = dict(tensors)
    for key, tensor in tensors.items():
        shape = wanted.get(key)
        cut = key.rsplit(".", 1)[-1] in shared and shape is not None and len(shape) == tensor.ndim
        if cut and shape != tuple(tensor.shape) and all(w <= t for w, t in zip(shape, tensor.shape, strict=True)):
            fitted[key] = tensor[tuple(slice(0, w) for w in shape)]
    return fitted


def _wrap_float32(peft, config, path: str, module: nn.Module, where):
    try:
        return peft.get_peft_model(_nest(path, module.to(torch.float32)), config)
    except Exception as exc:
        raise CheckpointError(f"PEFT cannot wrap layer {path!r}: {exc}", path=where) from exc


def matrix_shape(kind: str, weight_shape: tuple[int, ...]) -> tuple[int, int]:
    """The analysed (out, in·k…) shape of a base weight of ``kind``."""
    if kind in ("conv1d_gpt2", "embedding"):
        return weight_shape[1], weight_shape[0]
    return weight_shape[0], math.prod(weight_shape[1:])
