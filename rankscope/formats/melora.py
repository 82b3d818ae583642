"""MELoRA (mini-ensemble LoRA, Ren et al., ACL 2024) in its published layout (repo ChasonShi/MELoRA).

The official code is a modified PEFT 0.5.0 that saves::

    adapter_config.json
        "peft_type": "MELORA", "r": [r_0, …, r_{n-1}], "lora_alpha": [α_0, …, α_{n-1}], "mode": …
        (a scalar r or lora_alpha is accepted too: every mini then has it, and n comes from the keys)
    adapter_model.bin (torch.save of the state dict; safetensors is read the same), for each module:
        <module>.lora_A.<i>.weight     (r_i, n_in/n)      i = 0 … n-1
        <module>.lora_B.<i>.weight     (m/n, r_i)

r_i is mini i's own rank (the equivalent rank is Σ r_i, not r/n). The forward cuts the input into n slices of
n_in/n features, y_i = (α_i/r_i)·B_i·A_i·x_i, and concatenates the y_i; so ΔW is block diagonal::

    ΔW = blockdiag_i((α_i/r_i) · B_i A_i)    mini i covers rows [i·m/n, (i+1)·m/n) and columns [i·n_in/n, (i+1)·n_in/n)

As a factored update: left = blockdiag(B_i) (m × Σr_i), right = blockdiag(A_i) (Σr_i × n_in), scale = the
Σr_i-vector with α_i/r_i repeated r_i times (one scale where all α_i/r_i agree, else none). The spectrum is
the union of the minis' spectra, exact from the factored path; rank ΔW ≤ min(Σr_i, m, n_in).

The analysed matrix is (n·m′, n·n′) from the minis' shapes: MELoRA ignores trailing inputs when n does not divide
n_in, and those zero columns do not change the singular values. ``peft_type`` MELORA is what detection needs;
a file without a config can be read with ``--format melora`` (and ``--alpha``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..core.checkpoint import Checkpoint, Layer
from ..core.errors import CheckpointError
from ..core.update import FactoredUpdate
from . import Format, ReadOptions, register_format
from .common.peft import nonfinite_problem, positive_integer, positive_number
from .common.reader import Module, build_checkpoint, group_keys, invalid_layer, skipped_keys
from .common.source import AdapterSource

FAMILY = "melora"
_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<role>[AB])\.(?P<index>\d+)\.weight$")

PerMini = tuple[float, ...] | float | None  # a config list (one per mini), one value for all, or unknown


def detect(source: AdapterSource) -> bool:
    return source.peft_type == "MELORA"


# -- config ------------------------------------------------------------------------------------------------
def _per_mini(config: dict, name: str, where: object, *, integer: bool) -> PerMini:
    """``r`` or ``lora_alpha``: a non-empty list of positive numbers, one positive number, or absent."""
    value = config.get(name)
    if value is None:
        return None
    values = value if isinstance(value, list) else [value]
    if not values:
        raise CheckpointError(f"{name} is an empty list: MELoRA needs one entry per mini adapter", path=where)
    if integer:
        numbers = tuple(float(positive_integer(v, name, config_path=where)) for v in values)
    else:
        numbers = tuple(positive_number(config, name, config_path=where, value=v) for v in values)
    return numbers if isinstance(value, list) else numbers[0]


@dataclass(frozen=True)
class MiniConfig:
    """What the config says about the minis: their ranks and alphas (lists, one value for all, or unknown)."""

    ranks: PerMini = None
    alphas: PerMini = None

    @classmethod
    def from_config(cls, config: dict, where: object) -> MiniConfig:
        ranks = _per_mini(config, "r", where, integer=True)
        alphas = _per_mini(config, "lora_alpha", where, integer=False)
        if isinstance(ranks, tuple) and isinstance(alphas, tuple) and len(ranks) != len(alphas):
            raise CheckpointError(
                f"r lists {len(ranks)} minis but lora_alpha lists {len(alphas)}: one entry per mini each", path=where
            )
        return cls(ranks, alphas)


def _expand(value: PerMini, count: int) -> tuple[float, ...] | None:
    """A per-mini value for ``count`` minis; None where a list has the wrong length (or the value is unknown)."""
    if value is None:
        return None
    if isinstance(value, tuple):
        return value if len(value) == count else None
    return (value,) * count


def _scales(minis: MiniConfig, ranks: list[int], a_keys: list[str]) -> tuple[list[float], str | None]:
    """The minis' α_i/r_i (r_i from the tensors, checked against the config), or an error naming a tensor."""
    count = len(ranks)
    for name, value in (("r", minis.ranks), ("lora_alpha", minis.alphas)):
        if isinstance(value, tuple) and len(value) != count:
            return [], f"{a_keys[0]}: the config lists {len(value)} minis ({name}) but this module stores {count}"
    config_ranks = _expand(minis.ranks, count)
    for i, (key, rank) in enumerate(zip(a_keys, ranks, strict=True)):
        if config_ranks is not None and int(config_ranks[i]) != rank:
            return [], f"{key}: the config gives r={int(config_ranks[i])} for mini {i} but the tensor has {rank} rows"
    alphas = _expand(minis.alphas, count)
    if alphas is None:
        return [1.0] * count, None
    return [alpha / rank for alpha, rank in zip(alphas, ranks, strict=True)], None


