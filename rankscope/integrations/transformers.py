"""A ``transformers`` Trainer callback that logs the effective rank of the model's LoRA layers while it trains.

``RankscopeCallback`` reads the live model's adapter weights every ``every_n_steps`` (default: the logging
interval) — no files, the exact factored path, no gradient tracking — and adds scalars
``rankscope/<metric>/<module_type>`` (the mean over that type's layers) to the next log. A callback is handed no
trainer, and the Trainer appends a log to ``state.log_history`` before ``on_log`` runs, calling the reporting
integrations (TensorBoard, W&B, MLflow …) in the order of its callback list: the callback updates both ``logs``
and ``state.log_history[-1]``, and :func:`attach` puts it ahead of those integrations so they receive the values.
Optionally each computed step's σ per layer is appended to a ``rankscope.callback/1`` JSONL, which
``rankscope trajectory`` reads. Main process only; sharded parameters (FSDP, ZeRO-3) are skipped with a warning.
The measuring is :class:`~rankscope.integrations.live.LiveMeter`, shared with the Lightning callback.

transformers is the optional extra ``rankscope[transformers]``.
"""

from __future__ import annotations

from .live import DEFAULT_METRICS, LiveCallback

try:
    from transformers import TrainerCallback
except ImportError as exc:  # one line, not transformers' traceback
    raise ImportError(
        "rankscope.integrations.transformers needs transformers: pip install 'rankscope[transformers]'"
    ) from exc

__all__ = ["DEFAULT_METRICS", "RankscopeCallback", "attach"]


class RankscopeCallback(LiveCallback, TrainerCallback):
    """Log ``rankscope/<metric>/<module_type>`` every ``every_n_steps`` optimiser steps.

    ``metrics`` are flat metric names as in the CSV (``erank``, ``stable_rank``, ``count_above[0.005]``,
    ``energy_rank[0.9]`` …); ``jsonl`` a file to append one ``rankscope.callback/1`` line to per computed step;
    ``adapter`` the PEFT adapter followed (default: the model's first active one). ``threads=1`` (the default)
    measures with torch and BLAS single-threaded, restored afterwards (the factored path is many small ops, which
    torch's fork-join slows ~4× on a busy CPU; training waits for the callback either way); ``None`` leaves them.
    """

    _pending: dict[str, float] | None = None  # the scalars of the last measured step, until the next log

    def interval(self, args, state) -> int:
        """``every_n_steps``, else the Trainer's logging interval in steps (a fraction resolved by the Trainer)."""
        if self.every_n_steps is not None:
            return int(self.every_n_steps)
        steps = getattr(state, "logging_steps", None) or getattr(args, "logging_steps", None) or 1
        return max(int(steps), 1)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        step = state.global_step
        if not state.is_world_process_zero or model is None or step % self.interval(args, state):
            return
        self.measure(model, step, state.epoch)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._pending is None or logs is None:
            return
        logs.update(self._pending)
        if state.log_history:
            state.log_history[-1].update(self._pending)
        self._pending = None

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._pending = None  # a value computed after the last log would otherwise leak into a later run's log

    def measure(self, model, step: int, epoch: float | None = None) -> dict[str, float]:
        """Compute the scalars of ``model`` now (held for the next log) and append its JSONL line; returns them."""
        values = self.meter.measure(model, step, epoch)
        if values:
            self._pending = self.last = values
        return values


def attach(trainer, callback: RankscopeCallback | None = None, **options) -> RankscopeCallback:
    """Add a :class:`RankscopeCallback` (``callback``, or one built from ``options``) to ``trainer`` right after
    its ``DefaultFlowCallback``, ahead of the reporting integrations and the progress printer, so that the values
    it adds to a log reach TensorBoard, W&B, MLflow and the console. Returns the callback."""
    from transformers.trainer_callback import DefaultFlowCallback

    if callback is None:
        callback = RankscopeCallback(**options)
    elif options:
        raise TypeError("attach takes a callback or the options to build one, not both")
    callbacks = trainer.callback_handler.callbacks
    flow = [i for i, cb in enumerate(callbacks) if isinstance(cb, DefaultFlowCallback)]
    callbacks.insert(flow[-1] + 1 if flow else 0, callback)
    return callback
