"""kohya-ss / LyCORIS networks (the Stable Diffusion ecosystem): one safetensors file, no adapter_config.json.

Modules are named as stored (``lora_unet_down_blocks_0_attentions_0_proj_in``, ``lycoris_blocks_0_proj_in``):
these names are not base-model paths and stay as they are (``--base`` resolves them by flattening the base's
own names). Per module, one of

- **LoRA / LoCon** (kohya, LyCORIS "locon", DyLoRA as saved): ``<name>.lora_down.weight`` (r, in[, *k]) and
  ``<name>.lora_up.weight`` (out, r[, 1…]); ΔW = s·up·down with the kernel flattened into the columns:
  FactoredUpdate(up (out, r), down (r, in·∏k)).
- **LoCon with a Tucker core** (LyCORIS ``use_tucker``/``use_cp``): ``down`` is 1×1 (r, in, 1…), ``up`` 1×1
  (out, r, 1…) and ``<name>.lora_mid.weight`` (r, r, *k) carries the kernel. As convs applied in turn,
  up ∘ mid ∘ down is the one conv with weight W[o, c, κ] = Σ_{i,j} up[o, i]·mid[i, j, κ]·down[j, c], so the
  analysed matrix is up·M with M[i, (c, κ)] = Σ_j mid[i, j, κ]·down[j, c] (r × in·∏k):
  FactoredUpdate(up, M), exact, rank ≤ r.
- **LoHa** (``hada_w1_a`` …, optional ``hada_t1``/``hada_t2``) and **LoKr** (``lokr_w1`` …, optional
  ``lokr_t2``): the maths of :mod:`.common.lycoris_math`, shared with PEFT's LoHa/LoKr.
- **full** (``diff``, ``diff_b``) and **GLoRA** (``a1``, ``a2``, ``b1``, ``b2``; needs ``--base``): the maths of
  :mod:`.common.lycoris_dense`. A 1-D ``diff`` (a norm layer's weight difference: LyCORIS full on a norm, ComfyUI's
  LoraSave) and a ``diff_b`` without a weight update are vector updates, listed in ``skipped``.
- **a bias difference beside factors**: ComfyUI's "Extract and Save Lora" (``LoraSave``, ``bias_diff`` on by
  default) writes ``<name>.diff_b`` beside ``lora_up``/``lora_down``, and ComfyUI's loader adds it to the bias
  unscaled (a ``diff`` patch, not multiplied by alpha/r): the layer's bias update, ‖diff_b‖ as stored.
- **DoRA** (``dora_scale`` beside LoRA/LoHa/LoKr factors, LyCORIS ``weight_decompose``): ΔW = W' − W0 as
  LyCORIS's forward applies it (:mod:`.common.lycoris_dense`); needs ``--base``, else the layer is invalid.

- **(IA)³** (``weight``, ``on_input``), **Diag-OFT** and **BOFT** (``oft_blocks``, ``rescale``; ``alpha`` is
  their constraint): they act on W0 itself, so they need ``--base`` (:mod:`.common.lycoris_oft`; without it their
  tensors are skipped, saying so); dense.
- **norm** (``train_norm``: ``w_norm``, ``b_norm`` on a LayerNorm/GroupNorm): LyCORIS adds w_norm·norm(x) + b_norm,
  so Δγ = w_norm, a ``vector`` layer ΔW = diag(Δγ) (σ = |Δγ| sorted), and Δβ = b_norm its bias update, unscaled.

The scale s is alpha/r as the loaders apply it: :mod:`.common.kohya_scale`. T-LoRA's tensors (``q_layer`` …) are
listed in ``skipped`` with a reason naming the algorithm.
"""

from __future__ import annotations

import math
import re
from functools import partial

from ..core.checkpoint import Checkpoint, Layer, Skipped
from ..core.errors import CheckpointError, UnsupportedAdapterError
from ..core.update import DiagonalUpdate, FactoredUpdate, upcast
from . import Format, ReadOptions, register_format
from .common.kohya_scale import Scaling, scaling, stored_alpha
from .common.lycoris_dense import (
    FULL_ROLES,
    GLORA_ROLES,
    dora_axis,
    full_update,
    glora_factors,
    glora_update,
    weight_decompose_update,
)
from .common.lycoris_math import (
    LOHA_ROLES,
    LOKR_ROLES,
    FactorError,
    Stored,
    check_finite,
    kind_of,
    layer_shape,
    loha_factors,
    loha_update,
    lokr_factors,
    lokr_update,
    tucker_right,
)
from .common.lycoris_oft import IA3_ROLES, OFT_ROLES, ia3_update, oft_update
from .common.reader import build_checkpoint, group_keys, second_spellings, skipped_keys
from .common.source import AdapterSource

