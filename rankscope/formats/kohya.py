"""kohya-ss / LyCORIS networks (the Stable Diffusion ecosystem): one safetensors file, no adapter_config.json.

Modules are named as stored (``lora_unet_down_blocks_0_attentions_0_proj_in``,
``lora_te_text_model_encoder_layers_0_self_attn_q_proj``): these names are not base-model paths and stay as
they are. Per module, one of

- **LoRA / LoCon** (kohya, LyCORIS "locon"): ``<name>.lora_down.weight`` (r, in[, *k]) and
  ``<name>.lora_up.weight`` (out, r[, 1…]); ΔW = s·up·down with the kernel flattened into the columns:
  FactoredUpdate(up (out, r), down (r, in·∏k)).
- **LoCon with a Tucker core** (LyCORIS ``use_tucker``/``use_cp``): ``down`` is 1×1 (r, in, 1…), ``up`` 1×1
  (out, r, 1…) and ``<name>.lora_mid.weight`` (r, r, *k) carries the kernel. As convs applied in turn,
  up ∘ mid ∘ down is the one conv with weight W[o, c, κ] = Σ_{i,j} up[o, i]·mid[i, j, κ]·down[j, c], so the
  analysed matrix is up·M with M[i, (c, κ)] = Σ_j mid[i, j, κ]·down[j, c] (r × in·∏k):
  FactoredUpdate(up, M), exact, rank ≤ r.
- **LoHa** (``hada_w1_a`` …, optional ``hada_t1``/``hada_t2``) and **LoKr** (``lokr_w1`` …, optional
  ``lokr_t2``): the maths of :mod:`.lycoris_math`, shared with PEFT's LoHa/LoKr.

Scale s = α/r (α/√r where the file's ``ss_network_args`` set ``rs_lora``), α from ``<name>.alpha`` (a scalar
tensor), r the module's rank (``lora_down`` rows; LoHa's r; LoKr's decomposed factor's r):

- α = 0 means α = r (kohya and LyCORIS replace 0 by the rank when they build the module);
- no ``alpha`` tensor: α from the metadata's ``ss_network_alpha`` (``conv_alpha`` of ``ss_network_args`` for
  a conv with a kernel larger than 1) where present, else s = 1 (kohya loads such files with α = r);
- LyCORIS's LoKr with both factors stored in full has s = 1 whatever α says (PEFT's LoKr differs);
- ``--alpha`` replaces every module's α.

DoRA modules (``dora_scale``) need the base weights and are reported as invalid layers.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field

from ..checkpoint import Checkpoint, Layer, Skipped
from ..update import FactoredUpdate
from . import Format, ReadOptions, register_format
from .lycoris_math import (
    LOHA_ROLES,
    LOKR_ROLES,
    FactorError,
    Stored,
    check_finite,
    group_modules,
    layer_shape,
    loha_factors,
    loha_update,
    lokr_factors,
    lokr_update,
    tucker_right,
)
from .source import AdapterSource

FAMILY = "kohya"
_LORA_ROLES = ("lora_down", "lora_up", "lora_mid")
_EXTRA_ROLES = ("alpha", "dora_scale", "scalar")
_ROLES = (*_LORA_ROLES, *LOHA_ROLES, *LOKR_ROLES, *_EXTRA_ROLES)
# kohya writes lora_down/lora_up/lora_mid with ``.weight`` and LyCORIS its other tensors without; accept either
_KEY = re.compile(rf"^(?P<module>.+)\.(?P<role>{'|'.join(_ROLES)})(?:\.weight)?$")
_KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lora_te3_", "lycoris_")
_METADATA_KEYS = ("ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args", "ss_base_model_version")


def detect(source: AdapterSource) -> bool:
    """kohya names: ``.lora_down.weight``/``.lora_up.weight``, or LyCORIS LoHa/LoKr keys next to an ``alpha``
    tensor (PEFT never saves one) or under a kohya module name (``lora_unet_…``) — and no adapter_config.json."""
    if source.config is not None:
        return False
    keys = set(source.tensors.keys())
    for key in keys:
        match = _KEY.match(key)
        if match is None:
            continue
        if match["role"] in ("lora_down", "lora_up"):
            return True
        if match["role"] in ("hada_w1_a", "lokr_w1", "lokr_w1_a"):
            module = match["module"]
            if f"{module}.alpha" in keys or module.startswith(_KOHYA_PREFIXES):
                return True
    return False


# -- scale ---------------------------------------------------------------------------------------------------


@dataclass
class _Scaling:
    """What the file (and ``--alpha``) say about α, and what had to be assumed along the way."""

    override: float | None
    metadata_alpha: float | None
    metadata_conv_alpha: float | None
    rs_lora: bool
    zero_alpha: list[str] = field(default_factory=list)
    from_metadata: list[str] = field(default_factory=list)
    no_alpha: list[str] = field(default_factory=list)

    def scale(self, module: str, stored_alpha: float | None, rank: int | None, kernel: tuple[int, ...]) -> float:
        """s = α/r (α/√r under rs_lora); 1 where r is None (LyCORIS LoKr with both factors in full)."""
        if rank is None:
            return 1.0
        if self.override is not None:
            alpha = self.override
        elif stored_alpha is not None:
            alpha = stored_alpha
            if alpha == 0:
                self.zero_alpha.append(module)
                alpha = float(rank)
        else:
            conv = any(k != 1 for k in kernel)
            alpha = self.metadata_conv_alpha if conv and self.metadata_conv_alpha is not None else self.metadata_alpha
            if alpha is None:
                self.no_alpha.append(module)
                return 1.0
            self.from_metadata.append(module)
        return alpha / (math.sqrt(rank) if self.rs_lora else rank)

    def warnings(self) -> list[str]:
        out = []
        if self.override is not None:
            out.append(f"--alpha {self.override:g} overrides every module's alpha")
        if self.rs_lora:
            out.append("ss_network_args sets rs_lora: scale α/√r")
        for modules, what in (
            (self.zero_alpha, "alpha = 0, read as α = r (scale 1) as kohya and LyCORIS do"),
            (self.from_metadata, "no alpha tensor: α from the file's ss_network_alpha metadata"),
            (self.no_alpha, "no alpha tensor and no ss_network_alpha metadata: scale 1 (α = r), as kohya loads it"),
        ):
            if modules:
                out.append(f"{len(modules)} module(s) with {what} ({modules[0]} …)")
        return out


def _number(text: object) -> float | None:
    try:
        value = float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _scaling(metadata: dict[str, str], options: ReadOptions) -> _Scaling:
    try:
        args = json.loads(metadata.get("ss_network_args", "{}"))
    except json.JSONDecodeError:
        args = {}
    args = args if isinstance(args, dict) else {}
    rs_lora = str(args.get("rs_lora", "false")).lower() in ("true", "1")
    return _Scaling(options.alpha, _number(metadata.get("ss_network_alpha")), _number(args.get("conv_alpha")), rs_lora)


def _stored_alpha(stored: Stored) -> float | None:
    if "alpha" not in stored:
        return None
    key, alpha = stored["alpha"]
    if alpha.numel() != 1 or alpha.ndim > 1:
        raise FactorError(f"{key}: alpha must be a scalar, found shape {list(alpha.shape)}")
    value = float(alpha.reshape(()).double())
    if not math.isfinite(value):
        raise FactorError(f"{key}: alpha is {value}")
    return value


# -- layers ----------------------------------------------------------------------------------------------------


def _lora_update(stored: Stored, module: str) -> tuple[FactoredUpdate, int, tuple[int, ...], int, int]:
    """(unscaled up·down or up·mid·down, r, kernel, out, in) of a LoRA / LoCon module."""
    if "lora_down" not in stored or "lora_up" not in stored:
        have, missing = ("lora_down", "lora_up") if "lora_down" in stored else ("lora_up", "lora_down")
        key = stored[have][0] if have in stored else stored["lora_mid"][0]
        raise FactorError(f"{key}: has no matching {module}.{missing}.weight")
    check_finite(stored)
    (down_key, down), (up_key, up) = stored["lora_down"], stored["lora_up"]
    if down.ndim < 2 or up.ndim < 2:
        key, bad = (down_key, down) if down.ndim < 2 else (up_key, up)
        raise FactorError(f"{key}: expected a matrix or a conv kernel, found shape {list(bad.shape)}")
    rank = int(down.shape[0])
    if rank == 0:
        raise FactorError(f"{down_key}: rank 0 (an empty factor)")
    if up.shape[1] != rank:
        raise FactorError(
            f"{up_key}: rank mismatch: {down_key} has r={rank} rows but {up_key} has {up.shape[1]} columns"
        )
    if any(k != 1 for k in up.shape[2:]):
        raise FactorError(f"{up_key}: lora_up must be 1×…×1 in its kernel dims, found shape {list(up.shape)}")
    left = up.reshape(up.shape[0], rank)
    if "lora_mid" not in stored:
        return FactoredUpdate(left, down.reshape(rank, -1)), rank, tuple(down.shape[2:]), up.shape[0], down.shape[1]
    mid_key, mid = stored["lora_mid"]
    if any(k != 1 for k in down.shape[2:]):
        raise FactorError(f"{down_key}: with a lora_mid core, lora_down must be 1×…×1, found shape {list(down.shape)}")
    if mid.ndim < 3 or (mid.shape[0], mid.shape[1]) != (rank, rank):
        raise FactorError(f"{mid_key}: expected shape [{rank}, {rank}, *kernel], found {list(mid.shape)}")
    right = tucker_right(mid, down.reshape(rank, -1))
    return FactoredUpdate(left, right), rank, tuple(mid.shape[2:]), up.shape[0], down.shape[1]


def _algorithm(roles: dict[str, str]) -> str | None:
    """Which algorithm a module's tensors belong to: lora, loha, lokr, or None (no factors at all)."""
    kinds = {
        "lora": any(role in roles for role in _LORA_ROLES),
        "loha": any(role in roles for role in LOHA_ROLES),
        "lokr": any(role in roles for role in LOKR_ROLES),
    }
    present = [name for name, there in kinds.items() if there]
    if len(present) > 1:
        key = next(key for role, key in sorted(roles.items()) if role not in _EXTRA_ROLES)
        raise FactorError(f"{key}: its module mixes {' and '.join(present)} tensors")
    return present[0] if present else None


