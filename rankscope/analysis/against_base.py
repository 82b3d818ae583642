"""Each analysed layer measured against its base weight W₀ (``--base``): the record's ``base`` object.

The mathematics is in :mod:`..measures.base_relative`; here W₀ is read (``Checkpoint.base``, the
:class:`~..core.base.BaseWeights` a reader was given), ΔW's singular vectors found (exact from the factors where
there are factors, ``core.spectrum.singular_vectors``; a dense SVD otherwise) and W₀'s decompositions taken from
the on-disk cache (:mod:`..core.svd_cache`) or computed and stored there. A bitsandbytes base (QLoRA) is W₀ as
bitsandbytes dequantises it (``core.quantised``); a GPTQ/AWQ base is refused in one line, and so is a base
weight that is there but unreadable (only an absent one is "missing", a warning). Everything is in float64,
of ΔW as the model applies it (α/r included, also under ``unscaled``), on the analysed out×in matrix
(``core.base.as_matrix``).

Intruder dimensions need W₀'s left singular vectors (a dense SVD, cached on disk: once per base) and the top
``intruder_k`` left singular vectors of W₀ + ΔW; a dense update's amplification the top-k singular vectors of ΔW.
Those top vectors come from the smaller Gram (:mod:`..core.top_vectors`: one GEMM and an eigensolver stopped at
the top k, a fraction of one ``svdvals``), with the dense SVD where the Gram would be less exact than it; ‖ΔW‖_F,
σ₁ and the numerical rank of a dense ΔW are the spectrum's own (the record's σ, where it is the exact float64
spectrum of ΔW as applied), and ΔW is materialised once. By default both are computed where min(m, n) ≤
:data:`DENSE_VECTORS_CPU_LIMIT` on the CPU, and for every layer on CUDA. Above that limit on the CPU neither is
(``--intruders`` computes both); σ₁ of such a W₀ comes from ARPACK's Lanczos iteration (scipy), converged to
rounding (and of ΔW too where the spectrum's σ is not the exact one).
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from ..core.base import BaseWeights, as_matrix
from ..core.checkpoint import Checkpoint, Layer, listed
from ..core.dense import resolve_device
from ..core.errors import CheckpointError
from ..core.spectrum import singular_vectors
from ..core.svd_cache import CacheKey, SVDCache
from ..core.threads import all_threads, import_limited
from ..core.top_vectors import top_singular_triplets
from ..core.update import FactoredUpdate, KroneckerUpdate, Update
from ..measures import base_relative as BR
from ..measures.metrics import numerical_rank, rank_threshold
from .options import AnalysisOptions
from .records import LayerRecord

DENSE_VECTORS_CPU_LIMIT = 2048  # a 2048² float64 SVD with vectors takes about a second on two cores


# what happened across the layers ("absent": no weight of the layer's name; "missing": one of another shape;
# "refused", "no_intruders", "no_amplification") → the layers' names, for one warning or note each
_Outcome = defaultdict[str, list[str]]
_OUTCOMES = ("absent", "missing", "refused", "no_intruders", "no_amplification")


def measure_against_base(
    checkpoint: Checkpoint, layers: list[Layer], records: list[LayerRecord], options: AnalysisOptions
) -> tuple[list[str], list[str]]:
    """Fill ``record.base`` of every valid record whose layer has a base weight; (warnings, notes)."""
    base = checkpoint.base
    if base is None:
        return [], []
    device = resolve_device(options.device)
    cache = SVDCache()
    outcome: _Outcome = defaultdict(list)
    for layer, record in zip(layers, records, strict=True):
        if record.valid and layer.update is not None:
            record.base = _layer_fields(layer, record, base, options, device, cache, outcome)
    warnings, notes = _messages(outcome, options)
    if base.dequantised:
        notes.append(_quantised_note(base, layers))
    return warnings, notes


def _quantised_note(base: BaseWeights, layers: list[Layer]) -> str:
    """What W₀ is when bitsandbytes stored it: for an adapter the weight it was trained against; for a full
    fine-tune (read as ΔW = W − dequant(W₀), warned by formats.full_delta) not the weight it started from."""
    formats = ", ".join(sorted(set(base.dequantised.values())))
    head = f"the base is quantised ({formats}): W₀ is its dequantisation, as bitsandbytes computes it"
    full = [layer.name for layer in layers if layer.family == "full-delta"]
    if not full:
        return f"{head} (the weight the adapter was trained against)"
    adapters = " (for the adapter layers, the weight they were trained against)" if len(full) < len(layers) else ""
    return (
        f"{head}{adapters}; a full fine-tune was not trained on it (bitsandbytes weights are frozen), so its "
        "ΔW = W − dequant(W₀) and its 'base' metrics include the quantisation error"
    )


def _layer_fields(
    layer: Layer,
    record: LayerRecord,
    base: BaseWeights,
    options: AnalysisOptions,
    device: torch.device,
    cache: SVDCache,
    outcome: _Outcome,
) -> dict | None:
    update = layer.update
    assert update is not None
    m, n = update.shape
    if options.max_memory is not None and 3 * 8 * m * n > options.max_memory:
        outcome["refused"].append(layer.name)  # W₀, W₀ + ΔW and the SVD's workspace in float64
        return None
    # only an absent weight is "missing"; one that is there but cannot be read (a corrupt or unsupported
    # bitsandbytes layout, a bad quant_state) raises its own one-line error, as every other reader of the base does
    found = _base_tensor(base, layer)
    if found is None:
        base.refuse_quantised(layer.name)  # a GPTQ/AWQ base: one line naming the format, not a missing weight
        outcome["absent"].append(layer.name)
        return None
    if isinstance(found, str):  # a stacked expert parameter that holds no slice of this index
        outcome["missing"].append(f"{layer.name} ({found})")
        return None
    file, key, stored = found
    weight = as_matrix(stored, layer.kind).to(torch.float64)
    if tuple(weight.shape) != (m, n):
        outcome["missing"].append(f"{layer.name} (base {list(weight.shape)}, update {[m, n]})")
        return None
    cheap = device.type == "cuda" or min(m, n) <= DENSE_VECTORS_CPU_LIMIT
    dense_allowed = cheap or options.intruders is True
    want_intruders = options.intruders if options.intruders is not None else cheap
    spectrum = _record_spectrum(layer, record, options)

    delta: torch.Tensor | None = None  # ΔW materialised once, for the amplification and W₀ + ΔW alike
    if isinstance(update, (FactoredUpdate, KroneckerUpdate)):
        left, sigma, right = singular_vectors(update)  # exact from the factors
        delta_frobenius, delta_sigma_max = float(sigma.norm()), float(sigma[0]) if sigma.numel() else 0.0
        k = BR.amplification_rank(numerical_rank(sigma, (m, n)), update.rank_bound, (m, n), options.amplification_k)
        amplification = BR.amplification(weight, left[:, :k], right[:, :k], delta_frobenius)
    elif dense_allowed:
        delta = update.materialize(torch.float64, device)
        k, left, right, delta_frobenius, delta_sigma_max = _dense_delta_vectors(delta, update, spectrum, options)
        amplification = BR.amplification(weight, left, right, delta_frobenius)
    else:
        if spectrum is not None:  # the spectrum's own σ: no second decomposition
            delta_frobenius, delta_sigma_max = float(spectrum.norm()), float(spectrum[0]) if spectrum.numel() else 0.0
        else:
            delta = update.materialize(torch.float64, "cpu")
            delta_frobenius, delta_sigma_max = float(delta.norm()), _sigma_max(delta)
        k, amplification = 0, None
        outcome["no_amplification"].append(layer.name)

    what = f"{layer.kind}:{'svd' if want_intruders else 'sigma_max'}"
    cache_key = CacheKey.of(file, key, stored.dtype, what)
    decomposition = cache.cached(cache_key, lambda: _base_decomposition(weight, want_intruders, device))
    intruders = None
    if want_intruders:
        top_k = min(options.intruder_k, m, n)
        if delta is None or delta.device != device:
            delta = update.materialize(torch.float64, device)
        merged = weight.to(device) + delta  # not in place: a reader's materialize may return a tensor it keeps
        # only the top intruder_k left vectors, each on its own (core.top_vectors: the Gram's where as exact as the SVD)
        merged_left = top_singular_triplets(merged, top_k, per_vector=True).left
        indices = BR.intruder_dimensions(decomposition["left"], merged_left, top_k, options.intruder_epsilon)
        intruders = {"top_k": top_k, "epsilon": options.intruder_epsilon, "count": len(indices), "indices": indices}
    else:
        outcome["no_intruders"].append(layer.name)
    return BR.base_fields(
        weight_frobenius=float(weight.norm()),
        weight_sigma_max=float(decomposition["values"][0]),
        delta_frobenius=delta_frobenius,
        delta_sigma_max=delta_sigma_max,
        amplification_value=amplification,
        amplification_k=k,
        intruders=intruders,
    )


# an MoE expert slice (formats/common/lora_params): ``<module>.<parameter>[<e>]``, its base the 3-D parameter's slice
_EXPERT_SLICE = re.compile(r"^(?P<module>.+)\.(?P<parameter>[^.\[]+)\[(?P<index>\d+)\]$")


def _base_tensor(base: BaseWeights, layer: Layer) -> tuple[Path, str, torch.Tensor] | str | None:
    """(file, key, stored tensor) of ``layer``'s base weight; an expert slice ``p[e]`` is ``base[p][e]``. None where
    the base has no such tensor, a reason where a stacked parameter has no slice ``e``; a tensor that is there but
    unreadable raises (CheckpointError)."""
    match = _EXPERT_SLICE.match(layer.name) if layer.kind in ("expert", "expert_transposed") else None
    if match is None:
        if base.key_for(layer.name) is None:
            return None
        file, key = base.location(layer.name)
        return file, key, base.get(layer.name)
    module, parameter, index = match["module"], match["parameter"], int(match["index"])
    if base.key_for(module, parameter) is None:  # saved in the per-expert layout (transformers' save conversion)
        return _legacy_expert(base, module, parameter, index)
    file, key = base.location(module, parameter)
    stacked = base.get(module, parameter)
    if stacked.ndim != 3 or index >= stacked.shape[0]:
        return f"base {key} has shape {list(stacked.shape)}, not E stacked experts"
    return file, f"{key}[{index}]", stacked[index]


# transformers (v5) saves fused MoE experts in the older per-expert layout: parameter → its Linear weights, in
# order (gate_up_proj = cat(gate, up) along the rows), as Qwen-MoE and Mixtral (block_sparse_moe, w1/w3/w2) name them
_LEGACY_EXPERTS = {"gate_up_proj": (("gate_proj", "up_proj"), ("w1", "w3")), "down_proj": (("down_proj",), ("w2",))}


def _legacy_expert(base: BaseWeights, module: str, parameter: str, index: int) -> tuple[Path, str, torch.Tensor] | None:
    """Expert ``index`` of ``module.parameter`` from per-expert Linear weights; None where none are there."""
    mixtral = module.replace(".mlp.experts", ".block_sparse_moe.experts")
    for owner, names in zip((module, mixtral), _LEGACY_EXPERTS.get(parameter, ()), strict=False):
        layers = [f"{owner}.{index}.{name}" for name in names]
        if all(base.key_for(layer) is not None for layer in layers):
            file, key = base.location(layers[0])
            return file, key, torch.cat([base.get(layer) for layer in layers], dim=0)
    return None


def _record_spectrum(layer: Layer, record: LayerRecord, options: AnalysisOptions) -> torch.Tensor | None:
    """All float64 singular values of ΔW as the model applies it, from the spectrum ``record`` holds, where it is
    that: exact (factored, or dense in float64), not truncated (``--top-k``), of the scaled update (not
    ``--unscaled``, unless unscaling changes nothing). None otherwise."""
    update = layer.update
    assert update is not None
    if not record.exact or record.truncated is not None or record.singular_values is None:
        return None
    if options.unscaled and update.unscaled() is not update:
        return None
    sigma = torch.tensor(record.singular_values, dtype=torch.float64)
    return sigma if sigma.numel() == min(update.shape) and bool(torch.isfinite(sigma).all()) else None


def _dense_delta_vectors(
    delta: torch.Tensor, update: Update, spectrum: torch.Tensor | None, options: AnalysisOptions
) -> tuple[int, torch.Tensor, torch.Tensor, float, float]:
    """(k, U_k, V_k, ‖ΔW‖_F, σ₁) of a materialised dense ΔW, for the amplification factor.

    Only the span of the top k is used, so ``core.top_vectors`` finds it from ΔW's Gram where that is as exact as
    the dense SVD. k needs ΔW's numerical rank: from the spectrum's σ where given (exact); else from the Gram's top
    values where σ_k is clearly above the rank threshold σ₁·max(m, n)·eps(float32) (the Gram's σ_k is then
    accurate to ≪ 1e-3 relative); where it is not, one dense SVD gives σ and vectors exactly, as before."""
    m, n = delta.shape
    if spectrum is not None:
        k = BR.amplification_rank(numerical_rank(spectrum, (m, n)), update.rank_bound, (m, n), options.amplification_k)
        triplets = top_singular_triplets(delta, k, spectrum=spectrum)
        top = float(spectrum[0]) if spectrum.numel() else 0.0
        return k, triplets.left, triplets.right, float(spectrum.norm()), top
    frobenius = float(delta.norm())
    # k = min(numerical rank, cap) = #{i ≤ cap: σ_i > threshold}: only the top cap σ are needed
    cap = BR.amplification_rank(min(m, n), update.rank_bound, (m, n), options.amplification_k)
    triplets = top_singular_triplets(delta, cap)
    top = float(triplets.sigma[0]) if triplets.sigma.numel() else 0.0
    if triplets.method == "gram" and cap and float(triplets.sigma[cap - 1]) <= 2 * rank_threshold(top, (m, n)):
        triplets = top_singular_triplets(delta, cap, exact=True)  # near the rank threshold: exact σ and vectors
    k = numerical_rank(triplets.sigma, (m, n))  # of the top cap σ: min(numerical rank, cap)
    return k, triplets.left[:, :k], triplets.right[:, :k], frobenius, top


def _base_decomposition(weight: torch.Tensor, vectors: bool, device: torch.device) -> dict[str, torch.Tensor]:
    """W₀'s σ and left singular vectors (``vectors``), else its σ₁ alone: what the cache stores."""
    if vectors:
        with all_threads(weight.numel()):
            u, sigma, _ = torch.linalg.svd(weight.to(device), full_matrices=False)
        return {"values": sigma.cpu(), "left": u.cpu()}
    if device.type == "cuda" or min(weight.shape) <= DENSE_VECTORS_CPU_LIMIT:
        with all_threads(weight.numel()):
            return {"values": torch.linalg.svdvals(weight.to(device))[:1].cpu()}
    return {"values": torch.tensor([_sigma_max(weight)], dtype=torch.float64)}


