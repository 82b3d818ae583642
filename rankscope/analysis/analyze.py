"""From a checkpoint to per-layer analysis records: :func:`analyze`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch

from ..core.checkpoint import Checkpoint, Layer
from ..core.dense import resolve_device
from ..core.errors import CheckpointError
from ..core.formed import weighted_sum
from ..core.lowrank import OVERSAMPLING, TruncatedSpectrum, truncated_singular_values
from ..core.naming import module_types
from ..core.spectrum import DENSE_DTYPES, singular_values
from ..core.threads import thread_policy
from ..core.units import byte_size
from ..core.update import DenseUpdate, Update
from ..measures import metrics as M
from ..measures.components import composition_fields, pairwise_alignments, weight_fields
from .against_base import measure_against_base
from .options import AnalysisOptions
from .records import Analysis, LayerRecord


def _invalid_record(layer: Layer, error: str) -> LayerRecord:
    return LayerRecord(
        name=layer.name,
        family=layer.family,
        kind=layer.kind,
        shape=list(layer.shape),
        matrix_shape=list(layer.update.shape) if layer.update is not None else [],
        rank_bound=layer.update.rank_bound if layer.update is not None else 0,
        params=layer.params,
        scale=layer.scale,
        exact=False,
        valid=False,
        error=error,
        singular_values=[],
        metrics=None,
    )


def _record(
    layer: Layer, sigma: torch.Tensor, exact: bool, options: AnalysisOptions, metrics: dict | None = None
) -> LayerRecord:
    """The record of an analysed layer; ``metrics`` where they were computed already (in a batch), else here."""
    update = layer.update
    assert update is not None
    if metrics is None and not _finite(sigma):  # batched metrics exist only for finite spectra
        return _invalid_record(layer, "the singular values are not finite (the factors overflow in float64)")
    bias = None
    if layer.bias_update is not None:
        # lora_B.bias is applied with the layer's scale, like B·A; a diff_b beside LoRA factors is not
        scaled = layer.bias_scaled and not options.unscaled and layer.scale is not None
        bias_scale = layer.scale if scaled else 1.0
        # the norm in float64, like the singular values (a float32 norm is off by ~1e-8 relative)
        norm = float(layer.bias_update.double().norm())
        bias = {"size": int(layer.bias_update.numel()), "norm": norm * bias_scale}
    if metrics is None:
        metrics = M.spectrum_metrics(
            sigma,
            update.shape,
            update.rank_bound,
            thresholds=options.thresholds,
            energies=options.energies,
            rel_thresholds=options.rel_thresholds,
        )
    return LayerRecord(
        name=layer.name,
        family=layer.family,
        kind=layer.kind,
        shape=list(layer.shape),
        matrix_shape=list(update.shape),
        rank_bound=update.rank_bound,
        params=layer.params,
        scale=layer.scale,
        exact=exact and layer.exact,
        valid=True,
        error=None,
        singular_values=sigma.tolist(),
        metrics=metrics,
        bias_update=bias,
    )


def _finite(sigma: torch.Tensor) -> bool:
    return bool(torch.isfinite(sigma).all())


def _batched_metrics(updates: list[Update], sigmas: list[torch.Tensor], options: AnalysisOptions) -> list[dict | None]:
    """The metrics of every finite spectrum, computed together (``metrics.spectrum_metrics_batch``); None for the
    others, whose records are invalid."""
    everything_finite = not sigmas or _finite(torch.cat([sigma.reshape(-1) for sigma in sigmas]))
    finite = list(range(len(sigmas))) if everything_finite else [i for i, s in enumerate(sigmas) if _finite(s)]
    computed = M.spectrum_metrics_batch(
        [sigmas[i] for i in finite],
        [updates[i].shape for i in finite],
        [updates[i].rank_bound for i in finite],
        thresholds=options.thresholds,
        energies=options.energies,
        rel_thresholds=options.rel_thresholds,
    )
    metrics: list[dict | None] = [None] * len(sigmas)
    for i, values in zip(finite, computed, strict=True):
        metrics[i] = values
    return metrics


def _analysed_update(layer: Layer, options: AnalysisOptions) -> Update:
    assert layer.update is not None
    return layer.update.unscaled() if options.unscaled else layer.update


def _dense_refusal(layer: Layer, options: AnalysisOptions) -> str | None:
    """Why a layer is not materialised: its dense SVD would need more than ``max_memory`` bytes (the matrix and
    about twice as much workspace), which would get the process killed rather than give an answer."""
    update = layer.update
    if update is None or options.max_memory is None or not (options.dense or isinstance(update, DenseUpdate)):
        return None
    m, n = update.shape
    itemsize = 8 if options.dense_dtype == "float64" else 4
    needed = 3 * itemsize * m * n
    if needed <= options.max_memory:
        return None
    return (
        f"the dense {m}×{n} update needs about {byte_size(needed)} to decompose in "
        f"{options.dense_dtype}, above --max-memory {byte_size(options.max_memory)}"
    )


def _batch_budget(options: AnalysisOptions) -> int:
    """Bytes of work per batch: the memory budget, within ``max_memory`` where that is smaller."""
    if options.max_memory is None:
        return options.memory_budget
    return min(options.memory_budget, options.max_memory)


def _truncated(updates: list[Update], options: AnalysisOptions, step: Callable[[int], None]) -> dict[int, tuple]:
    """``--top-k``: position → (σ̃, metrics, spectrum) for each dense-path update wider than K + oversampling
    (a narrower one is decomposed exactly); metrics None where ΔW is not finite (the record is then invalid)."""
    k = options.top_k
    if k is None:
        return {}
    chosen = [
        i
        for i, update in enumerate(updates)
        if (options.dense or isinstance(update, DenseUpdate)) and min(update.shape) > k + OVERSAMPLING
    ]
    spectra = truncated_singular_values(
        [updates[i] for i in chosen],
        k,
        dtype=DENSE_DTYPES[options.dense_dtype],
        device=resolve_device(options.device),
        memory_budget=_batch_budget(options),
        progress=step,
    )
    return {i: (s.values, _truncated_metrics(s, options), s) for i, s in zip(chosen, spectra, strict=True)}


def _truncated_metrics(spectrum: TruncatedSpectrum, options: AnalysisOptions) -> dict | None:
    if not _finite(spectrum.values):
        return None
    return M.truncated_metrics(
        spectrum.energy,
        spectrum.fourth_moment,
        spectrum.sigma_max,
        thresholds=options.thresholds,
        energies=options.energies,
        rel_thresholds=options.rel_thresholds,
    )


def _growth_updates(layers: list[Layer], options: AnalysisOptions) -> dict[tuple[int, int], Update]:
    """For sequential compositions, Σ_{i<t} w_i·ΔW_i after each round t = 1..k (the growth curve)."""
    partial: dict[tuple[int, int], Update] = {}
    for layer in layers:
        composition, components = layer.composition, layer.components or []
        if composition is None or composition.mode != "sequential" or any(c.update is None for c in components):
            continue
        parts = [_analysed_update(c, options) for c in components]
        for t in range(1, len(parts) + 1):
            partial[(id(layer), t)] = weighted_sum(parts[:t], composition.weights[:t])
    return partial


def _alignments(layers: list[Layer], refused: dict[int, str], options: AnalysisOptions) -> dict[int, dict]:
    """The pairwise alignment of the components of every layer (at any depth) that has them all, keyed by id:
    in one batch, so a model's compositions cost a few batched factorisations rather than a dozen ops a layer."""
    chosen: list[Layer] = []

    # recursive helpers take themselves as an argument: a closure naming itself is a reference cycle (its cell),
    # which would hold what it closes over until a full collection of the cyclic collector (core.threads)
    def collect(layer: Layer, again: Callable[[Layer, Callable], None]) -> None:
        if layer.update is None or id(layer) in refused or layer.components is None:
            return
        for component in layer.components:
            again(component, again)
        if all(c.update is not None for c in layer.components):
            chosen.append(layer)

    for layer in layers:
        collect(layer, collect)
    parts = [[_analysed_update(c, options) for c in layer.components or ()] for layer in chosen]
    found = pairwise_alignments([(p, _analysed_update(layer, options)) for p, layer in zip(parts, chosen, strict=True)])
    return {id(layer): matrices for layer, matrices in zip(chosen, found, strict=True)}


