"""From a checkpoint to per-layer analysis records (and a checkpoint summary)."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

import torch

from ..core.checkpoint import Checkpoint, Layer
from ..core.errors import CheckpointError, RankscopeError, UsageProblem
from ..core.naming import layer_index, module_type
from ..core.spectrum import DEFAULT_MEMORY_BUDGET, single_threaded_ops, singular_values
from ..core.update import DenseUpdate, Update, weighted_sum
from ..measures import metrics as M
from ..measures.components import composition_fields, off_diagonal_mean, pairwise_alignment, weight_fields


def default_max_memory() -> int | None:
    """Half of the machine's physical memory (None where the platform does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (ValueError, OSError, AttributeError):
        return None


@dataclass(frozen=True)
class AnalysisOptions:
    """How to analyse: metric parameters, scaling, the dense path and a layer filter."""

    thresholds: tuple[float, ...] = M.DEFAULT_THRESHOLDS
    energies: tuple[float, ...] = M.DEFAULT_ENERGIES
    rel_thresholds: tuple[float, ...] = M.DEFAULT_REL_THRESHOLDS
    unscaled: bool = False
    dense: bool = False
    dense_dtype: str = "float64"
    device: str = "auto"
    layers: str | None = None
    memory_budget: int = DEFAULT_MEMORY_BUDGET
    collapse_threshold: float = 0.9
    max_memory: int | None = field(default_factory=lambda: default_max_memory())

    def __post_init__(self) -> None:
        for name in ("thresholds", "energies", "rel_thresholds"):  # a single number is a one-item tuple
            value = getattr(self, name)
            object.__setattr__(self, name, (float(value),) if isinstance(value, (int, float)) else tuple(value))
        for p in self.energies:
            if not 0.0 < p <= 1.0:
                raise UsageProblem(f"energy fraction {p} is not in (0, 1]")
        for value in (*self.thresholds, *self.rel_thresholds):
            if not math.isfinite(value) or value < 0:
                raise UsageProblem(f"threshold {value} must be a finite number ≥ 0")
        if self.layers:
            try:
                re.compile(self.layers)
            except re.error as exc:
                raise UsageProblem(f"--layers {self.layers!r} is not a valid regular expression ({exc})") from exc


@dataclass
class LayerRecord:
    """The analysis of one layer (DESIGN.md, "Contracts")."""

    name: str
    family: str
    kind: str
    shape: list[int]
    matrix_shape: list[int]
    rank_bound: int
    params: int
    scale: float | None
    exact: bool
    valid: bool
    error: str | None
    singular_values: list[float]
    metrics: dict | None
    bias_update: dict | None = None
    components: list[LayerRecord] | None = None
    alignment: dict | None = None
    composition: dict | None = None  # weights, energy_shares, rank_gain, interference, collapsed, … (compositions)

    @property
    def module_type(self) -> str:
        return module_type(self.name)

    @property
    def layer_index(self) -> int | None:
        return layer_index(self.name)

    def metric(self, key: str, parameter: float | None = None) -> float | None:
        """One metric's value (``record.metric("count_above", 0.005)``); None for an invalid layer."""
        if self.metrics is None:
            return None
        if key not in self.metrics:
            raise KeyError(f"no metric {key!r}; the metrics are {', '.join(sorted(self.metrics))}")
        value = self.metrics[key]
        if isinstance(value, dict) != (parameter is not None):
            need = "needs a parameter (τ, P or ρ)" if isinstance(value, dict) else "takes no parameter"
            raise KeyError(f"metric {key!r} {need}")
        if parameter is None:
            return value
        if M.parameter_key(parameter) not in value:
            raise KeyError(
                f"{key} was computed for {', '.join(value)} only, not {parameter:g} "
                "(give it in thresholds=, energies= or rel_thresholds= of analyze)"
            )
        return value[M.parameter_key(parameter)]

    def __repr__(self) -> str:
        if not self.valid:
            return f"LayerRecord({self.name!r}, invalid: {self.error})"
        m, n = self.matrix_shape
        erank, sigma_max = self.metric("erank"), self.metric("sigma_max")
        return f"LayerRecord({self.name!r}, {m}×{n}, rank ≤ {self.rank_bound}, σ₁ {sigma_max:.4g}, erank {erank:.3f})"

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "family": self.family,
            "kind": self.kind,
            "module_type": self.module_type,
            "layer_index": self.layer_index,
            "shape": self.shape,
            "matrix_shape": self.matrix_shape,
            "rank_bound": self.rank_bound,
            "params": self.params,
            "scale": self.scale,
            "exact": self.exact,
            "valid": self.valid,
            "error": self.error,
            "singular_values": self.singular_values,
            "metrics": self.metrics,
            "bias_update": self.bias_update,
            **(
                {"components": [c.to_dict() for c in self.components], "alignment": self.alignment}
                if self.components is not None
                else {}
            ),
            **(self.composition or {}),
        }


