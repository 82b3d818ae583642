"""A Lightning callback that logs the effective rank of the LightningModule's LoRA layers while it trains.

``RankscopeCallback`` reads the live module's PEFT LoRA weights every ``every_n_steps`` optimiser steps (default:
the Trainer's ``log_every_n_steps``) — no files, the exact factored path, no gradient tracking — and hands scalars
``rankscope/<metric>/<module_type>`` (the mean over that type's layers) to every logger of the Trainer
(``logger.log_metrics(values, step=global_step)``: CSV, TensorBoard, W&B, MLflow …). The loggers are called
directly rather than through ``LightningModule.log_dict``, whose step values reach the loggers only every
``log_every_n_steps`` and would need a collective under DDP; the callback measures on global rank zero only.
Optionally each measured step's σ per layer is appended to a ``rankscope.callback/1`` JSONL, which
``rankscope trajectory`` reads. Layer names are the base model's (``layer_name`` drops everything up to PEFT's
``base_model.model.``), so they match ``rankscope spectrum`` on the adapter saved by ``save_pretrained``.

The measuring is :class:`~rankscope.integrations.live.LiveMeter`, shared with the transformers callback.
lightning is the optional extra ``rankscope[lightning]``.
"""

from __future__ import annotations

import math

from .live import DEFAULT_METRICS, LiveCallback

try:
    from lightning.pytorch import Callback
except ImportError as exc:  # one line, not lightning's traceback
    raise ImportError("rankscope.integrations.lightning needs lightning: pip install 'rankscope[lightning]'") from exc

__all__ = ["DEFAULT_METRICS", "RankscopeCallback"]


class RankscopeCallback(LiveCallback, Callback):
    """Log ``rankscope/<metric>/<module_type>`` every ``every_n_steps`` global (optimiser) steps.

    ``metrics`` are flat metric names as in the CSV (``erank``, ``stable_rank``, ``count_above[0.005]``,
    ``energy_rank[0.9]`` …); ``jsonl`` a file to append one ``rankscope.callback/1`` line to per measured step;
    ``adapter`` the PEFT adapter followed (default: the model's first active one); ``threads`` as in the
    transformers callback (1: measure single-threaded, restored afterwards; ``None``: leave torch's threads).
    Under gradient accumulation a global step spans several batches: it is measured once, after its optimiser step.
    """

    def interval(self, trainer) -> int:
        """``every_n_steps``, else the Trainer's ``log_every_n_steps``."""
        if self.every_n_steps is not None:
            return int(self.every_n_steps)
        return max(int(getattr(trainer, "log_every_n_steps", 1) or 1), 1)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = int(trainer.global_step)
        if not trainer.is_global_zero or step == 0 or step % self.interval(trainer) or step == self._measured_step:
            return
        self._measured_step = step
        values = self.meter.measure(pl_module, step, _epoch(trainer, batch_idx))
        if not values:
            return
        self.last = values
        for logger in trainer.loggers:
            logger.log_metrics(values, step=step)


def _epoch(trainer, batch_idx: int) -> float:
    """The fractional epoch at the end of batch ``batch_idx`` (the whole epoch where the length is unknown)."""
    batches = trainer.num_training_batches
    if isinstance(batches, (int, float)) and math.isfinite(batches) and batches > 0:
        return trainer.current_epoch + (batch_idx + 1) / batches
    return float(trainer.current_epoch)
