"""Spectra of a live PEFT model's LoRA layers, read from its modules (no files): what the callbacks log.

Each LoRA layer's update is ΔW = s·B·A with B, A its ``lora_B``/``lora_A`` weights (``lora_embedding_B``/``_A``
for an embedding; a conv's factors flattened to (out, r) and (r, in·∏k)) and s its ``scaling`` for the adapter
followed: the same :class:`~rankscope.core.update.FactoredUpdate` that the LoRA reader builds from the saved file,
so σ (``core.spectrum.singular_values``, exact and factored) and layer names (``core.naming.layer_name`` of the
module path) match ``rankscope spectrum`` on a checkpoint saved at that step. Nothing here needs transformers.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn import Module

from ..analysis.records import LayerRecord
from ..analysis.summary import flat_metrics
from ..core.errors import UsageProblem
from ..core.naming import layer_name, module_types
from ..core.spectrum import singular_values
from ..core.threads import thread_policy
from ..core.update import FactoredUpdate
from ..measures import metrics as M

DEFAULT_METRICS = ("erank", "stable_rank", "count_above[0.005]", "energy_rank[0.9]", "frobenius")
_PARAMETRISED = {"count_above": "thresholds", "count_above_rel": "rel_thresholds", "energy_rank": "energies"}
_METRIC = re.compile(r"^(?P<name>\w+)(?:\[(?P<parameter>[^\]]+)\])?$")


class LiveWarning(UserWarning):
    """A live layer was not read (a sharded parameter, DoRA, a non-finite factor): it is named."""


@dataclass(frozen=True)
class LiveLayer:
    """One LoRA layer of a live model: its name as ``rankscope spectrum`` names it and its update."""

    name: str
    update: FactoredUpdate


def _sharded(tensor: torch.Tensor) -> bool:
    """A parameter another process holds part of: ZeRO-3's placeholder (``ds_shape``), an FSDP shard left empty
    on this rank, or a DTensor (FSDP2)."""
    return tensor.numel() == 0 or hasattr(tensor, "ds_shape") or type(tensor).__name__ == "DTensor"


def followed_adapter(model: torch.nn.Module, adapter: str | None = None) -> str | None:
    """``adapter``, else the model's first active adapter (PEFT's ``active_adapters``), else None (no LoRA)."""
    if adapter is not None:
        return adapter
    for _, module in model.named_modules():
        active = getattr(module, "active_adapters", None)
        if isinstance(active, (list, tuple)) and active and hasattr(module, "lora_A"):
            return str(active[0])
    return None


def lora_modules(model: torch.nn.Module, adapter: str | None = None) -> tuple[str | None, list[tuple[str, Module]]]:
    """The adapter followed (``adapter``, else the first active one) and the (layer name, module) pairs of the
    modules that hold its LoRA factors: found once per model (walking ``named_modules`` is the slow part)."""
    adapter = followed_adapter(model, adapter)
    if adapter is None:
        return None, []
    return adapter, [(layer_name(path), m) for path, m in model.named_modules() if _factors(m, adapter) is not None]


def live_layers(
    model: torch.nn.Module, adapter: str | None = None, modules: Sequence[tuple[str, Module]] | None = None
) -> tuple[list[LiveLayer], list[str]]:
    """The LoRA layers of ``model`` for ``adapter`` (default: the first active one) as detached factored updates,
    and the reasons layers were left out (sharded parameters, DoRA's magnitude, which makes ΔW not B·A).
    ``modules``: the pairs :func:`lora_modules` found for this adapter, to skip the walk over the model."""
    if modules is None:
        adapter, modules = lora_modules(model, adapter)
    layers: list[LiveLayer] = []
    left_out: list[str] = []
    with torch.no_grad():
        for name, module in modules:
            factors = _factors(module, adapter)
            if factors is None:
                continue
            b, a = factors
            if _sharded(a) or _sharded(b):
                left_out.append(f"{name}: sharded parameter (FSDP/ZeRO-3), not gathered")
                continue
            if getattr(module, "use_dora", {}).get(adapter, False):
                left_out.append(f"{name}: DoRA (its magnitude rescales B·A; read the saved file with --base)")
                continue
            scale = float(module.scaling[adapter])
            update = FactoredUpdate(b.detach().reshape(b.shape[0], -1), a.detach().reshape(a.shape[0], -1), scale=scale)
            layers.append(LiveLayer(name, update))
    return layers, left_out


def _factors(module: torch.nn.Module, adapter: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(B, A) of a PEFT LoRA module for ``adapter``: ``lora_B``/``lora_A`` modules or embedding parameters."""
    lora_a, lora_b = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
    if isinstance(lora_a, torch.nn.ModuleDict) and isinstance(lora_b, torch.nn.ModuleDict) and adapter in lora_a:
        return lora_b[adapter].weight, lora_a[adapter].weight
    emb_a, emb_b = getattr(module, "lora_embedding_A", None), getattr(module, "lora_embedding_B", None)
    if isinstance(emb_a, torch.nn.ParameterDict) and isinstance(emb_b, torch.nn.ParameterDict) and adapter in emb_a:
        return emb_b[adapter], emb_a[adapter]
    return None


def metric_parameters(metrics: Sequence[str]) -> dict[str, tuple[float, ...]]:
    """The thresholds, energies and relative thresholds that ``metrics`` (flat names: ``count_above[0.01]``,
    ``erank``) ask for, as ``measures.metrics.spectrum_metrics`` takes them; an unknown name is a UsageProblem."""
    parameters: dict[str, list[float]] = {key: [] for key in _PARAMETRISED.values()}
    for metric in metrics:
        match = _METRIC.match(metric)
        name = match["name"] if match else ""
        if match and match["parameter"] is not None and name in _PARAMETRISED:
            try:
                parameters[_PARAMETRISED[name]].append(float(match["parameter"]))
                continue
            except ValueError:
                pass
        elif match and match["parameter"] is None and name not in _PARAMETRISED:
            continue
        raise UsageProblem(f"metrics: {metric!r} is not a metric name such as erank or count_above[0.005]",
                           argument="metrics")  # fmt: skip
    chosen = {key: tuple(values) for key, values in parameters.items()}
    known = set(flat_metrics(_record("probe", [2, 2], [1.0, 0.5], 2, chosen)))
    unknown = [metric for metric in metrics if _normal(metric) not in known]
    if unknown:
        raise UsageProblem(f"metrics: unknown metric {unknown[0]!r} (known: {', '.join(sorted(known))})",
                           argument="metrics")  # fmt: skip
    return chosen


def _normal(metric: str) -> str:
    """A flat metric name as ``flat_metrics`` spells it (``count_above[0.01]``: the parameter as ``str(float)``)."""
    match = _METRIC.match(metric)
    if match is None or match["parameter"] is None:
        return metric
    return f"{match['name']}[{M.parameter_key(float(match['parameter']))}]"


def _record(name: str, shape: list[int], sigma: list[float], bound: int, parameters: dict,
            values: dict | None = None) -> LayerRecord:  # fmt: skip
    values = values if values is not None else M.spectrum_metrics(sigma, shape, bound, **parameters)
    return LayerRecord(name=name, family="lora", kind="live", shape=shape, matrix_shape=shape, rank_bound=bound,
                       params=0, scale=None, exact=True, valid=True, error=None, singular_values=sigma,
                       metrics=values)  # fmt: skip


def live_records(layers: Sequence[LiveLayer], parameters: dict[str, tuple[float, ...]]) -> list[LayerRecord]:
    """One record per layer: σ of its update (exact, factored) and its metrics; non-finite σ left out, warned."""
    sigmas, _ = singular_values([layer.update for layer in layers])
    kept = []
    for layer, sigma in zip(layers, sigmas, strict=True):
        if not bool(torch.isfinite(sigma).all()):
            warnings.warn(f"{layer.name}: non-finite singular values (diverged weights?); not logged", LiveWarning,
                          stacklevel=2)  # fmt: skip
            continue
        kept.append((layer, sigma))
    shapes = [list(layer.update.shape) for layer, _ in kept]
    bounds = [layer.update.rank_bound for layer, _ in kept]
    values = M.spectrum_metrics_batch([sigma for _, sigma in kept], shapes, bounds, **parameters)
    records = [_record(layer.name, shape, sigma.tolist(), bound, parameters, metrics)
               for (layer, sigma), shape, bound, metrics in zip(kept, shapes, bounds, values, strict=True)]  # fmt: skip
    types = module_types(record.name for record in records)
    for record in records:
        record.module_type = types[record.name]
    return records


def scalars(records: Iterable[LayerRecord], metrics: Sequence[str], prefix: str = "rankscope") -> dict[str, float]:
    """``{prefix}/<metric>/<module_type>``: each metric's mean over the layers of each module type."""
    by_type: dict[str, list[dict]] = {}
    for record in records:
        by_type.setdefault(record.module_type, []).append(flat_metrics(record))
    out = {}
    for metric in metrics:
        key = _normal(metric)
        for kind, rows in by_type.items():
            out[f"{prefix}/{metric}/{kind}"] = float(sum(row[key] for row in rows) / len(rows))
    return out


def jsonl_entry(records: Sequence[LayerRecord], step: int, epoch: float | None) -> dict:
    """One line of the ``rankscope.callback/1`` JSONL that ``rankscope trajectory`` reads."""
    layers = [{"name": r.name, "shape": list(r.matrix_shape), "rank_bound": r.rank_bound, "sigma": r.singular_values}
              for r in records]  # fmt: skip
    return {"schema": "rankscope.callback/1", "step": int(step),
            "epoch": float(epoch) if epoch is not None else None, "layers": layers}  # fmt: skip


class LiveMeter:
    """What a training-loop callback does at a measured step, for any loop: the model's LoRA modules found once per
    model, each left-out layer warned once, σ and metrics under the thread policy (``threads=1``: single-threaded,
    restored afterwards; ``None``: left alone), the scalars returned and, with ``jsonl``, one ``rankscope.callback/1``
    line appended."""

    def __init__(self, metrics: Sequence[str] = DEFAULT_METRICS, jsonl: str | os.PathLike | None = None,
                 adapter: str | None = None, threads: int | None = 1) -> None:  # fmt: skip
        self.metrics = tuple(metrics)
        self.parameters = metric_parameters(self.metrics)
        self.jsonl = Path(jsonl) if jsonl is not None else None
        self.adapter = adapter
        thread_policy(threads)  # checks the value now, not at the first measured step
        self.threads = threads
        self._warned: set[str] = set()
        self._modules: tuple | None = None

    def measure(self, model: Module, step: int, epoch: float | None = None) -> dict[str, float]:
        """``{rankscope/<metric>/<module_type>: mean}`` of ``model`` now ({} if it has no readable LoRA layer)."""
        if self._modules is None or self._modules[0] is not model:
            self._modules = (model, *lora_modules(model, self.adapter))
        _, adapter, modules = self._modules
        layers, left_out = live_layers(model, adapter, modules)
        for reason in left_out:
            self._warn_once(reason, f"rankscope callback: {reason}; not logged")
        if not layers:
            self._warn_once("no layers", "rankscope callback: the model has no readable LoRA layers; nothing logged")
            return {}
        with thread_policy(self.threads):
            records = live_records(layers, self.parameters)
        if self.jsonl is not None:
            line = json.dumps(jsonl_entry(records, step, epoch), allow_nan=False)
            with self.jsonl.open("a", encoding="utf-8") as out:
                out.write(line + "\n")
        return scalars(records, self.metrics)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, LiveWarning, stacklevel=3)


class LiveCallback:
    """What the transformers and Lightning callbacks share (each also derives from its framework's ``Callback``):
    the measuring interval (``None``: the trainer's logging interval), a :class:`LiveMeter` and the scalars of
    the last measured step."""

    def __init__(
        self,
        every_n_steps: int | None = None,
        metrics: Sequence[str] = DEFAULT_METRICS,
        jsonl: str | os.PathLike | None = None,
        *,
        adapter: str | None = None,
        threads: int | None = 1,
    ) -> None:
        self.every_n_steps = checked_interval(every_n_steps)
        self.meter = LiveMeter(metrics, jsonl, adapter, threads)
        self.metrics = self.meter.metrics
        self.parameters = self.meter.parameters
        self.last: dict[str, float] = {}  # the scalars of the last measured step
        self._measured_step: int | None = None


def checked_interval(every_n_steps: int | None) -> int | None:
    """A callback's measuring interval: None (the trainer's logging interval) or a whole number ≥ 1."""
    if every_n_steps is not None and (
        isinstance(every_n_steps, bool) or int(every_n_steps) != every_n_steps or every_n_steps < 1
    ):
        raise ValueError(f"every_n_steps must be a whole number ≥ 1, found {every_n_steps!r}")
    return every_n_steps
