"""Fully fine-tuned models read as updates (``full-delta``): ΔW = W − W₀ for every matrix the fine-tuned model
shares with its base (``--base``).

The input is a full model: a Hugging Face model directory (``config.json`` and ``model.safetensors``, or shards listed
in ``model.safetensors.index.json``), a diffusers component (``diffusion_pytorch_model*.safetensors``), or one
safetensors file whose keys are model weights only — never a directory with adapter files. What becomes a layer:

- every tensor of two or more dimensions that the base holds with the same shape: 2-D weights (linear layers, and
  embeddings, analysed as (d, V) as a LoRA embedding update is), convs as (out, in·∏k); named by the base's module
  path (``core.naming.layer_name`` of the base's key);
- a bias beside such a weight is that layer's bias update Δb (applied as it is).

What does not, each listed under ``skipped``: tensors identical to the base's (counted in a note), shapes that
differ (a resized embedding: a warning), tensors the base lacks (a warning), and 1-D parameters that are no
layer's bias (norm weights γ, …: counted in a note — a vector update of its own is not a matrix the fine-tune
shares with a LoRA). A quantised fine-tuned model (bitsandbytes, GPTQ/AWQ, integer or float8 tensors) is refused in
one line; a bitsandbytes base is dequantised as bitsandbytes does (``core.quantised``, with a warning: ΔW then
holds the quantisation error), a GPTQ/AWQ base refused naming its format.

Each layer is a lazy :class:`~..core.update.DenseUpdate`: reading compares the two tensors (to skip identical ones
and to measure rounding noise) and keeps nothing; materialising reads both again, moves each to the device once in
its stored dtype and subtracts there, so a model streams layer by layer within the analysis' memory budget.
A bf16/fp16 fine-tune of a float32 base carries the base's rounding, ~2⁻⁹·|W| per entry, a full-rank floor under
every spectrum: where it is at least a tenth of ‖ΔW‖_F, a warning says so.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from ..core.base import BaseWeights, as_matrix, index_files
from ..core.checkpoint import Checkpoint, Layer, Skipped, adapter_module, listed
from ..core.errors import CheckpointError
from ..core.naming import layer_name
from ..core.tensorfile import TensorFile, read_json
from ..core.update import DenseUpdate
from . import Format, PathSource, ReadOptions, register_format
from .common.peft import nonfinite_problem

FAMILY = "full-delta"
_INDEXES = ("model.safetensors.index.json", "diffusion_pytorch_model.safetensors.index.json")
_SINGLE = ("model.safetensors", "diffusion_pytorch_model.safetensors")
_SHARD = re.compile(r"^(model|diffusion_pytorch_model)-\d+-of-\d+\.safetensors$")
_ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "adapter_model.pt")
_EMBEDDING = re.compile(r"(embed|embedding|^wte$|^wpe$|^shared$)")
# key suffixes of quantised weights, by the format that writes them
_QUANTISED = {
    "qweight": "GPTQ/AWQ (qweight, qzeros, scales)",
    "qzeros": "GPTQ/AWQ (qweight, qzeros, scales)",
    "g_idx": "GPTQ (g_idx)",
    "SCB": "bitsandbytes 8-bit (SCB, weight_format)",
    "weight_format": "bitsandbytes 8-bit (SCB, weight_format)",
    "absmax": "bitsandbytes 4-bit (absmax, quant_map, quant_state)",
    "quant_map": "bitsandbytes 4-bit (absmax, quant_map, quant_state)",
}
_LOW_PRECISION = (torch.bfloat16, torch.float16)
NOISE_SHARE = 0.1  # warn where the base's rounding to the fine-tune's dtype is at least this share of ‖ΔW‖_F
_CHUNK = 1 << 24  # elements compared at a time at read time (a 128k-token embedding is 5·10⁸)


def _model_files(path: Path) -> dict[str, Path] | None:
    """Stored key → file for a full model at ``path``, or None where ``path`` is not one (no file is opened for a
    directory with an index)."""
    if path.is_dir():
        if any((path / name).is_file() for name in _ADAPTER_FILES) or not (path / "config.json").is_file():
            return None
        for name in _INDEXES:
            if (path / name).is_file():
                return index_files(path / name)
        files = [path / name for name in _SINGLE if (path / name).is_file()]
        files = files or sorted(p for p in path.iterdir() if _SHARD.match(p.name))
        return {key: file for file in files for key in TensorFile(file)} if files else None
    if path.suffix != ".safetensors" or (path.parent / "adapter_config.json").is_file():
        return None
    tensors = TensorFile(path)
    keys = tensors.keys()
    if any(adapter_module(key) is not None or "ln_tuning_layers" in key for key in keys):
        return None  # adapter weights: another format's
    if not any(key.endswith(".weight") and len(tensors.shape(key)) >= 2 for key in keys):
        return None
    return dict.fromkeys(keys, path)


def detect(source: PathSource) -> bool:
    """A model directory (weights and ``config.json``, no adapter files) or a safetensors file of model weights."""
    try:
        return _model_files(source.path) is not None
    except CheckpointError:
        return False  # a damaged file: the adapter formats report it


def _kind(module: str, ndim: int) -> str:
    if ndim > 2:
        return f"conv{ndim - 2}d"
    return "embedding" if _EMBEDDING.search(module.rpartition(".")[2]) else "linear"


def _delta(
    finetuned: TensorFile, key: str, base: BaseWeights, name: str, suffix: str, kind: str, dtype, device
) -> torch.Tensor:
    """W − W₀ as the analysed matrix: each tensor moved to ``device`` once, in its stored dtype, then upcast."""
    weight = finetuned.get(key).to(device)
    original = base.get(name, suffix).to(device)
    return as_matrix(weight.to(dtype, copy=True).sub_(original), kind)


@dataclass
class _Comparison:
    identical: bool
    delta_sq: float  # ‖W − W₀‖_F²
    noise_sq: float  # ‖round(W₀) − W₀‖_F², rounding W₀ to W's dtype (0 where W is not narrower)
    rounding_only: bool  # W is W₀ rounded to W's dtype, nothing else


def _squared_distance(rows: torch.Tensor, other: torch.Tensor, work: torch.dtype) -> float:
    """‖rows − other‖_F²: the difference and its squares in ``work`` (one copy), each row's sum in float64."""
    difference = rows.to(work, copy=True).sub_(other)
    return float(difference.square_().sum(dim=-1, dtype=torch.float64).sum())


