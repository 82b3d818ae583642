"""Records out: :class:`LayerRecord` (one layer's spectrum and metrics) and :class:`Analysis` (a checkpoint's)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from ..core import naming
from ..core.checkpoint import Checkpoint
from ..core.errors import RankscopeError
from ..measures import metrics as M
from .options import AnalysisOptions
from .summary import flat_metrics, summarize


@dataclass
class LayerRecord:
    """The analysis of one layer (docs/architecture.md, "Contracts")."""

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
    truncated: dict | None = None  # --top-k: how the top K σ were found and their certificate (core.lowrank)
    base: dict | None = None  # against --base: relative size, amplification, intruders (analysis.against_base)
    # decided over the checkpoint's layers (naming.module_types, which analyze assigns); from the name alone where
    # a record is built without its checkpoint
    module_type: str = ""

    def __post_init__(self) -> None:
        if not self.module_type:
            self.module_type = naming.module_type(self.name)

    @property
    def layer_index(self) -> int | None:
        return naming.layer_index(self.name)

    @property
    def expert_index(self) -> int | None:
        """The expert of a MoE layer (``mlp.experts.3.down_proj``, ``mlp.experts.down_proj[3]``); None otherwise."""
        return naming.expert_index(self.name)

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
        erank_text = f"erank {erank:.3f}" if erank is not None else f"top {len(self.singular_values)} σ"
        return f"LayerRecord({self.name!r}, {m}×{n}, rank ≤ {self.rank_bound}, σ₁ {sigma_max:.4g}, {erank_text})"

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "family": self.family,
            "kind": self.kind,
            "module_type": self.module_type,
            "layer_index": self.layer_index,
            **({"expert_index": self.expert_index} if self.expert_index is not None else {}),  # MoE layers only
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
            **({"truncated": self.truncated} if self.truncated is not None else {}),  # --top-k layers only
            **({"base": self.base} if self.base is not None else {}),  # layers measured against --base only
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
    notes: list[str] = field(default_factory=list)  # how to read the analysis (the checkpoint has its own)

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
        from .documents import spectrum_document

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


__all__ = ["Analysis", "LayerRecord"]