# -- keys --------------------------------------------------------------------------------------------------
def _role(match) -> tuple[str, int]:
    return match["role"], int(match["index"])  # ("A", 1): "lora_A.1" and "lora_A.01" are the same mini


def _index_problem(module: Module) -> str | None:
    """Every A needs its B and the other way round, and the indices must be 0 … n-1."""
    if module.duplicates:
        return f"{module.duplicates[0]}: a second tensor for the same mini index"
    a, b = module.indexed("A"), module.indexed("B")
    for i in sorted(set(a) - set(b)):
        return f"{a[i]}: has no matching lora_B.{i}.weight"
    for i in sorted(set(b) - set(a)):
        return f"{b[i]}: has no matching lora_A.{i}.weight"
    indices = list(a)
    if indices != list(range(len(indices))):
        return f"{a[indices[-1]]}: mini indices {indices} are not 0…{len(indices) - 1}"
    return None


def _tiling_problem(a_keys: list[str], b_keys: list[str], a: list[torch.Tensor], b: list[torch.Tensor]) -> str | None:
    """Each A_i (r_i, n′) and B_i (m′, r_i) with the same n′ and m′ for every mini, so that they tile ΔW."""
    for key, tensor in (*zip(a_keys, a, strict=True), *zip(b_keys, b, strict=True)):
        problem = nonfinite_problem(tensor, key)
        if problem:
            return problem
        if tensor.ndim != 2:
            return f"{key}: expected a matrix, found shape {list(tensor.shape)}"
    for i, (a_key, b_key, a_i, b_i) in enumerate(zip(a_keys, b_keys, a, b, strict=True)):
        if a_i.shape[0] == 0:
            return f"{a_key}: mini {i} has rank 0"
        if b_i.shape[1] != a_i.shape[0]:
            return f"{b_key}: rank mismatch: {a_key} has r={a_i.shape[0]} rows but {b_key} has {b_i.shape[1]} columns"
        if a_i.shape[1] != a[0].shape[1]:
            return (
                f"{a_key}: mini {i} covers {a_i.shape[1]} input features but mini 0 covers {a[0].shape[1]} "
                f"({a_keys[0]}): MELoRA's minis cut the input into equal slices"
            )
        if b_i.shape[0] != b[0].shape[0]:
            return (
                f"{b_key}: mini {i} covers {b_i.shape[0]} outputs but mini 0 covers {b[0].shape[0]} "
                f"({b_keys[0]}): MELoRA's minis cut the output into equal slices"
            )
    return None


# -- one layer ---------------------------------------------------------------------------------------------
def _layer(source: AdapterSource, module: Module, minis: MiniConfig, fan_in_fan_out: bool) -> Layer:
    name = module.name
    problem = _index_problem(module)
    if problem:
        return invalid_layer(name, problem, family=FAMILY)
    a_keys, b_keys = list(module.indexed("A").values()), list(module.indexed("B").values())
    a, b = [source.tensors.get(k) for k in a_keys], [source.tensors.get(k) for k in b_keys]
    params = sum(t.numel() for t in (*a, *b))
    problem = _tiling_problem(a_keys, b_keys, a, b)
    if problem is None:
        ranks = [int(t.shape[0]) for t in a]
        scales, problem = _scales(minis, ranks, a_keys)
    if problem:
        return invalid_layer(name, problem, params, family=FAMILY)
    scale = torch.tensor([s for s, rank in zip(scales, ranks, strict=True) for _ in range(rank)], dtype=torch.float64)
    update = FactoredUpdate(left=torch.block_diag(*b), right=torch.block_diag(*a), scale=scale)
    m, n = update.shape
    if fan_in_fan_out:  # GPT-2 Conv1D stores its weight as (in, out); the factors are as usual
        return Layer(name, update, (n, m), params, kind="conv1d_gpt2", family=FAMILY)
    return Layer(name, update, (m, n), params, family=FAMILY)


def _skip_reason(key: str) -> str:
    if key.endswith(".bias"):
        return "a bias, not part of MELoRA's ΔW"
    return "not a tensor of a MELoRA adapter"


def read(source: AdapterSource, options: ReadOptions) -> Checkpoint:
    config = dict(source.config or {})
    where = source.where
    minis = MiniConfig.from_config(config, where)
    warnings = []
    if options.alpha is not None:
        minis = MiniConfig(minis.ranks, float(options.alpha))
        warnings.append(f"--alpha {options.alpha:g} overrides every mini's lora_alpha")
    elif minis.alphas is None:
        warnings.append("no lora_alpha in the config: scale 1 is assumed for every mini (pass --alpha)")
    modules, unused = group_keys(source.tensors.keys(), _KEY, _role)
    return build_checkpoint(
        source,
        family=FAMILY,
        adapter_type="MELORA",
        layers=[_layer(source, module, minis, bool(config.get("fan_in_fan_out"))) for module in modules.values()],
        skipped=skipped_keys(unused, _skip_reason),
        warnings=warnings,
    )


register_format(
    Format(
        FAMILY,
        "MELoRA: n mini LoRAs on a block diagonal (lora_A.<i>, lora_B.<i>)",
        detect,
        read,
        priority=20,
        needs="nothing",
        spectrum="factored",
    )
)