@dataclass
class Analysis:
    """Per-layer records of one checkpoint, in model order; iterable."""

    checkpoint: Checkpoint
    options: AnalysisOptions
    layers: list[LayerRecord]
    warnings: list[str] = field(default_factory=list)  # about the analysis itself (the checkpoint has its own)

    def __iter__(self) -> Iterator[LayerRecord]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, key: int | str) -> LayerRecord:
        """A record by position (``analysis[0]``) or by layer name (``analysis["model.layers.0.self_attn.q_proj"]``)."""
        if isinstance(key, str):
            for record in self.layers:
                if record.name == key:
                    return record
            raise KeyError(f"no layer named {key!r} in {self.checkpoint.path}")
        return self.layers[key]

    def __repr__(self) -> str:
        invalid = len(self.invalid)
        return (
            f"Analysis({str(self.checkpoint.path)!r}, {self.checkpoint.adapter_type}, {len(self.layers)} layers"
            + (f", {invalid} invalid" if invalid else "")
            + ("" if not self.options.unscaled else ", unscaled")
            + ")"
        )

    @property
    def invalid(self) -> list[LayerRecord]:
        return [record for record in self.layers if not record.valid]

    def summary(self) -> dict:
        """:func:`summarize` of the records, plus how many adapter-looking modules no layer analyses."""
        return {**summarize(self.layers), "not_analysed_modules": len(self.checkpoint.not_analysed)}

    def to_dict(self) -> dict:
        from ..report.json import spectrum_document

        return spectrum_document(self)

    def to_pandas(self):
        """One row per layer (name, family, kind, module type, block index, m, n, rank bound, params, scale, exact,
        valid, error) with one column per metric, flattened (``count_above[0.005]``, ``erank``, …); needs pandas."""
        try:
            import pandas
        except ImportError as exc:
            raise RankscopeError("to_pandas needs pandas: pip install 'rankscope[pandas]'") from exc
        rows = []
        for record in self.layers:
            m, n = record.matrix_shape if len(record.matrix_shape) == 2 else (None, None)
            rows.append(
                {
                    "name": record.name,
                    "family": record.family,
                    "kind": record.kind,
                    "module_type": record.module_type,
                    "layer_index": record.layer_index,
                    "m": m,
                    "n": n,
                    "rank_bound": record.rank_bound,
                    "params": record.params,
                    "scale": record.scale,
                    "exact": record.exact,
                    "valid": record.valid,
                    "error": record.error,
                    **flat_metrics(record),
                }
            )
        return pandas.DataFrame(rows)


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
        f"the dense {m}×{n} update needs about {_size(needed)} to decompose in "
        f"{options.dense_dtype}, above --max-memory {_size(options.max_memory)}"
    )


def _size(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024:
            return f"{count:.3g} {unit}"
        count /= 1024
    return f"{count:.3g} TiB"


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
    **overrides,
) -> Analysis:
    """Spectra and metrics of every layer of ``checkpoint``.

    ``options`` (or keyword overrides of its fields: ``analyze(ckpt, thresholds=(0.01,), unscaled=True)``)
    say how; ``progress(done, total)`` is called as layers finish.
    """
    options = options or AnalysisOptions()
    if overrides:
        options = replace(options, **overrides)
    selected = checkpoint.select(options.layers)
    if not selected.layers:
        raise CheckpointError(f"no layer name matches --layers {options.layers!r}", path=checkpoint.path)
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

    # many small tensor ops: run torch single-threaded (spectrum.single_threaded_ops says why); the factor
    # work inside is spread over threads, and dense SVDs get torch's threads back
    with single_threaded_ops():
        sigmas, exact = singular_values(
            updates + [growth[key] for key in growth_keys],
            dense=options.dense,
            dense_dtype=options.dense_dtype,
            device=options.device,
            memory_budget=options.memory_budget,
            progress=step,
        )
        metrics = _batched_metrics(updates, sigmas[: len(units)], options)
    computed = {id(unit): (s, e, m) for unit, s, e, m in zip(units, sigmas, exact, metrics, strict=False)}
    growth_sigmas = dict(zip(growth_keys, sigmas[len(units) :], strict=True))

    def build(layer: Layer) -> LayerRecord:
        if layer.update is None or id(layer) in refused:
            return _invalid_record(layer, layer.error or refused.get(id(layer)) or "cannot be analysed")
        sigma, exact_values, metrics_values = computed[id(layer)]
        record = _record(layer, sigma, exact_values, options, metrics_values)
        if layer.components is not None:
            record.components = [build(component) for component in layer.components]
            if all(c.update is not None for c in layer.components):
                record.alignment = pairwise_alignment([_analysed_update(c, options) for c in layer.components])
        if layer.composition is not None and record.components and all(c.valid for c in record.components):
            record.composition = _composition(layer, record, growth_sigmas, options)
        return record

    with single_threaded_ops():
        records = [build(layer) for layer in selected.layers]
    warnings = []
    if options.unscaled:
        fixed = [u.name for u in units if u.update.scalar_scale is not None and u.update.unscaled() is u.update]
        if fixed:
            warnings.append(
                f"--unscaled does not apply to {len(fixed)} layer(s) whose update is not proportional to α/r "
                f"(DoRA: e.g. {fixed[0]}): they are analysed as the model applies them"
            )
    return Analysis(selected, options, records, warnings)