FAMILY = "kohya"
_LORA_ROLES = ("lora_down", "lora_up", "lora_mid")
_EXTRA_ROLES = ("alpha", "dora_scale", "scalar")
# the LyCORIS algorithms whose tensors are recognised but not read, with the roles that tell them
_OTHER_ROLES = {
    "ia3": IA3_ROLES,  # and ``<name>.weight``, attached below where ``on_input`` is there
    "oft": OFT_ROLES,
    "norm": ("w_norm", "b_norm"),
    "tlora": ("q_layer", "p_layer", "lambda_layer"),
}
_ALGORITHMS = {
    "lora": _LORA_ROLES,
    "loha": LOHA_ROLES,
    "lokr": LOKR_ROLES,
    "full": FULL_ROLES,
    "glora": GLORA_ROLES,
    **_OTHER_ROLES,
}
_BIAS_BESIDE = {"full", "lora", "loha", "lokr"}  # the algorithms a diff_b may stand beside (see _algorithm)
_ROLES = tuple(role for roles in _ALGORITHMS.values() for role in roles) + _EXTRA_ROLES
# kohya writes lora_down/lora_up/lora_mid with ``.weight`` and LyCORIS its other tensors without; accept either
_KEY = re.compile(rf"^(?P<module>.+)\.(?P<role>{'|'.join(_ROLES)})(?:\.weight)?$")
_KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lora_te3_", "lycoris_")
_METADATA_KEYS = ("ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args", "ss_base_model_version")
_BASE_HINT = "pass --base BASE (the base model the adapter was trained on)"
_VECTOR_DIFF = "a vector (norm) weight difference: a vector update, not read yet"
_LONE_BIAS = "a bias difference (diff_b) without a weight update: a vector update, not read yet"
_NOT_READ = {
    "ia3": f"a LyCORIS (IA)³ module (weight, on_input): ΔW = diag(w)·W0 rescales the base weight; {_BASE_HINT}",
    "diag-oft": f"a LyCORIS diag-OFT module (oft_blocks): ΔW = (Rᵀ − I)·W0 rotates the base weight; {_BASE_HINT}",
    "boft": f"a LyCORIS BOFT module (butterfly oft_blocks): rotates the base weight; {_BASE_HINT}",
    "tlora": "a LyCORIS T-LoRA module (q_layer, p_layer, lambda_layer): its update depends on the diffusion "
    "timestep (a mask of ranks per step), no static ΔW",
    "glora": f"a GLoRA module: ΔW = s·(W0·a1·a2 + b1·b2) involves the base weight W0; {_BASE_HINT}",
}
_NEEDS_BASE = {"glora": "GLoRA", "ia3": "(IA)³", "diag-oft": "diag-OFT", "boft": "BOFT"}


_COMFYUI_PREFIXES = ("diffusion_model.", "text_encoders.")


# the roles that tell a LyCORIS module (LoHa, LoKr, full, GLoRA, (IA)³, OFT, norm, T-LoRA) beside an ``alpha`` tensor
_TELLING_ROLES = ("hada_w1_a", "lokr_w1", "lokr_w1_a", "diff", "a1", "on_input", "oft_blocks", "w_norm", "q_layer")


def detect(source: AdapterSource) -> bool:
    """kohya names: ``.lora_down.weight``/``.lora_up.weight``, or LyCORIS LoHa/LoKr/full/GLoRA/(IA)³/OFT/norm keys
    next to an ``alpha`` tensor (PEFT never saves one) or under a kohya module name (``lora_unet_…``) — and no
    adapter_config.json."""
    if source.config is not None:
        return False
    keys = set(source.tensors.keys())
    for key in keys:
        match = _KEY.match(key)
        if match is None:
            continue
        if match["role"] in ("lora_down", "lora_up"):
            return True
        if match["role"] in _TELLING_ROLES:
            module = match["module"]
            if f"{module}.alpha" in keys or module.startswith(_KOHYA_PREFIXES):
                return True
            # ComfyUI's Extract and Save Lora with lora_type "full_diff": only diff/diff_b, ComfyUI's own names
            if match["role"] == "diff" and module.startswith(_COMFYUI_PREFIXES):
                return True
    return False


