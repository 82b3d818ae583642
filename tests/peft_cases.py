"""Building real PEFT LoRA checkpoints in tests, and PEFT's own ground truth for them.

The ground truth of a layer is PEFT's ``merge_and_unload()`` weight minus the base weight, merged in float64
(the float32 factors convert exactly, so the reference carries no float32 rounding). Everything a test
compares rankscope against comes from PEFT's model objects or from the module definitions here — never from
rankscope.

PEFT imports transformers at import time (~3 s): import this module only from tests that need it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

# -- tiny base models -------------------------------------------------------------------------------------


class MLP(nn.Module):
    """Linear layers, one of them narrower than r (rank_bound = out < r)."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(16, 24)
        self.down = nn.Linear(24, 16)
        self.narrow = nn.Linear(16, 3)


class GPT2Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.Module()
        self.attn.c_attn = Conv1D(36, 12)  # Conv1D(nf=out, nx=in): weight (in, out) = (12, 36)
        self.attn.c_proj = Conv1D(12, 12)
        self.mlp = nn.Module()
        self.mlp.c_fc = Conv1D(20, 12)


class GPT2Like(nn.Module):
    """transformers' GPT-2 Conv1D layers under GPT-2's module paths (``transformer.h.0.attn.c_attn``)."""

    def __init__(self) -> None:
        super().__init__()
        self.transformer = nn.Module()
        self.transformer.h = nn.ModuleList([GPT2Block() for _ in range(2)])


class GPT2WithHead(nn.Module):
    """GPT-2 Conv1D layers and an nn.Linear head in one model: one saved fan_in_fan_out cannot describe both."""

    def __init__(self) -> None:
        super().__init__()
        self.transformer = GPT2Like().transformer
        self.lm_head = nn.Linear(12, 30)


class EmbeddingModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.wte = nn.Embedding(20, 8)
        self.proj = nn.Linear(8, 10)


class Convs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1d = nn.Conv1d(4, 6, 3)
        self.c3x3 = nn.Conv2d(4, 6, 3, padding=1)
        self.c1x1 = nn.Conv2d(8, 5, 1)
        self.c3d = nn.Conv3d(3, 5, 3)


class Attn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(8, 8)
        self.v = nn.Linear(8, 8)


