"""What the report's measures are, one sentence each, for the page's and the Markdown's "Definitions" (one
source: ``docs/metrics.md`` says the same at length). σ₁ ≥ σ₂ ≥ … are the singular values of the analysed ΔW."""

from __future__ import annotations

from .model import Report

_SPECTRUM = (
    ("count above τ (#σ>τ)", "#{σᵢ > τ}, τ absolute (the BoRA/HiRA rank-validation convention)"),
    ("energy rank at p", "the smallest k with Σᵢ₌₁ᵏ σᵢ² ≥ p·Σσ²"),
    ("erank", "Roy & Vetterli's (2007) entropy effective rank exp(−Σ pᵢ ln pᵢ), pᵢ = σᵢ / Σσ"),
    ("erank_energy", "the same entropy of the energy shares eᵢ = σᵢ² / Σσ² (layers.csv)"),
    ("stable rank", "Σσ² / σ₁² = ‖ΔW‖_F² / ‖ΔW‖₂²"),
    (
        "utilisation (util)",
        "erank / rank bound; the rank bound is min(K, m, n), K the update's inner dimension (r for LoRA; "
        "min(m, n) for a dense update such as DoRA's)",
    ),
    ("numerical rank", "#{σᵢ > σ₁·max(m, n)·eps(float32)}: the σ beyond it are numerically 0 and not drawn"),
    ("zero update", "every σ = 0 (an untrained LoRA's B = 0): every measure is 0"),
)
_ALIGNMENT = (
    ("cosine", "⟨ΔW_a, ΔW_b⟩_F / (‖ΔW_a‖_F·‖ΔW_b‖_F), exact from the factors"),
    (
        "overlap (left, right)",
        "‖U_aᵀU_b‖_F² / k over the top k = min(rank_a, rank_b) singular vectors of each "
        "(output side: left, input side: right), 1 for nested subspaces; its random baseline max(k_a, k_b)/dimension",
    ),
    ("principal angles", "arccos σᵢ(U_aᵀU_b) of the same top-k subspaces, in degrees"),
)
_BASE = (
    ("relative update", "‖ΔW‖_F / ‖W₀‖_F"),
    ("σ₁ / σ₁(W₀)", "the update's largest singular value against the base weight's"),
    ("amplification", "‖ΔW‖_F / ‖U_kᵀ W₀ V_k‖_F with U_k, V_k ΔW's top-k singular vectors (the LoRA paper's §7)"),
    (
        "intruders",
        "left singular vectors of W₀ + ΔW among its top k whose largest |cosine| with every left singular "
        "vector of W₀ is below ε (Shuttleworth et al. 2024)",
    ),
)


def definitions(report: Report) -> list[tuple[str, str]]:
    """(term, definition) for the measures this report shows: the spectrum's always, the alignment's where
    components or checkpoints are aligned, the base's where a layer was measured against ``--base``."""
    out = list(_SPECTRUM)
    if report.comparison_view is not None or report.compositions:
        out += _ALIGNMENT
    if report.against_base:
        out += _BASE
    return out


__all__ = ["definitions"]