def _group(keys: list[str]) -> tuple[dict[str, dict[str, str]], list[str], list[Skipped]]:
    """{module: {role: key}}, the keys of no module and the second spellings of a part; LyCORIS (IA)³'s
    ``<name>.weight`` joins its ``on_input``."""
    grouped, unused = group_keys(keys, _KEY)
    modules = {stored: module.keys for stored, module in grouped.items()}
    rest = []
    for key in unused:
        module, _, role = key.rpartition(".")
        if role == "weight" and "on_input" in modules.get(module, {}):
            modules[module]["weight"] = key
        else:
            rest.append(key)
    return modules, rest, second_spellings(grouped.values())


def _algorithm(roles: dict[str, str], stored: Stored) -> str | None:
    """Which LyCORIS algorithm a module's tensors belong to; None for a module without factors (only alpha …)."""
    present = [name for name, names in _ALGORITHMS.items() if any(role in roles for role in names)]
    # only a diff_b beside LoRA/LoHa/LoKr factors: that layer's bias update (ComfyUI's LoraSave), not a full module
    if "diff" not in roles and "full" in present and len(present) > 1 and set(present) <= _BIAS_BESIDE:
        present.remove("full")
    if len(present) > 1:
        key = next(key for role, key in sorted(roles.items()) if role not in _EXTRA_ROLES)
        raise FactorError(f"{key}: its module mixes {' and '.join(present)} tensors")
    if not present:
        return None
    if present[0] == "oft":  # diag-OFT stores (blocks, size, size), BOFT (m, blocks, size, size)
        blocks = stored.get("oft_blocks")
        return "boft" if blocks is not None and blocks[1].ndim == 4 else "diag-oft"
    return present[0]


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


def _base_shape(options: ReadOptions, module: str, key: str, what: str) -> tuple[int, ...]:
    """The base weight's shape for ``module``; a FactorError naming ``key`` and --base where there is none."""
    if options.base is None:
        raise FactorError(f"{key}: {what} needs the base weight: {_BASE_HINT}")
    try:
        return tuple(options.base.shape(module))
    except CheckpointError:
        raise FactorError(
            f"{key}: {what} needs the base weight, but --base ({options.base.path}) has none for {module!r} "
            "(is --base the model this adapter was trained on?)"
        ) from None


def _dora(update, stored: Stored, module: str, options: ReadOptions):
    """The DoRA (weight_decompose) update of a module whose scaled ΔW is ``update``, against ``--base``."""
    key, magnitude = stored["dora_scale"]
    what = "DoRA (weight_decompose) rescales W0 + ΔW by the base weight's norms, so it"
    if options.base is None:
        raise FactorError(f"{key}: {what} needs the base weight: {_BASE_HINT}, or --directional-only for ΔW alone")
    base_shape = _base_shape(options, module, key, what)
    if math.prod(base_shape[1:]) != update.shape[1] or base_shape[0] != update.shape[0] or len(base_shape) < 2:
        raise FactorError(
            f"{key}: the base weight has shape {list(base_shape)}, which does not fit ΔW of shape {list(update.shape)}"
        )
    on_out = dora_axis(magnitude, key, base_shape)
    base = options.base
    return weight_decompose_update(update, magnitude, lambda: base.get(module), base_shape, on_out), base_shape


def _factored_layer(
    algorithm: str, stored: Stored, module: str, scaling: Scaling, options: ReadOptions, alpha: float | None
) -> tuple[object, tuple[int, ...], str]:
    """(scaled update, stored weight shape, kind) of a LoRA/LoCon, LoHa or LoKr module."""
    factors_only = {role: value for role, value in stored.items() if role not in ("alpha", "dora_scale", "diff_b")}
    if algorithm == "lora":
        product, rank, kernel, out, width = _lora_update(factors_only, module)
        scale = scaling.scale(module, alpha, rank, kernel, algorithm)
        update = FactoredUpdate(product.left, product.right, scale=scale)
        return update, (out, width, *kernel), kind_of((out, width, *kernel))
    if algorithm == "loha":
        factors = loha_factors(factors_only, module)
        update = loha_update(factors, scaling.scale(module, alpha, factors.rank, factors.kernel, algorithm))
    else:
        factors = lokr_factors(factors_only, module)
        update = lokr_update(factors, scaling.scale(module, alpha, factors.rank, factors.kernel, algorithm))
    # the base, where given, tells a conv from a Linear where the stored factors do not
    width = update.shape[1]
    shape, kind = layer_shape(options.base, module, factors.out_features, factors.in_features, factors.kernel, width)
    return update, shape, kind