def _metrics_with_bound(record: LayerRecord) -> dict:
    return {**(record.metrics or {}), "rank_bound": record.rank_bound}


def _composition(layer: Layer, record: LayerRecord, growth: dict, options: AnalysisOptions) -> dict:
    composition = layer.composition
    assert composition is not None and record.components is not None
    fields = {
        "weights": weight_fields(
            composition.raw_weights, composition.weights, normalize=composition.normalize, mode=composition.mode
        ),
        **composition_fields(
            _metrics_with_bound(record),
            [_metrics_with_bound(c) for c in record.components],
            composition.weights,
            collapse_threshold=options.collapse_threshold,
        ),
    }
    if composition.mode == "sequential":
        fields["growth"] = []
        for t in range(1, len(record.components) + 1):
            sigma = growth[(id(layer), t)]
            bound = min(sum(c.rank_bound for c in record.components[:t]), *record.matrix_shape)
            metrics = M.spectrum_metrics(
                sigma,
                record.matrix_shape,
                bound,
                thresholds=options.thresholds,
                energies=options.energies,
                rel_thresholds=options.rel_thresholds,
            )
            fields["growth"].append({"components": t, "rank_bound": bound, "metrics": metrics})
    return fields


def analyze(
    checkpoint: Checkpoint,
    options: AnalysisOptions | None = None,
    *,
    progress: Callable[[int, int], None] | None = None,
    threads: int | None = None,
    **overrides,
) -> Analysis:
    """Spectra and metrics of every layer of ``checkpoint``.

    ``options`` (or keyword overrides of its fields: ``analyze(ckpt, thresholds=(0.01,), unscaled=True)``)
    say how; ``progress(done, total)`` is called as layers finish. ``threads=1`` runs the work under
    :func:`rankscope.single_threaded` (faster on a busy machine, but process-wide while it runs: see
    ``core.threads``); the default changes no thread setting.
    """
    options = options or AnalysisOptions()
    if overrides:
        options = replace(options, **overrides)
    with thread_policy(threads):
        return _analyze(checkpoint, options, progress)