class Stack(nn.Module):
    """Twelve blocks (so ``layers.1`` and ``layers.10`` both exist) and a module ``xv`` that ends in ``v``."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Attn() for _ in range(12)])
        self.xv = nn.Linear(8, 8)


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 12)
        self.c2 = nn.Conv2d(4, 6, 3)
        self.head = nn.Linear(12, 5)


# -- the case table (PEFT's TEST_CASES style: name, base model, LoraConfig kwargs) ---------------------------

# PEFT's rule is re.match(rf"(.*\.)?({k})$", name), first key in dict order. These patterns tell it apart
# from a plain re.search: "v" must not reach "xv". (A key that matches no module, such as "layers.1", is
# dropped by PEFT on save; tests add one to the saved config to check that it stays inert.)
RANK_PATTERN = {r"layers\.1\d*\.q": 2, "q": 6, "v": 3}  # layers.1.q/.10.q/.11.q → 2 (first key wins), other q → 6
ALPHA_PATTERN = {"layers.0.v": 32, r"layers\.[0-3]\.v": 2, "xv": 5}  # layers.0.v → 32 (first wins)


def expected_pattern_r_alpha(name: str, r: int, alpha: float) -> tuple[int, float]:
    """r and α of a ``Stack`` layer under RANK_PATTERN/ALPHA_PATTERN, worked out by hand (not by regex)."""
    index = name.split(".")[1] if name.startswith("layers.") else None
    kind = name.rsplit(".", 1)[-1]
    if kind == "q":
        r = 2 if index in ("1", "10", "11") else 6
    elif kind == "v":
        r = 3
    if name == "layers.0.v":
        alpha = 32
    elif kind == "v" and index in ("1", "2", "3"):
        alpha = 2
    elif name == "xv":
        alpha = 5
    return r, alpha


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[], nn.Module]
    config: dict = field(default_factory=dict)


CASES = [
    Case("linear", MLP, {"r": 4, "lora_alpha": 8, "target_modules": ["up", "down", "narrow"]}),
    Case(
        "gpt2_conv1d_fan_in_fan_out",
        GPT2Like,
        {"r": 4, "lora_alpha": 16, "target_modules": ["c_attn", "c_proj", "c_fc"], "fan_in_fan_out": True},
    ),
    # PEFT sets fan_in_fan_out itself for Conv1D (with a warning) and saves the corrected config
    Case("gpt2_conv1d_flag_unset", GPT2Like, {"r": 2, "lora_alpha": 4, "target_modules": ["c_attn", "c_fc"]}),
    Case("embedding", EmbeddingModel, {"r": 4, "lora_alpha": 8, "target_modules": ["wte", "proj"]}),
    Case("conv1d", Convs, {"r": 4, "lora_alpha": 8, "target_modules": ["c1d"]}),
    Case("conv2d_3x3", Convs, {"r": 4, "lora_alpha": 8, "target_modules": ["c3x3"]}),
    Case("conv2d_1x1", Convs, {"r": 4, "lora_alpha": 8, "target_modules": ["c1x1"]}),
    Case("conv3d", Convs, {"r": 4, "lora_alpha": 8, "target_modules": ["c3d"]}),
    Case("rslora", MLP, {"r": 4, "lora_alpha": 8, "use_rslora": True, "target_modules": ["up", "down", "narrow"]}),
    Case(
        "rank_and_alpha_patterns",
        Stack,
        {
            "r": 4,
            "lora_alpha": 8,
            "target_modules": ["q", "v", "xv"],
            "rank_pattern": RANK_PATTERN,
            "alpha_pattern": ALPHA_PATTERN,
        },
    ),
    Case(
        "rslora_patterns",
        Stack,
        {
            "r": 4,
            "lora_alpha": 8,
            "use_rslora": True,
            "target_modules": ["q", "v", "xv"],
            "rank_pattern": RANK_PATTERN,
            "alpha_pattern": ALPHA_PATTERN,
        },
    ),
    Case("lora_bias", Tiny, {"r": 4, "lora_alpha": 8, "target_modules": ["lin", "c2"], "lora_bias": True}),
]

CASE = {case.name: case for case in CASES}

# -- building and saving -----------------------------------------------------------------------------------


def lora_config(**kwargs) -> LoraConfig:
    """A LoraConfig whose B is random (``init_lora_weights=False``), so that ΔW ≠ 0."""
    return LoraConfig(init_lora_weights=False, **kwargs)


def base_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """A float64 copy of every parameter of a plain (unwrapped) model."""
    return {key: value.detach().clone().double() for key, value in model.state_dict().items()}


def build(case: Case, seed: int = 0):
    """(peft model, float64 copy of the base model's weights) for ``case``."""
    torch.manual_seed(seed)
    model = case.build()
    base = base_weights(model)
    return get_peft_model(model, lora_config(**case.config)), base


def save(peft_model, directory: Path, serialization: str = "safetensors") -> Path:
    peft_model.save_pretrained(directory, safe_serialization=serialization == "safetensors")
    return directory


# -- PEFT's ground truth -----------------------------------------------------------------------------------


@dataclass
class Reference:
    """One adapted layer as PEFT sees it."""

    name: str
    base_type: type
    shape: tuple[int, ...]  # the stored base weight's shape
    matrix_shape: tuple[int, int]  # (out, in·∏k); (d, V) for an embedding
    r: int
    scale: float
    params: int
    delta: torch.Tensor  # merged − base weight, float64, in the base weight's layout
    bias_delta: torch.Tensor | None  # merged − base bias where the layer has one
    lora_bias: bool  # whether PEFT trains a bias for this adapter (lora_B.bias)

    @property
    def matrix(self) -> torch.Tensor:
        """ΔW as the (out, in·∏k) matrix analysed ((d, V) for an embedding)."""
        if issubclass(self.base_type, (Conv1D, nn.Embedding)):
            return self.delta.T
        return self.delta.reshape(self.delta.shape[0], -1)

    @property
    def rank_bound(self) -> int:
        return min(self.r, *self.matrix_shape)

    def singular_values(self) -> torch.Tensor:
        return torch.linalg.svdvals(self.matrix)


def lora_layers(model: nn.Module) -> dict[str, LoraLayer]:
    """The LoRA layers of a wrapped or injected model, by their module path in the base model."""
    return {
        name.removeprefix("base_model.model."): module
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer)
    }