def _sigma_max(matrix: torch.Tensor) -> float:
    """σ₁ of a matrix: exact for small ones, ARPACK (Lanczos, tol=0: to rounding) for large ones."""
    if min(matrix.shape) <= DENSE_VECTORS_CPU_LIMIT:
        with all_threads(matrix.numel()):
            values = torch.linalg.svdvals(matrix)
        return float(values[0]) if values.numel() else 0.0
    svds = import_limited("scipy.sparse.linalg").svds

    start = np.random.default_rng(0).standard_normal(min(matrix.shape))
    with all_threads(blas=True):  # a large matrix: ARPACK's products on every BLAS thread
        values = svds(matrix.numpy(), k=1, tol=0, v0=start, return_singular_vectors=False)
    return float(values[0])


def weight_spectrum(checkpoint: Checkpoint, name: str, *, device: str = "auto") -> torch.Tensor:
    """All singular values of layer ``name``'s base weight W₀ (float64, the analysed matrix), from the cache where
    an intruder analysis stored them, else computed (what ``figures.base.base_spectrum_figure`` draws)."""
    base = checkpoint.base
    layer = next((layer for layer in checkpoint.layers if layer.name == name), None)
    if base is None or layer is None:
        raise CheckpointError(f"no base weight for layer {name!r} (give base, and a layer of this checkpoint)")
    file, key = base.location(name)
    stored = base.get(name)
    weight = as_matrix(stored, layer.kind).to(torch.float64)
    cache = SVDCache()
    found = cache.load(CacheKey.of(file, key, stored.dtype, f"{layer.kind}:svd"))
    if found is not None:
        return found["values"]
    with all_threads(weight.numel()):
        return torch.linalg.svdvals(weight.to(resolve_device(device))).cpu()


