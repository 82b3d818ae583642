"""LoRA variants PEFT 0.21 selects by a config flag whose ΔW is still a product s·B·A of stored factors.

**QA-LoRA** (``use_qalora``, ``qalora_group_size`` g, GPTQ Linear layers): the forward pools the input in groups
of g (``x.view(…, n/g, g).mean(-1)``), multiplies by n/g and applies s·B·A with A (r, n/g), so
ΔW = s·B·A·P with P (n/g, n), P[j, i] = (n/g)/g where i is in group j: A·P repeats each column of A g times,
times n/g². Factored, rank ≤ r. PEFT cannot merge it (its GPTQ base is quantised); the update is against that
base as the forward sees it.

**BD-LoRA** (``use_bdlora``: ``target_modules_bd_a`` / ``target_modules_bd_b`` substrings of the module name,
``nblocks`` b): one factor is block-diagonal and saved in compact form, the b diagonal blocks stacked along the
rows (A: (r, n/b); B: (m, r/b)); PEFT's ``weight_as_blockdiagonal_matrix`` is ``block_diag(*chunk(w, b, 0))``.
ΔW = s·B·A with that factor expanded: factored, rank ≤ r.
"""

from __future__ import annotations

import torch

from ...core.checkpoint import Skipped
from .peft import truthy


def qalora_right(config: dict, a: torch.Tensor) -> torch.Tensor:
    """A·P of a QA-LoRA layer: each column of A (r, n/g) repeated g times, times n/g² (see the module docstring)."""
    group = int(config.get("qalora_group_size", 16))
    return a.repeat_interleave(group, dim=1) * (a.shape[1] / group)


def is_qalora(config: dict) -> bool:
    return truthy(config.get("use_qalora"))


def bdlora_factors(config: dict, name: str, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with the block-diagonal one expanded, as PEFT's BD-LoRA applies them; unchanged elsewhere."""
    rule = config.get("use_bdlora")
    if not isinstance(rule, dict):
        return a, b
    blocks = int(rule.get("nblocks", 1))
    on_a = any(pattern in name for pattern in rule.get("target_modules_bd_a") or [])
    on_b = any(pattern in name for pattern in rule.get("target_modules_bd_b") or [])
    if on_a and a.ndim == 2 and a.shape[0] % blocks == 0:
        a = block_diagonal_rows(a, blocks)
    elif on_b and b.ndim == 2 and b.shape[0] % blocks == 0:
        b = block_diagonal_rows(b, blocks)
    return a, b


def block_diagonal_rows(matrix: torch.Tensor, blocks: int) -> torch.Tensor:
    """blockdiag(M_1, …, M_b) of a matrix saved compact, its b row blocks M_j stacked (BD-LoRA's factor, a grouped
    conv's B): (rows, c) → (rows, b·c)."""
    return torch.block_diag(*torch.chunk(matrix, blocks, dim=0))


def conv_groups(a_shape: tuple[int, ...], b_shape: tuple[int, ...]) -> int:
    """The groups g of PEFT's LoRA on a grouped conv, from its factors' shapes (1 for any other layer): its B is a
    grouped 1×…×1 conv itself, weight (out, r/g, 1, …), so B has r/g columns where A has r rows."""
    if len(a_shape) <= 2 or len(b_shape) != len(a_shape) or not 0 < b_shape[1] < a_shape[0]:
        return 1
    rank, columns, out = a_shape[0], b_shape[1], b_shape[0]
    if rank % columns or out % (rank // columns):
        return 1
    return rank // columns


def grouped_conv_b(b: torch.Tensor, groups: int) -> torch.Tensor:
    """A grouped conv LoRA's B as the out × r (× 1…) factor it applies: blockdiag(B_1, …, B_g), B_j its rows of
    group j (group j's outputs read only group j's r/g channels of A·x)."""
    return block_diagonal_rows(b.reshape(b.shape[0], -1), groups).reshape(b.shape[0], -1, *b.shape[2:])


GROUPED = "_grouped"  # the suffix of a grouped conv's kind: conv2d_grouped


def grouped_conv_note(groups: dict[str, int]) -> str:
    """The note on the layers (name → groups) that are LoRA on a grouped conv."""
    names = list(groups)
    return (
        f"LoRA on a grouped conv (groups {', '.join(map(str, sorted(set(groups.values()))))}) in {len(names)} "
        f"layer(s), e.g. {names[0]}: PEFT's B is itself grouped, so ΔW = s·blockdiag(B_1..B_g)·A, a kernel "
        "(out, in, k…) over every input channel where the grouped base weight is (out, in/g, k…): PEFT does not "
        f"merge it, --base has no weight of its shape for it, and convert does not write it (kind conv…{GROUPED})"
    )


# LoRA variants whose saved extra tensors act only in training: the eval forward and PEFT's merge apply s·B·A
# (PEFT 0.21 variants.py: VeLoRA swaps in a backward pass that stores compressed activations, projected on
# ``lora_velora_embed``; MonteCLoRA's ``lora_monteclora_sampler`` perturbs A by Monte Carlo sampling while
# ``module.training`` only, and its merge "ignores the MC sampling")
_TRAINING_ONLY = {
    "lora_velora_embed": (
        "velora_config",
        "VeLoRA's activation projection for its compressed backward pass, not part of ΔW (the forward and PEFT's "
        "merge apply s·B·A)",
    ),
    "lora_monteclora_sampler": (
        "monteclora_config",
        "MonteCLoRA's Monte Carlo sampler, used only in training, not part of ΔW (the eval forward and PEFT's merge "
        "apply s·B·A)",
    ),
}


def training_only(keys: list[str], config: dict | None) -> tuple[list[Skipped], list[str], list[str]]:
    """(the keys of training-only variant tensors, skipped as expected; the other keys; a note per variant)."""
    skipped, rest, seen = [], [], set()
    for key in keys:
        marker = next((m for m in _TRAINING_ONLY if f".{m}" in key or key.startswith(m)), None)
        if marker is None:
            rest.append(key)
        else:
            skipped.append(Skipped(key, _TRAINING_ONLY[marker][1], True))
            seen.add(_TRAINING_ONLY[marker][0])
    seen |= {flag for flag, _ in _TRAINING_ONLY.values() if (config or {}).get(flag) is not None}
    notes = [
        f"{flag}: {'VeLoRA' if flag == 'velora_config' else 'MonteCLoRA'} changes training only; ΔW = s·B·A as "
        "PEFT's merge applies it (its extra tensors are skipped)"
        for flag in sorted(seen)
    ]
    return skipped, rest, notes