def _analyze(checkpoint: Checkpoint, options: AnalysisOptions, progress: Callable[[int, int], None] | None) -> Analysis:
    selected = checkpoint.select(options.layers)
    if not selected.layers:
        raise CheckpointError(
            f"layers {options.layers!r} matches no layer name", path=checkpoint.path, argument="layers"
        )
    units = [unit for layer in selected.layers for unit in (layer, *(layer.components or ())) if unit.update]
    refused = {id(unit): message for unit in units if (message := _dense_refusal(unit, options))}
    units = [unit for unit in units if id(unit) not in refused]
    updates = [_analysed_update(unit, options) for unit in units]
    growth = _growth_updates(selected.layers, options)
    growth_keys = list(growth)
    done = [0]

    def step(count: int) -> None:
        done[0] += count
        if progress:
            progress(done[0], len(updates) + len(growth))

    truncated = _truncated(updates, options, step)
    plain = [i for i in range(len(updates)) if i not in truncated]
    sigmas, exact = singular_values(
        [updates[i] for i in plain] + [growth[key] for key in growth_keys],
        dense=options.dense,
        dense_dtype=options.dense_dtype,
        device=options.device,
        memory_budget=_batch_budget(options),
        progress=step,
    )
    metrics = _batched_metrics([updates[i] for i in plain], sigmas[: len(plain)], options)
    computed = {id(units[i]): (s, e, m) for i, s, e, m in zip(plain, sigmas, exact, metrics, strict=False)}
    computed.update({id(units[i]): (values, False, found) for i, (values, found, _) in truncated.items()})
    spectra = {id(units[i]): spectrum for i, (_, _, spectrum) in truncated.items()}
    growth_sigmas = dict(zip(growth_keys, sigmas[len(plain) :], strict=True))

    alignments = _alignments(selected.layers, refused, options)

    def build(layer: Layer, again: Callable[[Layer, Callable], LayerRecord]) -> LayerRecord:  # again: build (no cycle)
        if layer.update is None or id(layer) in refused:
            return _invalid_record(layer, layer.error or refused.get(id(layer)) or "cannot be analysed")
        sigma, exact_values, metrics_values = computed[id(layer)]
        record = _record(layer, sigma, exact_values, options, metrics_values)
        if id(layer) in spectra and record.valid:
            record.truncated = spectra[id(layer)].to_dict()
        if layer.components is not None:
            record.components = [again(component, again) for component in layer.components]
            if all(c.update is not None for c in layer.components):
                record.alignment = alignments[id(layer)]
        if layer.composition is not None and record.components and all(c.valid for c in record.components):
            record.composition = _composition(layer, record, growth_sigmas, options)
        return record

    records = [build(layer, build) for layer in selected.layers]
    # types decided over all of the checkpoint's layers: selecting some (options.layers) does not rename them
    types = module_types(layer.name for layer in checkpoint.layers)
    for record in records:
        record.module_type = types[record.name]
    warnings = []
    if options.unscaled:
        fixed = [u.name for u in units if u.update.scalar_scale is not None and u.update.unscaled() is u.update]
        if fixed:
            warnings.append(
                f"--unscaled does not apply to {len(fixed)} layer(s) whose update is not proportional to α/r "
                f"(DoRA: e.g. {fixed[0]}): they are analysed as the model applies them"
            )
    uncertified = [units[i].name for i, (_, _, spectrum) in truncated.items() if not spectrum.certified]
    if uncertified:
        warnings.append(
            f"--top-k {options.top_k}: no certificate for {len(uncertified)} layer(s) (e.g. {uncertified[0]}): the "
            f"energy the top {options.top_k} σ leave out is above σ̃_{options.top_k}², so a larger singular value may "
            "have been missed (residual_energy under 'truncated' in --json; raise --top-k)"
        )
    base_warnings, base_notes = [], []
    if options.base_measures:
        base_warnings, base_notes = measure_against_base(selected, selected.layers, records, options)
    return Analysis(selected, options, records, warnings + base_warnings, base_notes)


__all__ = ["analyze"]