def _adapter_params(layer: LoraLayer, adapter: str) -> int:
    total = 0
    for pname, param in layer.named_parameters():
        parts = pname.split(".")
        if parts[0] != "base_layer" and adapter in parts:
            total += param.numel()
    return total


def _matrix_shape(base: nn.Module) -> tuple[int, int]:
    weight = base.weight
    if isinstance(base, (Conv1D, nn.Embedding)):
        return (weight.shape[1], weight.shape[0])
    return (weight.shape[0], weight[0].numel())


def _merged_state(model: nn.Module, adapter: str) -> dict[str, torch.Tensor]:
    """PEFT's own merge of ``adapter`` in float64, as a plain state dict with base-model keys."""
    twin = copy.deepcopy(model).double()
    layers = lora_layers(twin)
    if hasattr(twin, "merge_and_unload"):
        twin.set_adapter(adapter)
        return twin.merge_and_unload().state_dict()
    for layer in layers.values():  # an injected model (no PeftModel wrapper): merge layer by layer
        layer.merge(adapter_names=[adapter])
    return {
        key.replace(".base_layer.", "."): value
        for key, value in twin.state_dict().items()
        if ".lora_" not in key and "lora_embedding" not in key
    }


def references(model: nn.Module, base: dict[str, torch.Tensor], adapter: str = "default") -> dict[str, Reference]:
    """PEFT's view of every layer ``adapter`` adapts: shapes, r, scaling, and merged − base."""
    merged = _merged_state(model, adapter)
    out = {}
    for name, layer in lora_layers(model).items():
        if adapter not in layer.r:
            continue
        base_layer = layer.get_base_layer()
        bias_key = f"{name}.bias"
        out[name] = Reference(
            name=name,
            base_type=type(base_layer),
            shape=tuple(base_layer.weight.shape),
            matrix_shape=_matrix_shape(base_layer),
            r=layer.r[adapter],
            scale=float(layer.scaling[adapter]),
            params=_adapter_params(layer, adapter),
            delta=merged[f"{name}.weight"] - base[f"{name}.weight"],
            bias_delta=merged[bias_key] - base[bias_key] if bias_key in base else None,
            lora_bias=bool(getattr(layer, "lora_bias", {}).get(adapter, False)),
        )
    return out


def round_factors(model: nn.Module, dtype: torch.dtype) -> None:
    """Round every LoRA factor of ``model`` to ``dtype`` in place (kept in its own dtype), as a cast save does."""
    with torch.no_grad():
        for layer in lora_layers(model).values():
            for pname, param in layer.named_parameters():
                if not pname.startswith("base_layer"):
                    param.copy_(param.to(dtype).to(param.dtype))


def cast_file(path: Path, dtype: torch.dtype) -> None:
    """Rewrite a safetensors file with every floating tensor cast to ``dtype``."""
    tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in load_file(str(path)).items()}
    save_file(tensors, str(path))


def save_unprefixed(case: Case, directory: Path, seed: int = 0):
    """A checkpoint without the ``base_model.model.`` prefix: ``inject_adapter_in_model`` +
    ``get_peft_model_state_dict`` + ``save_file``, and the config written by the config itself.

    Returns (injected model, float64 base weights, directory)."""
    torch.manual_seed(seed)
    model = case.build()
    base = base_weights(model)
    config = lora_config(**case.config)
    inject_adapter_in_model(config, model)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(model).items()}
    save_file(state, str(directory / "adapter_model.safetensors"))
    config.save_pretrained(str(directory))  # adapter_config.json, as PEFT writes it
    return model, base, directory
