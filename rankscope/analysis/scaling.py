"""What the analysed update's scale is, in words, for every output that says it (HTML, Markdown, terminal,
notebook, JSON): one sentence from the checkpoint's family and config, so that an rsLoRA adapter is not said to
be scaled by α/r."""

from __future__ import annotations

from .records import Analysis

# families whose ΔW carries no α/r: the update is their own product (or a difference of weights)
_OWN_UPDATE = {
    "full-delta": "ΔW = W − W₀ (a full fine-tune: no scale)",
    "ia3": "ΔW of the learned rescaling (no α/r)",
    "ln-tuning": "ΔW = W_saved − W₀ (no α/r)",
    "peft-merge": "ΔW from PEFT's own merge (its scale included)",
    "vera": "ΔW = diag(λ_b)·B·diag(λ_d)·A (VeRA has no α/r)",
}


def scale_rule(analysis: Analysis) -> str | None:
    """The scale ΔW carries beyond B·A: "α/√r" (rsLoRA), "α/r", a composition's; None where there is none."""
    ckpt = analysis.checkpoint
    if ckpt.family in _OWN_UPDATE:
        return None
    config = ckpt.config or {}
    if config.get("use_rslora") or ckpt.adapter_type == "RSLORA":
        return "α/√r"
    if ckpt.family == "composition":
        return "each component's α/r (α/√r for rsLoRA) times its weight"
    return "α/r"


def scaling_text(analysis: Analysis, *, markdown: bool = False) -> str:
    """ "ΔW as the model applies it (α/√r included)", or what ``--unscaled`` analysed instead."""
    rule = scale_rule(analysis)
    if rule is None:
        return _OWN_UPDATE[analysis.checkpoint.family]
    if analysis.options.unscaled:
        flag = "`--unscaled`" if markdown else "--unscaled"
        return f"B·A without {rule} ({flag})"
    return f"ΔW as the model applies it ({rule} included)"


__all__ = ["scale_rule", "scaling_text"]