def _layer(source: AdapterSource, module: str, roles: dict[str, str], scaling: Scaling, options: ReadOptions):
    """One module's layer, or the reason its tensors are skipped (a string) for an algorithm not read here."""
    stored = {role: (key, source.tensors.get(key)) for role, key in roles.items() if role != "scalar"}
    params = sum(tensor.numel() for role, (_, tensor) in stored.items() if role not in ("alpha", "on_input"))
    family = "lora"
    try:
        algorithm = _algorithm(roles, stored)
        if algorithm is None:
            return "belongs to a module with no factors of any LyCORIS algorithm (only alpha/dora_scale)"
        if algorithm in _NOT_READ and not (algorithm in _NEEDS_BASE and options.base is not None):
            return _NOT_READ[algorithm]
        family = "locon" if "lora_mid" in roles else algorithm
        if algorithm == "norm":
            return _norm_layer(stored, module, params)
        if algorithm in ("ia3", "diag-oft", "boft"):
            key = stored["weight" if algorithm == "ia3" else "oft_blocks"][0]
            base_shape = _base_shape(options, module, key, _NEEDS_BASE[algorithm])
            load_base = partial(options.base.get, module)  # read when the update is built
            if algorithm == "ia3":
                update = ia3_update(stored, base_shape, load_base)
            else:
                update = oft_update(stored, module, base_shape, stored_alpha(stored) or 0.0, load_base)
            return Layer(module, update, base_shape, params, kind=kind_of(base_shape), family=family)
        if algorithm == "full":
            if "diff" not in stored:
                return _LONE_BIAS
            if stored["diff"][1].ndim == 1:
                return _VECTOR_DIFF
            if "alpha" in stored or "dora_scale" in stored:
                extra = stored.get("alpha", stored.get("dora_scale"))[0]
                raise FactorError(f"{extra}: a full (diff) module has no alpha or dora_scale in LyCORIS")
            update, bias, shape = full_update(stored)
            return Layer(module, update, shape, params, kind=kind_of(shape), family=family, bias_update=bias)
        alpha = stored_alpha(stored)
        if algorithm == "glora":
            factors = glora_factors(stored, module)
            key = stored["a1"][0]
            base_shape = _base_shape(options, module, key, "GLoRA")
            if base_shape != factors.weight_shape:
                raise FactorError(
                    f"{key}: the base weight has shape {list(base_shape)}, but the GLoRA factors fit "
                    f"{list(factors.weight_shape)} (is --base the model this adapter was trained on?)"
                )
            scale = scaling.scale(module, alpha, factors.rank, factors.weight_shape[2:], algorithm)
            update = glora_update(factors, options.base.get(module), scale)
            return Layer(module, update, base_shape, factors.params, kind=kind_of(base_shape), family=family)
        update, shape, kind = _factored_layer(algorithm, stored, module, scaling, options, alpha)
        if "dora_scale" in stored and not options.directional_only:
            update, shape = _dora(update, stored, module, options)
            kind = kind_of(shape)
        bias = _bias_difference(stored, update.shape[0])
    except FactorError as exc:
        return Layer(module, None, (), params, family=family, error=str(exc))
    return Layer(module, update, shape, params, kind=kind, family=family, bias_update=bias, bias_scaled=False)


def _norm_layer(stored: Stored, module: str, params: int) -> Layer:
    """LyCORIS norm (``train_norm``): Δγ = w_norm as ΔW = diag(Δγ) (kind ``vector``), Δβ = b_norm (unscaled)."""
    check_finite(stored)
    key, weight = stored.get("w_norm", stored.get("b_norm"))
    if "w_norm" not in stored or weight.ndim != 1:
        problem = "a b_norm without its w_norm" if "w_norm" not in stored else f"found shape {list(weight.shape)}"
        raise FactorError(f"{key}: expected a norm's weight update of one value per channel ({problem})")
    bias = stored["b_norm"][1] if "b_norm" in stored else None
    if bias is not None and tuple(bias.shape) != tuple(weight.shape):
        raise FactorError(f"{stored['b_norm'][0]}: expected shape {list(weight.shape)}, found {list(bias.shape)}")
    update = DiagonalUpdate(upcast(weight))
    return Layer(module, update, tuple(weight.shape), params, "vector", "norm", bias_update=bias, bias_scaled=False)


