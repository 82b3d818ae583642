"""BoRA (Block-Diversified LoRA, arXiv 2508.06953) in the file layout rankscope defines for it.

No official BoRA checkpoint layout has been published; rankscope reads this one, which is what a PEFT-subclass
implementation writes (PEFT's LoRA layout plus one tensor per module)::

    adapter_config.json
        "peft_type": "LORA" (PEFT's save_pretrained of a lora.Linear subclass) or "BORA"
        "r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "fan_in_fan_out"  — as PEFT LoRA
        "bora_exp": true, "bora_norm": true  — optional ablation switches (both true when absent or null)
    adapter_model.safetensors (or adapter_model.bin), keys with or without PEFT's ``base_model.model.`` prefix
        <module>.lora_A.weight                        (r, n)       n = in_features
        <module>.lora_B.weight                        (m, r)       m = out_features
        <module>.lora_sigma  or  <module>.lora_sigma.weight   (b, b, r)   b = the number of blocks

b is read from the shape of ``lora_sigma``; it must divide m and n. A is cut into b column blocks and B into b
row blocks::

    A = [A_1 … A_b]  (A_j: r × n/b)          B = [B_1; …; B_b]  (B_i: m/b × r)
    ΔW_ij = s · B_i Σ_ij A_j                  (block (i, j) of ΔW: rows of output block i, columns of input block j)
    Σ_ij  = diag(exp(σ_ij / mean|σ|))         one mean of |σ| over the whole (b, b, r) tensor of the module
    s     = α/r, or α/√r with use_rslora; r and α per layer through rank_pattern / alpha_pattern

Ablations (config fields, both true by default): ``"bora_norm": false`` gives Σ_ij = diag(exp(σ_ij)),
``"bora_exp": false`` gives Σ_ij = diag(σ_ij / mean|σ|); both false gives Σ_ij = diag(σ_ij).
LoRA is the special case Σ_ij = I for all i, j; MELoRA is Σ_ii = I, Σ_ij = 0 for i ≠ j.

As a factored update ΔW = left · s · core · right with left = blockdiag(B_1..B_b) (m × b·r), core = Σ'
(b·r × b·r, the b×b grid of the diagonal r×r blocks Σ_ij) and right = blockdiag(A_1..A_b) (b·r × n): its
exact spectrum comes from a (b·r)² core, and rank ΔW ≤ min(m, n, b·r). The factors are kept as stored (a
``BlockDiagonalUpdate``): R_L = blockdiag(R(B_i)) and R_R = blockdiag(R(A_iᵀ)) from per-block Grams, never the
block-diagonal matrices. Trainable parameters per layer:
numel(A) + numel(B) + numel(σ) = r·n + m·r + b²·r.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..core.checkpoint import Checkpoint, Layer
from ..core.errors import CheckpointError
from ..core.update import BlockDiagonalUpdate, upcast
from . import Format, ReadOptions, register_format
from .common import reader
from .common.peft import alpha_config, layer_scale, pattern_value, positive_integer, skip_reason
from .common.source import AdapterSource

FAMILY = "bora"
_FACTOR_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<role>A|B)\.weight$")
_SIGMA_KEY = re.compile(r"^(?P<module>.+)\.lora_sigma(?P<suffix>\.weight)?$")
_SPELLING = {"A": "lora_A.weight", "B": "lora_B.weight", "sigma": "lora_sigma"}

# LoRA switches that change the update in ways this reader does not model
_REFUSED_FLAGS = {
    "use_dora": "BoRA with DoRA's magnitude vector (use_dora) is not supported",
    "lora_nums": "BoRA with several B heads (lora_nums) is not supported",
    "layer_replication": "layer_replication renumbers layers away from the base model's",
    "target_parameters": "LoRA on parameters (target_parameters) stacks expert factors in one tensor",
}


def detect(source: AdapterSource) -> bool:
    """``peft_type`` BORA, or LoRA keys plus at least one ``lora_sigma`` (with ``peft_type`` LORA or none)."""
    if source.peft_type == "BORA":
        return True
    if source.peft_type not in (None, "LORA"):
        return False
    keys = source.tensors.keys()
    return any(_SIGMA_KEY.match(key) for key in keys) and any(_FACTOR_KEY.match(key) for key in keys)


# -- Σ: the ablation variants as strategies ----------------------------------------------------------------
def _by_mean_abs(sigma: torch.Tensor) -> torch.Tensor:
    """σ / mean|σ|, one mean over the whole (b, b, r) tensor (the paper's Mav(σ) = ‖σ‖₁ / (b²r))."""
    return sigma / sigma.abs().mean()


def _unchanged(sigma: torch.Tensor) -> torch.Tensor:
    return sigma


@dataclass(frozen=True)
class SigmaMap:
    """σ (b, b, r) ↦ the diagonals of Σ_ij: ``mapping(normalise(σ))``; ``formula`` says which, for messages."""

    normalise: Callable[[torch.Tensor], torch.Tensor]
    mapping: Callable[[torch.Tensor], torch.Tensor]
    formula: str

    def __call__(self, sigma: torch.Tensor) -> torch.Tensor:
        return self.mapping(self.normalise(sigma))


# (bora_norm, bora_exp) → strategy; the paper's method is (True, True), the others its ablations
_SIGMA_MAPS = {
    (True, True): SigmaMap(_by_mean_abs, torch.exp, "exp(σ/mean|σ|)"),
    (False, True): SigmaMap(_unchanged, torch.exp, "exp(σ)"),
    (True, False): SigmaMap(_by_mean_abs, _unchanged, "σ/mean|σ|"),
    (False, False): SigmaMap(_unchanged, _unchanged, "σ"),
}


def _switch(config: dict, name: str, where: object) -> bool:
    value = config.get(name)
    if value is None:
        return True
    if not isinstance(value, bool):
        raise CheckpointError(f"{name} must be true or false, found {value!r}", path=where)
    return value


def sigma_map(config: dict, where: object = None) -> SigmaMap:
    """The Σ strategy the config's ``bora_norm`` / ``bora_exp`` switches select."""
    return _SIGMA_MAPS[(_switch(config, "bora_norm", where), _switch(config, "bora_exp", where))]


def block_core(diagonals: torch.Tensor) -> torch.Tensor:
    """Σ' (b·r × b·r) from the (b, b, r) diagonals: Σ'[i·r + k, j·r + l] = Σ_ij[k]·δ_kl."""
    blocks, _, rank = diagonals.shape
    return torch.diag_embed(diagonals).permute(0, 2, 1, 3).reshape(blocks * rank, blocks * rank)


# -- keys --------------------------------------------------------------------------------------------------
_KEY = re.compile(r"^(?P<module>.+)\.(?:lora_(?P<role>A|B)\.weight|lora_sigma(?:\.weight)?)$")  # either of the two


def _role(match: re.Match) -> str:
    return match["role"] or "sigma"


def _skip_reason(key: str, config: dict) -> str:
    if key.endswith(".lora_B.bias"):
        return "a bias of lora_B (lora_bias), not part of BoRA's ΔW"
    return skip_reason(key, config, "BoRA")


# -- one layer ---------------------------------------------------------------------------------------------
def _shape_problem(keys: dict[str, str], a: torch.Tensor, b: torch.Tensor, sigma: torch.Tensor) -> str | None:
    """Why A (r, n), B (m, r), σ (b, b, r) do not fit together, or None."""
    a_key, b_key, s_key = keys["A"], keys["B"], keys["sigma"]
    problem = reader.nonfinite_among(((a_key, a), (b_key, b), (s_key, sigma)))
    if problem:
        return problem
    if a.ndim != 2 or b.ndim != 2:
        bad_key, bad = (a_key, a) if a.ndim != 2 else (b_key, b)
        return f"{bad_key}: BoRA's blocks are defined for linear layers: expected a matrix, found {list(bad.shape)}"
    (rank, n), (m, b_rank) = a.shape, b.shape
    if rank == 0:
        return f"{a_key}: r=0 rows, nothing to analyse"
    if b_rank != rank:
        return f"{b_key}: rank mismatch: {a_key} has r={rank} rows but {b_key} has {b_rank} columns"
    if sigma.ndim != 3 or sigma.shape[0] != sigma.shape[1] or sigma.shape[2] != rank:
        return f"{s_key}: expected shape (b, b, r) with r={rank} (the rows of {a_key}), found {list(sigma.shape)}"
    blocks = sigma.shape[0]
    if blocks == 0:
        return f"{s_key}: b=0 blocks"
    if m % blocks:
        return f"{s_key}: b={blocks} blocks do not divide m={m}, the rows of {b_key} {list(b.shape)}"
    if n % blocks:
        return f"{s_key}: b={blocks} blocks do not divide n={n}, the columns of {a_key} {list(a.shape)}"
    return None


def _layer(source: AdapterSource, module: reader.Module, config: dict, config_has_r: bool, sigma_of: SigmaMap) -> Layer:
    name = module.name
    missing = reader.missing_parts(module, ("A", "B", "sigma"), _SPELLING.get)
    if missing:
        return reader.invalid_layer(name, missing, family=FAMILY)
    if module.duplicates:
        error = f"{module.duplicates[0]}: stored twice, also as {module.keys['sigma']}; which one is meant is unclear"
        return reader.invalid_layer(name, error, family=FAMILY)
    tensors, keys = source.tensors, module.keys
    a, b, sigma = tensors.get(keys["A"]), tensors.get(keys["B"]), tensors.get(keys["sigma"])
    params = a.numel() + b.numel() + sigma.numel()

    def invalid(message: str) -> Layer:
        return reader.invalid_layer(name, message, params, family=FAMILY)

    problem = _shape_problem(keys, a, b, sigma)
    if problem:
        return invalid(problem)
    (rank, n), m, blocks = a.shape, b.shape[0], sigma.shape[0]
    where = source.where
    config_r = pattern_value(
        config.get("rank_pattern"), name, config.get("r", rank), config_path=where, field="rank_pattern"
    )
    if config_has_r and positive_integer(config_r, f"r of layer {name}", config_path=where) != rank:
        return invalid(f"{keys['A']}: the config gives r={config_r} for this layer but the tensor has {rank} rows")
    sigma = upcast(sigma)
    diagonals = sigma_of(sigma)
    if not bool(torch.isfinite(diagonals).all()):
        mean = float(sigma.abs().mean())
        return invalid(f"{keys['sigma']}: Σ = {sigma_of.formula} is not finite (mean|σ| = {mean:g})")
    # the block-diagonal factors stay as stored: the spectrum path takes each block's R factor (a (b·r)² core)
    update = BlockDiagonalUpdate(
        left_stack=b,
        right_stack=a,
        blocks=blocks,
        core=block_core(diagonals),
        scale=layer_scale(config, name, rank, config_path=where),
    )
    if config.get("fan_in_fan_out"):  # GPT-2 Conv1D stores its weight as (in, out); the factors are as usual
        return Layer(name, update, (n, m), params, kind="conv1d_gpt2", family=FAMILY)
    return Layer(name, update, (m, n), params, family=FAMILY)


def read(source: AdapterSource, options: ReadOptions) -> Checkpoint:
    config, config_has_r, warnings = alpha_config(source.config, source.tensors.metadata(), options.alpha)
    reader.refuse_flags(config, _REFUSED_FLAGS, source.where)
    sigma_of = sigma_map(config, source.where)
    modules, unused = reader.group_keys(source.tensors.keys(), _KEY, _role)
    return reader.build_checkpoint(
        source,
        family=FAMILY,
        adapter_type="BORA",
        layers=[_layer(source, module, config, config_has_r, sigma_of) for module in modules.values()],
        skipped=reader.skipped_keys(unused, lambda key: _skip_reason(key, config)),
        warnings=warnings,
    )


register_format(
    Format(
        FAMILY,
        "BoRA: PEFT LoRA keys plus lora_sigma (b, b, r) per module (rankscope's layout)",
        detect,
        read,
        10,
        needs="nothing",
        spectrum="factored (per-block Grams and a (b·r)² core)",
    )
)