def _messages(outcome: _Outcome, options: AnalysisOptions) -> tuple[list[str], list[str]]:
    warnings, notes = [], []
    absent, missing, refused, no_intruders, no_amplification = (outcome[what] for what in _OUTCOMES)
    if absent:
        warnings.append(
            f"--base holds no weight of the name of {listed(absent, counted='layer(s)')} (is --base the model "
            "the adapter was trained on, in the layout its names follow?): no 'base' metrics for them"
        )
    if missing:
        warnings.append(
            f"--base has no weight of the update's shape for {listed(missing, counted='layer(s)')}: no "
            "'base' metrics for them"
        )
    if refused:
        warnings.append(
            f"the base weights of {listed(refused, counted='layer(s)')} need more than --max-memory in "
            "float64: no 'base' metrics for them"
        )
    if no_intruders and options.intruders is None:
        notes.append(
            f"intruder dimensions not computed for {listed(no_intruders, counted='layer(s)')} with "
            f"min(m, n) > {DENSE_VECTORS_CPU_LIMIT} on the CPU (two dense SVDs with vectors each; 'intruders' is "
            "null): --intruders computes them"
        )
    if no_amplification:
        notes.append(
            f"amplification not computed for the dense update(s) of "
            f"{listed(no_amplification, counted='layer(s)')} (a dense SVD with vectors of each, above "
            f"min(m, n) = {DENSE_VECTORS_CPU_LIMIT} on the CPU): --intruders computes it"
        )
    if options.unscaled:
        notes.append("the 'base' metrics measure ΔW as the model applies it (α/r included), also under --unscaled")
    return warnings, notes


__all__ = ["DENSE_VECTORS_CPU_LIMIT", "measure_against_base", "weight_spectrum"]
