"""Writing a converted adapter: a PEFT folder, one kohya ``.safetensors``, or a diffusers LoRA file.

Every output is staged beside its target (a temporary folder or file) and renamed into place: an error leaves
nothing. An output is never written over one of its inputs, nor into (or over) an input's folder.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save

from .. import __version__
from ..core.errors import RankscopeError, UsageProblem
from .experts import nesting_depths, parameter_of
from .suggest import lora_fields

if TYPE_CHECKING:
    from .convert import ConvertedAdapter, ConvertedLayer

TARGETS = ("peft", "kohya", "diffusers")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
PEFT_PREFIX = "base_model.model."
DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"
# diffusers' component prefixes, and kohya's for them (diffusers' kohya mapping reads lora_unet_ / lora_te_ names)
_KOHYA_PREFIXES = {
    "unet": "lora_unet",
    "text_encoder": "lora_te",
    "text_encoder_2": "lora_te2",
    "transformer": "lora_unet",
}
_UNET_BLOCKS = ("down_blocks", "up_blocks", "mid_block", "conv_in", "conv_out", "time_embedding")


def _usual_mode(mode: int) -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mode & ~mask


def _inputs(adapter: ConvertedAdapter) -> list[Path]:
    """Every input path and the folder it lies in."""
    places = []
    for checkpoint in adapter.sources:
        for path in (checkpoint.path, checkpoint.weights_file):
            if path is not None:
                path = Path(path).resolve()
                places += [path, path if path.is_dir() else path.parent]
    return places


def check_destination(adapter: ConvertedAdapter, path: Path) -> None:
    """Refuse an output over an input, inside an input's folder, or over a folder that holds an input."""
    target = path.resolve()
    for place in _inputs(adapter):
        if target == place or target.is_relative_to(place) or place.is_relative_to(target):
            raise UsageProblem(
                f"output {path} would be written over or into the folder of the input {place}: choose a path "
                "outside it",
                argument="output",
            )
    if target.exists():
        raise UsageProblem(f"output {path} exists already: remove it or choose another path", argument="output")