def _layer(source: AdapterSource, module: str, roles: dict[str, str], scaling: _Scaling) -> Layer | None:
    """One module's layer; None for a module without factors (its keys are then skipped)."""
    stored = {role: (key, source.tensors.get(key)) for role, key in roles.items() if role != "scalar"}
    params = sum(tensor.numel() for role, (_, tensor) in stored.items() if role != "alpha")
    family = "lora"
    try:
        algorithm = _algorithm(roles)
        if algorithm is None:
            return None
        family = "locon" if "lora_mid" in roles else algorithm
        if "dora_scale" in stored:
            raise FactorError(
                f"{stored['dora_scale'][0]}: DoRA (weight_decompose) rescales W0 + ΔW by the base weight's norms "
                "and needs the base model; not supported for kohya/LyCORIS files"
            )
        alpha = _stored_alpha(stored)
        factors_only = {role: value for role, value in stored.items() if role != "alpha"}
        if algorithm == "lora":
            product, rank, kernel, out, width = _lora_update(factors_only, module)
            update = FactoredUpdate(product.left, product.right, scale=scaling.scale(module, alpha, rank, kernel))
            kind = f"conv{len(kernel)}d" if kernel else "linear"
            return Layer(module, update, (out, width, *kernel), params, kind=kind, family=family)
        if algorithm == "loha":
            factors = loha_factors(factors_only, module)
            update = loha_update(factors, scaling.scale(module, alpha, factors.rank, factors.kernel))
        else:
            factors = lokr_factors(factors_only, module)
            update = lokr_update(factors, scaling.scale(module, alpha, factors.rank, factors.kernel))
        width = update.shape[1]
        shape, kind = layer_shape(None, module, factors.out_features, factors.in_features, factors.kernel, width)
    except FactorError as exc:
        return Layer(module, None, (), params, family=family, error=str(exc))
    return Layer(module, update, shape, params, kind=kind, family=family)


