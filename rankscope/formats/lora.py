"""PEFT LoRA (and rsLoRA): ``<module>.lora_A.weight`` (r, in), ``<module>.lora_B.weight`` (out, r).

ΔW = s·B·A with s = α/r, or α/√r under ``use_rslora``; r and α per layer through ``rank_pattern`` and
``alpha_pattern``. Linear, GPT-2 Conv1D (``fan_in_fan_out``: the stored weight is (in, out)), Embedding
(``lora_embedding_A`` (r, V), ``lora_embedding_B`` (d, r); the weight update is (B·A)ᵀ) and Conv1d/2d/3d
(A (r, in, *k) flattened to (r, in·∏k); B (out, r, 1, …)). The analysed matrix is always (out, in…). LoRA on
parameters (``target_parameters``: MoE experts, one layer per expert) is read by :mod:`.common.lora_params`.

α as the loaders read it: where a config gives it (adapter_config.json, diffusers' ``lora_adapter_metadata``) it
wins and a stray ``<module>.alpha`` is skipped (PEFT and diffusers never read it); elsewhere a module's ``.alpha``
gives s = alpha/r and a module without one α = r, whatever ``ss_network_alpha`` says (kohya_scale's rules).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..core.checkpoint import Checkpoint, Layer, Skipped
from ..core.errors import UnsupportedAdapterError
from ..core.naming import layer_name
from ..core.update import FactoredUpdate
from . import Format, ReadOptions, register_format
from .common import lora_kasa, lora_params, lora_replication, lora_tokens, lora_variants, reader
from .common.diffusers import AliasKey
from .common.diffusers import partner_key as diffusers_partner
from .common.diffusers import split_key as split_diffusers_key
from .common.kohya_scale import Scaling, partial_alphas_warning
from .common.kohya_scale import scaling as kohya_scaling
from .common.lora_init import apply_init
from .common.lora_layout import orient
from .common.lora_mha import double_applied_warning, pattern_name
from .common.peft import (
    COMPONENTS,
    alpha_config,
    alpha_tensor,
    any_config,
    layer_config,
    layer_scale,
    pattern_value,
    positive_integer,
    skip_reason,
    trained_bias_changes,
    truthy,
    uncovered_components,
)
from .common.source import AdapterSource

# saved files strip the adapter name (``lin.lora_A.weight``); a whole model's state dict keeps it
# (``lin.lora_A.default.weight``, ``emb.lora_embedding_A.default``): the optional ``adapter`` segment
_KEY = re.compile(
    r"^(?P<module>.+)\.(?P<attr>lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)"
    r"(?:\.(?!weight$|bias$)(?P<adapter>[^.]+))?(?P<param>\.weight|\.bias)?$"
)


@dataclass(frozen=True)
class KeyParts:
    """A LoRA tensor key taken apart: ``<module>.<attr>[.<adapter>][<param>]``."""

    module: str
    attr: str
    adapter: str | None
    param: str


def split_key(key: str) -> KeyParts | None:
    """The parts of a LoRA tensor key (``adapter`` None where the name was stripped on save), or None."""
    match = _KEY.match(key)
    if match is None:
        return None
    return KeyParts(match["module"], match["attr"], match["adapter"], match["param"] or "")


# LoRA configs whose flags change the layout or the update in ways this reader does not handle (those in
# _PLAIN_ONLY: only its variants, DoRA and training checkpoints, refuse them)
_PLAIN = "is read only from a plain PEFT LoRA adapter (not with DoRA, not from a training checkpoint)"
_REFUSED_FLAGS = {
    "use_dora": "DoRA (use_dora) is read by the dora format, not plain LoRA (drop --format lora; give --base PATH)",
    "use_bdlora": f"BD-LoRA (use_bdlora) {_PLAIN}",
    "use_qalora": f"QA-LoRA (use_qalora) {_PLAIN}",
    "kasa_config": f"KaSA (kasa_config) {_PLAIN}",
    "layer_replication": f"layer_replication {_PLAIN}",
    "trainable_token_indices": f"trainable_token_indices {_PLAIN}",
    "arrow_config": "Arrow (arrow_config) routes between adapters per token",
    "alora_invocation_tokens": "aLoRA (alora_invocation_tokens) is active only after its invocation tokens",
    "lora_nums": "HydraLoRA (lora_nums) has several B heads and a router: it is read by the hydralora format",
}
_FOREIGN_TENSORS = {
    "lora_sigma": "BoRA (lora_sigma tensors) is read by the bora format, not plain LoRA",
    "lora_route": "HydraLoRA (lora_route tensors) is read by the hydralora format, not plain LoRA",
    "lora_magnitude_vector": "DoRA (lora_magnitude_vector tensors) is read by the dora format, not plain LoRA",
}


def detect(source: AdapterSource) -> bool:
    if source.peft_type is not None:
        return source.peft_type == "LORA"
    # keys that keep an adapter name are a whole model's state dict: the training reader's; diffusers' older
    # layouts (``….lora.down.weight``, ``…processor.to_q_lora.down.weight``) are LoRA too
    saved = any(parts is not None and parts.adapter is None for parts in map(split_key, source.tensors))
    return saved or any(split_diffusers_key(key) is not None for key in source.tensors)


_ROLES = {
    "lora_A": "A",
    "lora_embedding_A": "A",
    "lora_B": "B",
    "lora_embedding_B": "B",
    "lora_magnitude_vector": "magnitude",
}


def is_embedding(module: reader.Module) -> bool:
    """Whether the module's factors are an Embedding's (``lora_embedding_A``/``lora_embedding_B``)."""
    parts = (split_key(module.keys[role]) for role in ("A", "B") if role in module.keys)
    return any(part is not None and part.attr.startswith("lora_embedding") for part in parts)


def _peft_role(adapter: str | None):
    """The role of a PEFT-named key of ``adapter`` ("A", "B", "bias" for lora_B's, "magnitude"), else None."""

    def role(match: re.Match) -> str | None:
        if match["adapter"] != adapter:
            return None
        part = _ROLES[match["attr"]]
        if match["param"] == ".bias":
            return "bias" if part == "B" else None
        return part

    return role


def _group(keys: list[str], adapter: str | None = None) -> tuple[dict[str, reader.Module], list[str]]:
    """Keys by module; only those of ``adapter`` (None: names stripped, as saved), the rest unused.

    Saved files may also name factors in diffusers' layouts (:mod:`.common.diffusers`; PEFT's name wins where a
    module has both) and carry a per-module ``<module>.alpha`` scalar (musubi-tuner, ComfyUI): role "alpha".
    """
    aliases: list[tuple[str, AliasKey]] = []
    alphas: list[str] = []
    peft_named: list[str] = []
    for key in keys:
        alias = split_diffusers_key(key) if adapter is None else None
        if alias is not None:
            aliases.append((key, alias))
        elif key.endswith(".alpha"):  # DiffSynth/ModelScope name the adapter (…lora_A.default.weight) and keep .alpha
            alphas.append(key)
        else:
            peft_named.append(key)
    modules, unused = reader.group_keys(peft_named, _KEY, _peft_role(adapter))
    owners = {stored: module for stored, module in modules.items()}
    for key, alias in aliases:
        module = modules.setdefault(alias.module, reader.Module(alias.module))
        owners.setdefault(alias.stored, module)
        if alias.role in module.keys:
            unused.append(key)
        else:
            module.keys[alias.role] = key
    for key in alphas:
        module = owners.get(key.removesuffix(".alpha")) or modules.get(key.removesuffix(".alpha"))
        if module is None:
            unused.append(key)
        else:
            module.keys["alpha"] = key
    return modules, unused


def _check_config(source: AdapterSource, allow: frozenset[str] = frozenset()) -> list[str]:
    """Refuse what this reader would misread (except the flags and tensors in ``allow``, which a variant's
    reader handles); return warnings for what it reads with a caveat."""
    config = source.config or {}
    where = source.where
    for flag, reason in _REFUSED_FLAGS.items():
        if flag not in allow and truthy(config.get(flag)):
            raise UnsupportedAdapterError(f"{reason} ({flag} is set)", path=where)
    for key in source.tensors:
        for marker, reason in _FOREIGN_TENSORS.items():
            if marker not in allow and (f".{marker}" in key or key.startswith(marker)):
                raise UnsupportedAdapterError(reason, path=source.weights_path, key=key)
    if config.get("megatron_config"):  # PEFT's Megatron layers save each rank's factors under the plain names
        return [
            "megatron_config: a tensor-parallel run saves each rank's LoRA factors under the same names; read as "
            "stored, which is the whole ΔW only for a file saved with tensor-parallel size 1"
        ]
    return []  # base-rewriting inits (PiSSA, OLoRA, …) are handled per layer: lora_init.apply_init


def _layer(
    source: AdapterSource, module: reader.Module, config: dict, config_has_r: bool, scaling: Scaling, origin: str
) -> Layer:
    tensors = source.tensors
    name = layer_name(module.stored)
    embedding = is_embedding(module)
    if "A" not in module.keys or "B" not in module.keys:
        have, missing = ("A", "B") if "A" in module.keys else ("B", "A")
        stored = module.keys.get(have) or module.keys.get("bias") or next(iter(module.keys.values()))
        partner = "lora_embedding_" + missing if embedding else f"lora_{missing}.weight"
        return reader.invalid_layer(name, f"{stored}: has no matching {diffusers_partner(stored) or partner}")
    a_key, b_key = module.keys["A"], module.keys["B"]
    a, b = tensors.get(a_key), tensors.get(b_key)
    bias = tensors.get(module.keys["bias"]) if "bias" in module.keys else None
    params = a.numel() + b.numel() + (bias.numel() if bias is not None else 0)

    def invalid(message: str) -> Layer:
        return reader.invalid_layer(name, message, params)

    problem = reader.nonfinite_among(((a_key, a), (b_key, b), (module.keys.get("bias"), bias)))
    if problem:
        return invalid(problem)
    a, b = lora_variants.bdlora_factors(config, name, a, b)  # BD-LoRA's compact block-diagonal factor
    if a.ndim < 2 or b.ndim < 2:
        bad_key, bad = (a_key, a) if a.ndim < 2 else (b_key, b)
        return invalid(f"{bad_key}: expected a matrix, found shape {list(bad.shape)}")
    rank = a.shape[0]
    if rank == 0:  # no scale to take (alpha/0) and nothing to analyse, as the kohya and LyCORIS readers say
        return invalid(f"{a_key}: rank 0 (an empty factor)")
    groups = lora_variants.conv_groups(tuple(a.shape), tuple(b.shape))
    if groups > 1:  # PEFT's LoRA on a grouped conv: its B is grouped too
        b = lora_variants.grouped_conv_b(b, groups)
    if b.shape[1] != rank:
        return invalid(f"{b_key}: rank mismatch: {a_key} has r={rank} rows but {b_key} has {b.shape[1]} columns")
    if a.ndim > 2 and any(d != 1 for d in b.shape[2:]):
        return invalid(f"{b_key}: a conv LoRA's B must be 1×…×1 in its kernel dims, found shape {list(b.shape)}")

    where = source.where
    config, relative = layer_config(config, name)  # a diffusers pipeline file: the layer's component's config
    relative = pattern_name(module.stored, relative)  # MultiheadAttention's out_proj: the attention module's r, α
    config_r = pattern_value(
        config.get("rank_pattern"), relative, config.get("r", rank), config_path=where, field="rank_pattern" + origin
    )
    if config_has_r and positive_integer(config_r, f"r of layer {name}", config_path=where) != rank:
        return invalid(f"{a_key}: the config gives r={config_r} for this layer but the tensor has {rank} rows")
    if "lora_alpha" in config:  # a config gives α: PEFT's and diffusers' rule (parse skipped any .alpha beside it)
        scale = layer_scale(config, relative, rank, config_path=where, origin=origin)
    else:  # none does: the module's .alpha (musubi-tuner, ComfyUI), else α = r, as the loaders apply them (kohya_scale)
        alpha_key, alpha = module.keys.get("alpha"), None
        if alpha_key is not None:
            alpha, problem = alpha_tensor(tensors.get(alpha_key), alpha_key)
            if problem:
                return invalid(problem)
        scale = scaling.scale(module.stored, alpha, rank, tuple(a.shape[2:]), "lora")

    left = b.reshape(b.shape[0], rank)
    right = a.reshape(rank, -1)
    if lora_variants.is_qalora(config) and a.ndim == 2 and not embedding:  # QA-LoRA pools its inputs: A·P
        right = lora_variants.qalora_right(config, right)
    if embedding:
        kind, shape = "embedding", (right.shape[1], left.shape[0])
    elif a.ndim > 2:  # a grouped conv's ΔW spans every input channel: no LoRA of the grouped layer can carry it
        kind, shape = f"conv{a.ndim - 2}d" + (lora_variants.GROUPED if groups > 1 else ""), (b.shape[0], *a.shape[1:])
    elif config.get("fan_in_fan_out"):
        kind, shape = "conv1d_gpt2", (right.shape[1], left.shape[0])
    else:
        kind, shape = "linear", (left.shape[0], right.shape[1])
    return Layer(name, FactoredUpdate(left, right, scale=scale), shape, params, kind=kind, bias_update=bias)


@dataclass
class Parsed:
    """A LoRA-style file read module by module: what variants (DoRA, training checkpoints) build on."""

    modules: list[tuple[reader.Module, Layer]]  # each module's stored keys with its s·B·A layer
    skipped: list[Skipped]
    config: dict  # the config that gave r and α (with --alpha applied)
    warnings: list[str]
    notes: list[str] = field(default_factory=list)


def parse(
    source: AdapterSource, options: ReadOptions, *, adapter: str | None = None, allow: frozenset[str] = frozenset()
) -> Parsed:
    """Every module's s·B·A of ``adapter`` (None: names stripped, as PEFT saves them); ``allow`` lifts the
    refusal of flags and tensors that the caller's variant handles (``use_dora``, ``lora_magnitude_vector``)."""
    warnings = _check_config(source, allow)
    modules, unused = _group(source.tensors.keys(), adapter)
    token_rule = (source.config or {}).get("trainable_token_indices") if "trainable_token_indices" in allow else None
    tokens, unused = lora_tokens.split(unused) if truthy(token_rule) else ({}, unused)
    base, notes = _replicated_base(source, options) if "layer_replication" in allow else (options.base, [])
    kasa = "kasa_config" in allow and (source.config or {}).get("kasa_config") is not None
    diagonals, unused = lora_kasa.split(unused) if kasa else ({}, unused)
    # VeLoRA's and MonteCLoRA's extra tensors act in training only (lora_variants.training_only)
    skipped, unused, variant_notes = lora_variants.training_only(unused, source.config)
    if options.alpha is not None:  # --alpha replaces every module's α, its own .alpha scalar too
        for module in modules.values():
            if "alpha" in module.keys:
                skipped.append(Skipped(module.keys.pop("alpha"), "a per-module α, replaced by --alpha", True))
    own_alpha = any("alpha" in module.keys for module in modules.values())
    scaling = kohya_scaling(source.tensors.metadata(), None)  # for modules whose α no config gives
    every_module = own_alpha or scaling.metadata_alpha is not None  # then kohya_scale says how they are read
    config, config_has_r, scale_warnings = alpha_config(
        source.config, source.tensors.metadata(), options.alpha, every_module=every_module
    )
    ignored, ignored_warning = _ignore_alphas(source, modules.values(), config)
    skipped += ignored
    plain, wrapped = lora_params.split(modules, config)  # LoRA on parameters (MoE experts): lora_params
    from_metadata = source.config is None and options.alpha is None
    origin = " (in the file's lora_adapter_metadata)" if from_metadata else ""
    layers = [(module, _layer(source, module, config, config_has_r, scaling, origin)) for module in plain.values()]
    grouped = {
        layer.name: lora_variants.conv_groups(*(tuple(source.tensors.shape(module.keys[part])) for part in "AB"))
        for module, layer in layers
        if layer.kind.endswith(lora_variants.GROUPED)
    }
    notes = notes + ([lora_variants.grouped_conv_note(grouped)] if grouped else [])
    if COMPONENTS in config or not (config or every_module):
        scaling.no_alpha.clear()  # said below (uncovered components) or above (alpha_config's "α is unknown")
    # PiSSA/OLoRA/… rewrote the base at init: the update against the original base (lora_init)
    inits = {layer.name: layer_config(config, layer.name)[0].get("init_lora_weights") for _, layer in layers}
    oriented, layout = orient([layer for _, layer in layers], base)  # Conv1D beside Linear targets
    init_layers, init_warnings = apply_init(oriented, inits, base)
    layers = [(module, layer) for (module, _), layer in zip(layers, init_layers, strict=True)]
    layers, kasa_warnings, unused_diagonals = lora_kasa.apply(layers, diagonals, source.tensors, base)
    unused += unused_diagonals
    expert_layers, expert_notes = lora_params.read_wrapped(source, wrapped, config, base)
    layers += expert_layers + _token_layers(source, tokens, token_rule, options, {layer.name for _, layer in layers})
    mha = double_applied_warning([module.stored for module in plain.values()], source.config)
    warnings += init_warnings + kasa_warnings + ([mha] if mha else []) + ([layout] if layout else [])
    unused = trained_bias_changes([layer for _, layer in layers], unused, source.tensors, base, config)
    uncovered = uncovered_components(config, [layer.name for module, layer in layers if "alpha" not in module.keys])
    if own_alpha and scaling.no_alpha and options.alpha is None:
        stored = [alpha_tensor(source.tensors.get(m.keys["alpha"]), m.keys["alpha"])[0] for m in plain.values()
                  if "alpha" in m.keys]  # fmt: skip
        warnings.append(partial_alphas_warning([v for v in stored if v is not None], scaling.no_alpha))
        scaling.no_alpha.clear()
    return Parsed(
        modules=layers,
        skipped=skipped
        + reader.skipped_keys(unused, lambda key: skip_reason(key, config, "LoRA"))
        + reader.second_spellings(modules.values()),
        config=config,
        warnings=warnings + scale_warnings + ignored_warning + ([uncovered] if uncovered else []) + scaling.warnings(),
        notes=notes + expert_notes + variant_notes,
    )


def _replicated_base(source: AdapterSource, options: ReadOptions):
    """(the base as the layers of a ``layer_replication`` model see it, its note); the base itself without one."""
    rule = (source.config or {}).get("layer_replication")
    if not truthy(rule):
        return options.base, []
    copies = lora_replication.sources(rule, source.where)
    base = lora_replication.ReplicatedBase(options.base, copies) if options.base is not None else None
    return base, [lora_replication.note(copies)]


def _token_layers(source: AdapterSource, tokens: dict, rule: object, options: ReadOptions, lora_names: set):
    """The embedding rows ``trainable_token_indices`` trains (:mod:`.common.lora_tokens`), beside the LoRA layers."""
    found = lora_tokens.token_modules(tokens, source.tensors, rule, options.base)
    clash = next((layer.name for _, layer in found if layer.name in lora_names), None)
    if clash is not None:
        raise UnsupportedAdapterError(
            f"{clash} has both LoRA factors and trainable token rows: not read", path=source.where
        )
    return found


def _ignore_alphas(source: AdapterSource, modules, config: dict) -> tuple[list[Skipped], list[str]]:
    """Take the ``.alpha`` tensor off every module whose α a config gives: PEFT and diffusers then never read it
    (a ComfyUI-converted file may carry both); skipped as expected, said once."""
    keys = [
        module.keys.pop("alpha")
        for module in modules
        if "alpha" in module.keys and "lora_alpha" in layer_config(config, layer_name(module.stored))[0]
    ]
    if not keys:
        return [], []
    where = "adapter_config.json" if source.config is not None else "the file's lora_adapter_metadata"
    reason = f"a per-module α, ignored: {where} gives α (as PEFT and diffusers load the file)"
    warning = (
        f"{len(keys)} .alpha tensor(s) ignored: {where} gives α, and PEFT and diffusers read only that ({keys[0]} …)"
    )
    return [Skipped(key, reason, True) for key in keys], [warning]


# what plain LoRA reads that its variants (DoRA, training checkpoints) still refuse
_PLAIN_ONLY = frozenset({"layer_replication", "trainable_token_indices", "use_qalora", "use_bdlora", "kasa_config"})


def read(source: AdapterSource, options: ReadOptions) -> Checkpoint:
    return parsed_checkpoint(source, parse(source, options, allow=_PLAIN_ONLY))


def parsed_checkpoint(source: AdapterSource, parsed: Parsed, adapter_type: str | None = None) -> Checkpoint:
    """The checkpoint of a parsed LoRA file (``adapter_type`` "LORA", or "RSLORA" under ``use_rslora``)."""
    rslora = any_config(parsed.config, "use_rslora")
    return reader.build_checkpoint(
        source,
        family="lora",
        adapter_type=adapter_type or ("RSLORA" if rslora else "LORA"),
        layers=[layer for _, layer in parsed.modules],
        skipped=parsed.skipped,
        warnings=parsed.warnings,
        notes=parsed.notes,
    )


register_format(
    Format(
        "lora",
        "PEFT LoRA / rsLoRA (Linear, Conv1D, Embedding, Conv; MoE expert parameters: target_parameters)",
        detect,
        read,
        priority=100,
        needs="nothing (--base for PiSSA/OLoRA, KaSA, trainable_token_indices)",
        spectrum="factored",
    )
)
