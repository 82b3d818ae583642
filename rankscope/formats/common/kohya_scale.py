"""The scale s of a kohya / LyCORIS module, as the loaders apply it (kohya, diffusers, ComfyUI, LyCORIS's reload).

s = alpha/r, with ``alpha`` the module's stored ``<name>.alpha`` scalar and r its rank (``lora_down`` rows,
LoHa's r, LoKr's decomposed factor's r, GLoRA's ``a2`` rows):

- **rs_lora** (LyCORIS LoCon/LoHa/LoKr): the module applies α/√r but stores ``alpha * (r/√r)`` = α·√r, so
  alpha/r is its scale either way — and LyCORIS's reload, which never passes rs_lora, reads it so.
- **GLoRA** stores α itself: under rs_lora it applied α/√r while training, but LyCORIS's reload
  (``GLoRAModule.make_module_from_state_dict`` passes no rs_lora) applies alpha/r. rankscope follows the reload
  and warns.
- **LoKr with both factors in full**: s = 1 whatever alpha says (LyCORIS sets α = r; its reload builds the module
  with r = 1, as ComfyUI applies it). Under rs_lora the training-time module applied √r instead: warned.
- α = 0 means α = r (kohya and LyCORIS replace 0 by the rank when they build the module).
- **no alpha tensor**: α = r (scale 1), as kohya's ``create_network_from_weights``, diffusers' and ComfyUI's
  loaders apply it, even where the metadata's ``ss_network_alpha`` (``conv_alpha`` of ``ss_network_args`` for a
  conv with a kernel larger than 1) says otherwise: that disagreement is warned, naming the value.
- ``--alpha A`` stands for every module's stored alpha: s = A/r.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field

from .lycoris_math import FactorError, Stored
from .peft import alpha_tensor

_LOADERS = "as kohya's, diffusers' and ComfyUI's loaders apply it"


@dataclass
class Scaling:
    """What the file (and ``--alpha``) say about α, and what had to be assumed along the way."""

    override: float | None
    metadata_alpha: float | None
    metadata_conv_alpha: float | None
    rs_lora: bool
    zero_alpha: list[str] = field(default_factory=list)
    no_alpha: list[str] = field(default_factory=list)
    disagrees: list[tuple[str, float]] = field(default_factory=list)  # (module, the metadata's α)
    rs_lora_reload: list[str] = field(default_factory=list)  # GLoRA / full LoKr modules trained at another scale

    def scale(
        self, module: str, stored_alpha: float | None, rank: int | None, kernel: tuple[int, ...], algorithm: str
    ) -> float:
        """s = alpha/r; 1 where r is None (LyCORIS LoKr with both factors in full)."""
        if self.rs_lora and (algorithm == "glora" or rank is None):
            self.rs_lora_reload.append(module)
        if rank is None:
            return 1.0
        if self.override is not None:
            return self.override / rank
        if stored_alpha is None:
            self.no_alpha.append(module)
            conv = any(k != 1 for k in kernel)
            said = self.metadata_conv_alpha if conv and self.metadata_conv_alpha is not None else self.metadata_alpha
            if said is not None and said != rank:
                self.disagrees.append((module, said))
            return 1.0
        if stored_alpha == 0:
            self.zero_alpha.append(module)
            return 1.0
        return stored_alpha / rank

    def warnings(self) -> list[str]:
        out = []
        if self.override is not None:
            out.append(f"--alpha {self.override:g} overrides every module's alpha (scale --alpha/r)")
        if self.zero_alpha:
            out.append(_modules(self.zero_alpha, "alpha = 0, read as α = r (scale 1) as kohya and LyCORIS do"))
        if self.disagrees:
            values = sorted({value for _, value in self.disagrees})
            said = "ss_network_alpha/conv_alpha" if self.metadata_conv_alpha is not None else "ss_network_alpha"
            out.append(
                _modules(
                    [module for module, _ in self.disagrees],
                    f"no alpha tensor, read with α = r (scale 1) {_LOADERS}; the file's metadata disagrees: "
                    f"{said} = {', '.join(f'{v:g}' for v in values)}",
                )
            )
        elif self.no_alpha and self.metadata_alpha is None:
            out.append(
                _modules(
                    self.no_alpha, f"no alpha tensor and no ss_network_alpha metadata: α = r (scale 1), {_LOADERS}"
                )
            )
        if self.rs_lora_reload:
            out.append(
                _modules(
                    self.rs_lora_reload,
                    "rs_lora: GLoRA (and LoKr with both factors in full) applied α/√r while training, but LyCORIS's "
                    "reload applies alpha/r (full LoKr: 1); analysed as reloaded",
                )
            )
        return out

    def notes(self) -> list[str]:
        if self.rs_lora:
            return ["ss_network_args sets rs_lora: LyCORIS stores α·√r in each module's alpha, so the scale is alpha/r"]
        return []


def partial_alphas_warning(alphas: list[float], without: list[str]) -> str:
    """For PEFT-named LoRA keys: modules ``without`` an ``.alpha`` beside modules with one (``alphas``, their
    values) are read with α = r, but the loaders disagree on them."""
    common = Counter(alphas).most_common(1)
    instead = f" ({common[0][0]:g})" if common else ""
    return (
        f"{len(without)} module(s) with no alpha tensor beside modules with one ({without[0]} …): read with α = r "
        "(scale 1), as kohya's and ComfyUI's loaders and diffusers' converters (Wan, Qwen-Image, Z-Image) apply it; "
        f"diffusers' loader of PEFT-named keys (get_peft_kwargs: Flux, SD3) gives them the file's most common alpha"
        f"{instead} instead"
    )


def _modules(modules: list[str], what: str) -> str:
    return f"{len(modules)} module(s) with {what} ({modules[0]} …)"


def _number(text: object) -> float | None:
    try:
        value = float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def scaling(metadata: dict[str, str], override: float | None) -> Scaling:
    """The scaling settings of a file from its safetensors metadata (kohya's ``ss_…`` keys) and ``--alpha``."""
    try:
        args = json.loads(metadata.get("ss_network_args", "{}"))
    except json.JSONDecodeError:
        args = {}
    args = args if isinstance(args, dict) else {}
    rs_lora = str(args.get("rs_lora", "false")).lower() in ("true", "1")
    return Scaling(override, _number(metadata.get("ss_network_alpha")), _number(args.get("conv_alpha")), rs_lora)


def stored_alpha(stored: Stored) -> float | None:
    """The module's ``alpha`` scalar (any dtype), or None without one."""
    if "alpha" not in stored:
        return None
    key, alpha = stored["alpha"]
    value, problem = alpha_tensor(alpha, key)
    if problem is not None:
        raise FactorError(problem)
    return value