# -- summary ------------------------------------------------------------------------------------------------
_SCALAR_METRICS = (
    "erank",
    "erank_energy",
    "stable_rank",
    "participation_ratio",
    "numerical_rank",
    "utilization",
    "sigma_max",
    "frobenius",
    "energy",
)
_PARAMETRISED_METRICS = ("count_above", "count_above_rel", "energy_rank")


def flat_metrics(record: LayerRecord) -> dict[str, float]:
    """A record's metrics as one flat mapping (``count_above[0.005]``, ``erank``, …)."""
    if record.metrics is None:
        return {}
    flat = {}
    for key in _PARAMETRISED_METRICS:
        for parameter, value in record.metrics[key].items():
            flat[f"{key}[{parameter}]"] = value
    for key in _SCALAR_METRICS:
        flat[key] = record.metrics[key]
    return flat


def _stats(records: list[LayerRecord]) -> dict:
    valid = [flat_metrics(r) for r in records if r.valid]
    out = {}
    for key in valid[0] if valid else {}:
        values = [v[key] for v in valid]
        out[key] = {"mean": sum(values) / len(values), "min": min(values), "max": max(values)}
    return out


def summarize(records: list[LayerRecord]) -> dict:
    """Counts, parameters and mean/min/max of each metric, overall and by module type (``q_proj`` …)."""
    groups: dict[str, list[LayerRecord]] = {}
    for record in records:
        groups.setdefault(record.module_type, []).append(record)

    def block(rs: list[LayerRecord]) -> dict:
        return {
            "layers": len(rs),
            "valid_layers": sum(r.valid for r in rs),
            "params": sum(r.params for r in rs),
            "rank_bound": {"total": sum(r.rank_bound for r in rs if r.valid)},
            "metrics": _stats(rs),
        }

    summary = {**block(records), "by_module": {name: block(rs) for name, rs in groups.items()}}
    composed = [r for r in records if r.composition is not None]
    if composed:
        summary["composition"] = {
            **composition_stats(composed),
            "by_module": {name: composition_stats([r for r in rs if r.composition]) for name, rs in groups.items()},
        }
    return summary


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def composition_stats(records: list[LayerRecord]) -> dict:
    """Across composed layers: how many collapsed, how many components carry the energy, overlap vs baseline, gain."""
    composed = [r for r in records if r.composition is not None]
    fields = [r.composition for r in composed]
    return {
        "layers": len(composed),
        "collapsed": sum(bool(f["collapsed"]) for f in fields),
        "mean_components": _mean([len(r.components or []) for r in composed]),
        "mean_effective_components": _mean([f["energy_shares"]["concentration"]["effective_number"] for f in fields]),
        "mean_weight_effective_number": _mean([f["weights"]["concentration"]["effective_number"] for f in fields]),
        "mean_rank_gain": _mean([f["rank_gain"] for f in fields]),
        "mean_interference": _mean([f["interference"] for f in fields]),
        "mean_left_overlap": _mean([off_diagonal_mean(r.alignment["left_overlap"]) for r in composed if r.alignment]),
        "mean_left_baseline": _mean([off_diagonal_mean(r.alignment["left_baseline"]) for r in composed if r.alignment]),
        "mean_right_overlap": _mean([off_diagonal_mean(r.alignment["right_overlap"]) for r in composed if r.alignment]),
        "mean_right_baseline": _mean(
            [off_diagonal_mean(r.alignment["right_baseline"]) for r in composed if r.alignment]
        ),
    }