def _bias_difference(stored: Stored, rows: int):
    """The ``diff_b`` beside a module's factors (one per output), or None: ComfyUI adds it to the bias as is."""
    if "diff_b" not in stored:
        return None
    key, bias = stored["diff_b"]
    check_finite({"diff_b": stored["diff_b"]})
    if tuple(bias.shape) != (rows,):
        raise FactorError(f"{key}: expected shape [{rows}] (one per output), found {list(bias.shape)}")
    return bias


def read(source: AdapterSource, options: ReadOptions) -> Checkpoint:
    metadata = source.tensors.metadata()
    settings = scaling(metadata, options.alpha)
    modules, unused, twice = _group(list(source.tensors.keys()))
    skipped = skipped_keys(unused, lambda key: "not a tensor of any kohya/LyCORIS module") + twice
    layers, dora = [], []
    for module, roles in modules.items():
        layer = _layer(source, module, roles, settings, options)
        if isinstance(layer, str):
            skipped.extend(Skipped(key, layer) for key in roles.values())
            continue
        layers.append(layer)
        if "dora_scale" in roles and options.directional_only:
            skipped.append(Skipped(roles["dora_scale"], "DoRA magnitude, not used under --directional-only", True))
        elif "dora_scale" in roles and layer.update is not None:
            dora.append(module)
        if "scalar" in roles:
            skipped.append(
                Skipped(roles["scalar"], "LyCORIS folds its scalar into the factors on save and resets it", True)
            )
    needing = {_NOT_READ[algo]: name for algo, name in _NEEDS_BASE.items()}
    waiting = [(item.key, needing[item.reason]) for item in skipped if item.reason in needing]
    if not layers and waiting:
        key, name = waiting[0]
        why = "ΔW = s·(W0·a1·a2 + b1·b2) involves the base weight W0" if name == "GLoRA" else "they act on W0 itself"
        raise CheckpointError(f"{name} modules ({key} …): {why}; {_BASE_HINT}", path=source.weights_path)
    timestep = next((i.key for i in skipped if i.reason == _NOT_READ["tlora"] and ".alpha" not in i.key), None)
    if not layers and timestep is not None:
        raise UnsupportedAdapterError(
            f"T-LoRA modules ({timestep} …): the update depends on the diffusion timestep (a mask of ranks per "
            "step), so there is no static ΔW to analyse",
            path=source.weights_path,
        )
    lycoris = any(layer.family != "lora" for layer in layers) or any(key.startswith("lycoris_") for key in modules)
    warnings = settings.warnings()
    if options.directional_only and any("dora_scale" in roles for roles in modules.values()):
        warnings.insert(
            0, "--directional-only: the DoRA magnitudes (dora_scale) are ignored; the factors' ΔW alone is analysed"
        )
    notes = settings.notes()
    if dora:
        notes.append(
            f"{len(dora)} DoRA (weight_decompose) module(s): ΔW = W' − W0 against --base, generally full rank "
            f"({dora[0]} …)"
        )
    return build_checkpoint(
        source,
        family=FAMILY,
        adapter_type="LYCORIS" if lycoris else "KOHYA_LORA",
        config={key: metadata[key] for key in _METADATA_KEYS if key in metadata},
        layers=layers,
        skipped=skipped,
        warnings=warnings,
        notes=notes,
    )


register_format(
    Format(
        FAMILY,
        "kohya-ss / LyCORIS networks (LoRA, LoCon with Tucker core, LoHa, LoKr, full, GLoRA, DoRA, (IA)³, "
        "Diag-OFT, BOFT, norm) in one safetensors file",
        detect,
        read,
        priority=30,
        needs="--base for GLoRA, DoRA, (IA)³, OFT, BOFT",
        spectrum="factored (LoRA, LoCon, LoHa, GLoRA), Kronecker (LoKr), vector (norm), "
        "dense (full, DoRA, (IA)³, OFT, BOFT)",
    )
)