def read(source: AdapterSource, options: ReadOptions) -> Checkpoint:
    metadata = source.tensors.metadata()
    scaling = _scaling(metadata, options)
    modules, unused = group_modules(source.tensors.keys(), _KEY)
    skipped = [Skipped(key, "not a tensor of a kohya/LyCORIS LoRA, LoCon, LoHa or LoKr module") for key in unused]
    layers = []
    for module, roles in modules.items():
        layer = _layer(source, module, roles, scaling)
        if layer is None:
            skipped.extend(
                Skipped(key, "belongs to a module without LoRA, LoHa or LoKr factors (another LyCORIS algorithm?)")
                for key in roles.values()
            )
            continue
        layers.append(layer)
        if "scalar" in roles:
            skipped.append(
                Skipped(roles["scalar"], "LyCORIS folds its scalar into the factors on save and resets it", True)
            )
    lycoris = any(layer.family in ("locon", "loha", "lokr") for layer in layers)
    return Checkpoint(
        path=source.path,
        family=FAMILY,
        adapter_type="LYCORIS" if lycoris else "KOHYA_LORA",
        config={key: metadata[key] for key in _METADATA_KEYS if key in metadata},
        layers=layers,
        skipped=skipped,
        warnings=scaling.warnings(),
        weights_file=source.weights_path,
    )


register_format(
    Format(
        FAMILY,
        "kohya-ss / LyCORIS networks (LoRA, LoCon with Tucker core, LoHa, LoKr) in one safetensors file",
        detect,
        read,
        priority=30,
    )
)