def _compare(weight: torch.Tensor, original: torch.Tensor) -> _Comparison:
    """Compare in float32 blocks of rows (bf16/fp16 → float32 is exact), never holding a float64 copy."""
    if weight.dtype == original.dtype and torch.equal(weight, original):
        return _Comparison(True, 0.0, 0.0, False)
    narrower = weight.dtype in _LOW_PRECISION and original.dtype in (torch.float32, torch.float64)
    work = torch.float64 if torch.float64 in (weight.dtype, original.dtype) else torch.float32
    rows_w, rows_o = weight.reshape(weight.shape[0], -1), original.reshape(original.shape[0], -1)
    step = max(1, _CHUNK // max(rows_w.shape[1], 1))
    delta_sq = noise_sq = 0.0
    rounding_only = narrower
    for start in range(0, rows_w.shape[0], step):
        block_w, block_o = rows_w[start : start + step], rows_o[start : start + step]
        delta_sq += _squared_distance(block_w, block_o, work)
        if narrower:
            rounded = block_o.to(weight.dtype)
            noise_sq += _squared_distance(rounded, block_o, work)
            rounding_only = rounding_only and torch.equal(rounded, block_w)
    # a zero sum is equality only if no difference underflowed when squared in float32 (|d| ≲ 4e-23): checked
    identical = delta_sq == 0.0 and all(
        torch.equal(rows_w[i : i + step].to(work), rows_o[i : i + step].to(work))
        for i in range(0, rows_w.shape[0], step)
    )
    return _Comparison(identical, delta_sq, noise_sq, rounding_only)


def _quantised(key: str, tensor_dtype: torch.dtype | None = None) -> str | None:
    suffix = key.rpartition(".")[2]
    if suffix in _QUANTISED:
        return _QUANTISED[suffix]
    if "quant_state" in key:
        return _QUANTISED["absmax"]
    if tensor_dtype in (torch.int8, torch.uint8) and suffix == "weight":
        return f"{str(tensor_dtype).removeprefix('torch.')} weights (a quantised format)"
    if tensor_dtype is not None and "float8" in str(tensor_dtype):
        return f"{str(tensor_dtype).removeprefix('torch.')} weights (FP8 quantisation)"
    return None


def _refuse_quantised(what: str, fmt: str, path: Path, key: str) -> CheckpointError:
    return CheckpointError(f"{what} is quantised ({fmt}): full-delta reads float weights only", path=path, key=key)


@dataclass
class _Reading:
    layers: list[Layer] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    identical: list[str] = field(default_factory=list)
    vectors: list[str] = field(default_factory=list)  # changed 1-D parameters that are no layer's bias
    mismatched: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    noisy: list[tuple[str, float]] = field(default_factory=list)  # (layer, ‖noise‖/‖ΔW‖)
    rounding_only: list[str] = field(default_factory=list)
    biases: dict[str, tuple[str, torch.Tensor]] = field(default_factory=dict)  # module → (key, Δb)
    modules: dict[str, str] = field(default_factory=dict)  # layer → its stored module path (to attach its bias)
    dtypes: set[str] = field(default_factory=set)
    base_dtypes: set[str] = field(default_factory=set)


def _read_tensor(reading: _Reading, finetuned: TensorFile, key: str, base: BaseWeights, weights: set[str]) -> None:
    module, dot, suffix = key.rpartition(".")
    if not dot:
        reading.skipped.append(Skipped(key, "a parameter outside any module"))
        return
    name = layer_name(module)
    base_key = base.key_for(name, suffix)
    if base_key is None:
        if suffix == "weight":
            base.refuse_quantised(name)  # stored as GPTQ/AWQ under other keys: one line naming the format
        reading.missing.append(key)
        reading.skipped.append(Skipped(key, "the base model has no tensor of this name"))
        return
    shape, base_shape = tuple(finetuned.shape(key)), tuple(base.shape(name, suffix))
    if shape != base_shape:
        reading.mismatched.append(f"{key} {list(shape)} vs {list(base_shape)}")
        reading.skipped.append(Skipped(key, f"shape {list(shape)} here but {list(base_shape)} in the base"))
        return
    weight, original = finetuned.get(key), base.get(name, suffix)  # a bitsandbytes base comes dequantised
    for what, tensor, where in (("the fine-tuned model", weight, finetuned.path), ("the base", original, base.path)):
        quantised = _quantised(key, tensor.dtype)
        if quantised:
            raise _refuse_quantised(what, quantised, where, key)
    if not (weight.is_floating_point() and original.is_floating_point()):
        reading.skipped.append(Skipped(key, f"a {weight.dtype} tensor (a buffer such as position ids)", True))
        return
    comparison = _compare(weight, original)
    if comparison.identical:
        reading.identical.append(key)
        reading.skipped.append(Skipped(key, "identical to the base model's (not changed by fine-tuning)", True))
        return
    layer_path = layer_name(base_key.rpartition(".")[0].replace("/", ".")) if suffix == "weight" else layer_name(key)
    if weight.ndim < 2:
        if suffix == "bias" and module in weights:
            reading.biases[module] = (key, weight.double() - original.double())
            return
        reading.vectors.append(key)
        reading.skipped.append(Skipped(key, f"a {weight.ndim}-D parameter (norm weight, …): not a matrix update", True))
        return
    if weight.ndim > 2 and suffix != "weight":
        reading.skipped.append(Skipped(key, f"a {weight.ndim}-D parameter that is not a conv weight (not read)"))
        reading.warnings.append(f"{key}: a {weight.ndim}-D parameter that is not a conv weight is not analysed")
        return
    reading.dtypes.add(str(weight.dtype).removeprefix("torch."))
    reading.base_dtypes.add(str(original.dtype).removeprefix("torch."))
    if comparison.rounding_only:
        reading.rounding_only.append(layer_path)
    elif comparison.delta_sq > 0 and comparison.noise_sq >= NOISE_SHARE**2 * comparison.delta_sq:
        reading.noisy.append((layer_path, math.sqrt(comparison.noise_sq / comparison.delta_sq)))
    kind = _kind(module, weight.ndim)
    problem = nonfinite_problem(weight, key)
    if problem:
        reading.layers.append(Layer(layer_path, None, shape, weight.numel(), kind, FAMILY, error=problem))
        return
    matrix = tuple(as_matrix(torch.empty(shape, device="meta"), kind).shape)
    build = partial(_delta, finetuned, key, base, name, suffix, kind)
    update = DenseUpdate(shape=matrix, build=build)
    reading.layers.append(Layer(layer_path, update, shape, weight.numel(), kind, FAMILY, bias_scaled=False))
    reading.modules[layer_path] = module


def _messages(reading: _Reading, base: BaseWeights) -> tuple[list[str], list[str]]:
    warnings, notes = list(reading.warnings), []
    analysed = len(reading.layers)
    notes.append(
        f"a full fine-tune read as ΔW = W − W₀ against {base.path}: {analysed} matrices (embeddings included, as "
        "(d, V) like a LoRA embedding update; convs as (out, in·∏k)), each a dense update decomposed exactly in "
        "float64 (--top-k K: only the top K σ)"
    )
    if reading.identical:
        notes.append(f"{len(reading.identical)} tensor(s) identical to the base's (not trained): skipped")
    if reading.vectors:
        notes.append(
            f"{len(reading.vectors)} changed 1-D parameter(s) (norm weights, biases of no analysed matrix) are not "
            "matrix updates: listed under 'skipped'; the bias of an analysed layer is its bias_update"
        )
    if reading.mismatched:
        warnings.append(
            f"{len(reading.mismatched)} tensor(s) differ in shape from the base's (a resized vocabulary?), not "
            f"analysed: {listed(reading.mismatched)}"
        )
    if reading.missing:
        warnings.append(
            f"{len(reading.missing)} tensor(s) have no counterpart in the base model, not analysed: "
            f"{listed(reading.missing)}"
        )
    if base.dequantised:
        formats = ", ".join(sorted(set(base.dequantised.values())))
        warnings.append(
            f"the base is quantised ({formats}; {len(base.dequantised)} weight(s) dequantised as bitsandbytes "
            "does): ΔW = W − dequant(W₀) holds the quantisation error too, full-rank noise in every spectrum — "
            "compare against the unquantised base"
        )
    if reading.noisy or reading.rounding_only:
        fine, wide = "/".join(sorted(reading.dtypes)), "/".join(sorted(reading.base_dtypes))
        worst = max((share for _, share in reading.noisy), default=1.0 if reading.rounding_only else 0.0)
        only = (
            f"; {len(reading.rounding_only)} of them are nothing but the base rounded ({listed(reading.rounding_only)})"
            if reading.rounding_only
            else ""
        )
        warnings.append(
            f"the fine-tuned weights are {fine}, the base {wide}: rounding the base to {fine} alone (~2⁻⁹·|W| per "
            f"entry for bfloat16) is full-rank noise of up to {worst:.0%} of ‖ΔW‖_F in "
            f"{len(reading.noisy) + len(reading.rounding_only)} layer(s){only}; it fills the spectrum's tail — "
            f"compare against the base saved in {fine}"
        )
    return warnings, notes


def _config_beside(path: Path) -> dict:
    """The ``config.json`` of a model directory, or beside a weights file; {} where there is none."""
    config = path / "config.json" if path.is_dir() else path.parent / "config.json"
    found = read_json(config) if config.is_file() else {}
    return found if isinstance(found, dict) else {}


def _other_architecture(model_config: dict, base: BaseWeights) -> list[str]:
    """A warning where the fine-tuned model's and the base's config.json name different model types: W − W₀ of
    two models of matching shapes but another architecture (Qwen2 against Llama) is no fine-tune's update."""
    try:
        theirs = _config_beside(base.path)
    except CheckpointError:  # the base's config is not this reader's to judge
        return []
    mine, other = model_config.get("model_type"), theirs.get("model_type")
    if not mine or not other or mine == other:
        return []
    return [
        f"the fine-tuned model is a {mine!r} and --base a {other!r} (their config.json model_type): W − W₀ of two "
        "architectures is no fine-tune's update — is --base the model this one was fine-tuned from?"
    ]


def read(source: PathSource, options: ReadOptions) -> Checkpoint:
    path = source.path
    files = _model_files(path)
    if files is None:
        raise CheckpointError(
            "not a full model: expected config.json with model*.safetensors (or its index), a diffusers component, "
            "or a safetensors file of model weights, and no adapter files",
            path=path,
        )
    if options.base is None:
        raise CheckpointError(
            "a full model (no adapter files), so ΔW = W − W₀ needs the base model's weights: pass base=PATH (the base "
            "model directory or safetensors file)",
            path=path,
            argument="base",
        )
    base = options.base
    for key, file in files.items():
        quantised = _quantised(key)
        if quantised:
            raise _refuse_quantised("the fine-tuned model", quantised, file, key)
    opened = {file: TensorFile(file) for file in dict.fromkeys(files.values())}
    weights = {key.rpartition(".")[0] for key in files if key.endswith(".weight")}
    reading = _Reading()
    for file, tensors in opened.items():  # shard by shard
        for key in tensors:
            if files.get(key) == file:
                _read_tensor(reading, tensors, key, base, weights)
    for layer in reading.layers:
        found = reading.biases.pop(reading.modules.get(layer.name, ""), None)
        if found is not None:
            layer.bias_update = found[1]
    for key, _ in reading.biases.values():  # a changed bias whose weight is not analysed
        reading.vectors.append(key)
        reading.skipped.append(Skipped(key, "a bias whose weight is not analysed (unchanged or skipped)", True))
    if not reading.layers:
        why = "every tensor is identical to the base's" if reading.identical else "no matrix is shared with the base"
        raise CheckpointError(f"nothing to analyse: {why}", path=path)
    warnings, notes = _messages(reading, base)
    model_config = _config_beside(path)
    warnings += _other_architecture(model_config, base)
    return Checkpoint(
        path=path,
        family=FAMILY,
        adapter_type="full fine-tune",
        config={
            "reader": {"format": FAMILY},
            "base": str(base.path),
            "model_type": model_config.get("model_type") or model_config.get("_class_name"),
            "dtype": sorted(reading.dtypes),
            "base_dtype": sorted(reading.base_dtypes),
        },
        layers=reading.layers,
        skipped=reading.skipped,
        warnings=warnings,
        notes=notes,
        weights_file=next(iter(opened)),
    )


register_format(
    Format(
        "full-delta",
        "a fully fine-tuned model against its base (--base): ΔW = W − W₀ per shared matrix",
        detect,
        read,
        priority=60,
        reads="path",
        needs="--base",
        spectrum="dense (float64 SVD of W − W₀; --top-k K: randomised, labelled approximate)",
    )
)