def _stage_folder(path: Path, files: dict[str, bytes]) -> None:
    parent = path.parent
    parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent))
    try:
        for name, data in files.items():
            (staging / name).write_bytes(data)
            (staging / name).chmod(_usual_mode(0o666))
        staging.chmod(_usual_mode(0o777))
        os.rename(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _stage_file(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        Path(temporary).chmod(_usual_mode(0o666))
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _factors(layer: ConvertedLayer, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(A′, B′) in the module's own layout: conv factors as PEFT's and kohya's ConvNd kernels."""
    down, up = layer.down, layer.up
    if layer.kind.startswith("conv") and layer.kind != "conv1d_gpt2":
        down = down.reshape(layer.rank, *layer.weight_shape[1:])
        up = up.reshape(*up.shape, *([1] * (len(layer.weight_shape) - 2)))
    return down.to(dtype).contiguous(), up.to(dtype).contiguous()


def peft_tensors(adapter: ConvertedAdapter, dtype: torch.dtype, prefix: str = PEFT_PREFIX) -> dict[str, torch.Tensor]:
    """The state dict PEFT's ``set_peft_model_state_dict`` loads: ``<prefix><module>.lora_A.weight`` …"""
    tensors = {}
    depths = _expert_depths(adapter) if any(layer.experts > 1 for layer in adapter.layers) else {}
    for layer in adapter.layers:
        down, up = _factors(layer, dtype)
        if layer.experts > 1:  # on the module that holds the parameter, inside any wrappers declared after it
            module = layer.name.rpartition(".")[0] + ".base_layer" * depths[layer.name]
            tensors[f"{prefix}{module}.lora_A.weight"] = down
            tensors[f"{prefix}{module}.lora_B.weight"] = up
            continue
        if layer.kind == "embedding":
            tensors[f"{prefix}{layer.name}.lora_embedding_A"] = down
            tensors[f"{prefix}{layer.name}.lora_embedding_B"] = up
            continue
        tensors[f"{prefix}{layer.name}.lora_A.weight"] = down
        tensors[f"{prefix}{layer.name}.lora_B.weight"] = up
        if layer.bias is not None:
            tensors[f"{prefix}{layer.name}.lora_B.bias"] = layer.bias.to(dtype).contiguous()
    return tensors


def peft_config(adapter: ConvertedAdapter) -> dict:
    """``adapter_config.json``: the source's base model, targets and task type; the ranks and α that reproduce
    each layer's scale; everything not written in ``exclude_modules``."""
    source = adapter.sources[0].config or {}
    suggestion = adapter.suggestion
    written = {layer.name for layer in adapter.layers}
    excluded = [name for layer in suggestion.layers if (name := layer.name) not in written
                and (parameter_of(name) or ("",))[0] not in written]  # fmt: skip
    excluded += [name for name, _ in suggestion.left_out]
    targets = source.get("target_modules") if len(adapter.sources) == 1 else None
    parameters = _written_parameters(adapter)
    # PEFT matches the patterns of a targeted parameter against its path (``mlp.gate.weight``, ``…gate_up_proj``)
    paths = _parameter_paths(adapter)
    entries = [(p if _selected(p, parameters) else x.name, x.rank, x.alpha)
               for x, p in zip(adapter.layers, paths, strict=True)]  # fmt: skip
    r, lora_alpha, rank_pattern, alpha_pattern = lora_fields(entries)
    if not targets:  # several sources: the written modules, less those written as parameters
        on_parameters = {p.removesuffix(".weight") for p in paths if _selected(p, parameters)}
        targets = sorted(written - on_parameters)
    elif isinstance(targets, (list, tuple)):
        targets = sorted(targets)
    return {
        "peft_type": "LORA",
        "task_type": source.get("task_type"),
        "base_model_name_or_path": source.get("base_model_name_or_path"),
        "revision": source.get("revision"),
        "r": r or 1,
        "lora_alpha": lora_alpha or 1,
        "use_rslora": adapter.use_rslora,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "target_modules": targets,
        "target_parameters": parameters or None,
        "exclude_modules": excluded or None,
        "layers_to_transform": source.get("layers_to_transform") if len(adapter.sources) == 1 else None,
        "layers_pattern": source.get("layers_pattern") if len(adapter.sources) == 1 else None,
        "fan_in_fan_out": any(layer.kind == "conv1d_gpt2" for layer in adapter.layers),
        "lora_bias": any(layer.bias is not None for layer in adapter.layers),
        "bias": "none",
        "lora_dropout": 0.0,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "inference_mode": True,
    }


def _parameter_paths(adapter: ConvertedAdapter) -> list[str]:
    """Each written layer as the parameter PEFT would wrap: stacked experts (``resize.experts``) by their path,
    the others as ``<module>.weight``."""
    return [layer.name if layer.experts > 1 else f"{layer.name}.weight" for layer in adapter.layers]


def _selected(path: str, targets: list[str]) -> bool:
    """PEFT's rule for ``target_parameters``: the path is a target or ends in ``.<target>``."""
    return any(path == t or path.endswith(f".{t}") for t in targets)


def _written_parameters(adapter: ConvertedAdapter) -> list[str]:
    """The sources' ``target_parameters`` that a written layer is: a 2-D parameter such as a MoE router's
    ``mlp.gate.weight`` (PEFT saves its factors under the module's name, as a Linear's, and loads them only where the
    config targets the parameter), or stacked experts, named by their parameter's path."""
    targets = set()
    for checkpoint in adapter.sources:
        value = (checkpoint.config or {}).get("target_parameters")
        targets |= {value} if isinstance(value, str) else {t for t in value or () if isinstance(t, str)}
    paths = _parameter_paths(adapter)
    return sorted(t for t in targets if any(_selected(p, [t]) for p in paths))


def _expert_depths(adapter: ConvertedAdapter) -> dict[str, int]:
    """Stacked parameter path → its ``.base_layer`` nesting, over every expert parameter of the sources (PEFT
    wraps one that was not written too, where ``target_parameters`` selects it)."""
    targets = _written_parameters(adapter)
    known = {found[0] for c in adapter.sources for layer in c.layers if (found := parameter_of(layer.name))}
    return nesting_depths(sorted(known | {x.name for x in adapter.layers if x.experts > 1}), targets)


def readme(adapter: ConvertedAdapter, to: str, dtype: str) -> str:
    """How the adapter was made and what was lost."""
    s = adapter.suggestion
    sources = ", ".join(f"`{c.path}` ({c.adapter_type})" for c in adapter.sources)
    how = f"Σ wᵢ·ΔWᵢ with weights {', '.join(f'{w:g}' for w in adapter.weights)} of " if adapter.weights else ""
    rule = str(s.rule) if s.rule is not None else "none (lossless: every nonzero direction kept)"
    worst = max(s.layers, key=lambda x: x.frobenius_error, default=None)
    lines = [
        "# Converted LoRA adapter",
        "",
        f"Written by rankscope {__version__} (`rankscope convert`, output `{to}`, {dtype}) from {how}{sources}.",
        "",
        "Each layer is the truncated SVD of its update ΔW taken from the update's factors (no dense ΔW for "
        "factored families), split as B′ = U_kΣ_k^½/√s_k, A′ = Σ_k^½V_kᵀ/√s_k with s_k = α_k/"
        + ("√k (rsLoRA)." if adapter.use_rslora else "k."),
        "",
        f"- rule: {rule}; max rank {s.max_rank or '—'}, min rank {s.min_rank}",
        f"- layers written: {sum(x.experts for x in adapter.layers)} of {len(s.layers) + len(s.left_out)}; total rank "
        f"{sum(x.rank for x in s.layers)} (was {sum(x.current_rank for x in s.layers)})",
        f"- parameters: {s.params_before:,} → {s.params_after:,}",
        f"- energy kept (Σ kept σ² / Σ σ² over all layers): {s.retained_energy:.6%}",
    ]
    if worst is not None:
        lines.append(f"- largest Frobenius error √Σ_{{i>k}}σ²: {worst.frobenius_error:.4g} ({worst.name})")
    lines += [f"- {message}" for message in [*s.messages(), *adapter.lost, *adapter.notes]]
    lines += ["", "Per-layer ranks and errors: `rankscope suggest` on the source with the same rule (`--json`).", ""]
    return "\n".join(lines)


_GPT2_ROOT = ("h.", "wte", "wpe", "ln_f")  # transformers' GPT-2 keeps its blocks under ``transformer.``


def kohya_name(name: str) -> str | None:
    """A diffusers/PEFT module path as kohya flattens it: ``unet.down_blocks.0…to_q`` → ``lora_unet_down_blocks_0…``;
    None for a module of no diffusion model (a language model's ``model.layers.0…``, GPT-2's ``transformer.h.0…``),
    which kohya files, and the loaders that read them, have no names for."""
    if name.startswith(("lora_", "lycoris_")):
        return name
    component, _, rest = name.partition(".")
    if component == "transformer" and rest.startswith(_GPT2_ROOT):
        return None
    if component in _KOHYA_PREFIXES and rest:
        return f"{_KOHYA_PREFIXES[component]}_{rest.replace('.', '_')}"
    if name.startswith("text_model."):
        return f"lora_te_{name.replace('.', '_')}"
    if name.startswith(_UNET_BLOCKS):
        return f"lora_unet_{name.replace('.', '_')}"
    return None


def kohya_tensors(adapter: ConvertedAdapter, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``<name>.lora_down.weight``, ``.lora_up.weight`` and ``.alpha``; kohya's scale is alpha/k (no rsLoRA).

    One alpha for every module (the most common rank): diffusers' kohya loader (0.42) keys the alphas of modules
    that differ from the most common one by their old processor names, which match no module, so it would apply
    the common alpha to them. The factors are rescaled by √(s/s′) to keep s′·up·down = ΔW′.
    """
    tensors = {}
    alpha = float(adapter.suggestion.r or 1)
    for layer in adapter.layers:
        _refuse_experts(layer, "kohya")
        if layer.bias is not None:
            raise UsageProblem(
                f"layer {layer.name} has a bias update, which kohya files cannot hold: use to='peft'", argument="to"
            )
        name = kohya_name(layer.name)
        if name is None:
            raise UsageProblem(
                f"layer {layer.name} is no diffusion model's module (unet., text_encoder., transformer. …), which "
                "kohya files name: use to='peft'",
                argument="to",
            )
        down, up = _factors(layer, torch.float64)
        factor = (adapter.scale(layer) / (alpha / layer.rank)) ** 0.5
        tensors[f"{name}.lora_down.weight"] = (down * factor).to(dtype).contiguous()
        tensors[f"{name}.lora_up.weight"] = (up * factor).to(dtype).contiguous()
        tensors[f"{name}.alpha"] = torch.tensor(alpha, dtype=dtype)
    return tensors


def _refuse_experts(layer: ConvertedLayer, to: str) -> None:
    if layer.experts > 1:
        raise UsageProblem(
            f"layer {layer.name} holds {layer.experts} MoE experts in one parameter, which only PEFT's stacked "
            f"layout carries ({to} files have no such form): use to='peft'",
            argument="to",
        )


def _within(pattern: dict, prefix: str) -> dict:
    """A pattern's entries for one component, keyed as that component's modules are named."""
    return {key.removeprefix(prefix): value for key, value in pattern.items() if key.startswith(prefix)}


def diffusers_file(adapter: ConvertedAdapter, dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """PEFT-style keys under each component's prefix, and ``lora_adapter_metadata`` (its LoraConfig per component)."""
    components: dict[str, list] = {}
    for layer in adapter.layers:
        _refuse_experts(layer, "diffusers")
        component = layer.name.partition(".")[0]
        if component not in _KOHYA_PREFIXES:
            raise UsageProblem(
                f"layer {layer.name} names no diffusers component (unet., text_encoder., transformer.): "
                "use to='peft' or to='kohya'",
                argument="to",
            )
        components.setdefault(component, []).append(layer)
    metadata: dict = {}
    config = peft_config(adapter)
    for component, layers in components.items():
        names = [layer.name.partition(".")[2] for layer in layers]
        prefix = f"{component}."
        metadata.update(
            {
                f"{component}.r": config["r"],
                f"{component}.lora_alpha": config["lora_alpha"],
                f"{component}.use_rslora": config["use_rslora"],
                f"{component}.rank_pattern": _within(config["rank_pattern"], prefix),
                f"{component}.alpha_pattern": _within(config["alpha_pattern"], prefix),
                f"{component}.target_modules": sorted(names),
                f"{component}.lora_bias": config["lora_bias"],
            }
        )
    tensors = peft_tensors(adapter, dtype, prefix="")
    return tensors, {"lora_adapter_metadata": json.dumps(metadata, indent=2, sort_keys=True), "format": "pt"}


def write_adapter(adapter: ConvertedAdapter, path: str | Path, *, to: str = "peft", dtype: str = "float32") -> Path:
    """Write ``adapter`` to ``path`` as ``to`` (peft: a folder; kohya: one file; diffusers: a folder holding
    ``pytorch_lora_weights.safetensors``, or that file's own path); returns the path written."""
    if to not in TARGETS:
        raise UsageProblem(f"to must be one of {', '.join(TARGETS)}, got {to!r}", argument="to")
    if dtype not in DTYPES:
        raise UsageProblem(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}", argument="dtype")
    if not adapter.layers:
        raise RankscopeError("no layer to write: every update is zero or was left out")
    path = Path(path)
    check_destination(adapter, path)
    torch_dtype = DTYPES[dtype]
    metadata = {"format": "pt", "rankscope": __version__}
    try:
        if to == "peft":
            config = json.dumps(peft_config(adapter), indent=2, sort_keys=True) + "\n"
            files = {
                "adapter_config.json": config.encode(),
                "adapter_model.safetensors": save(peft_tensors(adapter, torch_dtype), metadata),
                "README.md": readme(adapter, to, dtype).encode(),
            }
            _stage_folder(path, files)
        elif to == "kohya":
            kohya_metadata = {**metadata, "ss_network_module": "networks.lora"}
            _stage_file(path, save(kohya_tensors(adapter, torch_dtype), kohya_metadata))
        else:
            tensors, diffusers_metadata = diffusers_file(adapter, torch_dtype)
            data = save(tensors, {**metadata, **diffusers_metadata})
            if path.suffix == ".safetensors":
                _stage_file(path, data)
            else:
                _stage_folder(path, {DIFFUSERS_FILE: data, "README.md": readme(adapter, to, dtype).encode()})
    except OSError as exc:
        raise RankscopeError(f"{path}: cannot write ({exc.strerror or exc})") from exc
    return path


__all__ = ["DTYPES", "TARGETS", "check_destination", "kohya_name", "peft_config", "peft_tensors", "write_adapter"]
