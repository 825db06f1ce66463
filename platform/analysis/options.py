"""The options of an expert analysis (light: the command line reads them without importing torch)."""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_EXPERIMENT = "raymoe-analysis"  # the MLflow experiment of analysis runs
DTYPES = ("fp32", "bf16")


class AnalysisError(ValueError):
    """An analysis input is wrong (a domain, a checkpoint, an option); the message names it."""


@dataclass(kw_only=True)
class ExpertsConfig:
    """How much an analysis routes, and what it computes; :meth:`validate` names the first wrong field.

    Args:
        seq_len: tokens per sequence (at most the model's ``max_position_embeddings``).
        sequences: sequences per domain for the routing metrics.
        batch_size: sequences per forward.
        ablation_sequences: the first sequences of each domain the masking ablation evaluates (0: no ablation).
        ratios: fractions of the experts of each main MoE layer to mask (0 is always added).
        saturation_sequences: the first sequences of each domain routed at every checkpoint of the run
            (0: no router saturation).
        min_count: vocabulary specialization counts only tokens seen this often.
        top_tokens: tokens listed per expert.
        seed: of the random experts of the ablation.
        dtype: ``fp32`` (the reference) or ``bf16`` (mixed precision, the fast path; the router stays float32).
    """

    seq_len: int = 256
    sequences: int = 16
    batch_size: int = 8
    ablation_sequences: int = 4
    ratios: list[float] = field(default_factory=lambda: [0.125, 0.25, 0.5])
    saturation_sequences: int = 4
    min_count: int = 8
    top_tokens: int = 8
    seed: int = 0
    dtype: str = "fp32"

    def validate(self) -> None:
        for name in ("seq_len", "sequences", "batch_size", "min_count", "top_tokens"):
            if getattr(self, name) < 1:
                raise AnalysisError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("ablation_sequences", "saturation_sequences"):
            if not 0 <= getattr(self, name) <= self.sequences:
                raise AnalysisError(f"{name} must be in [0, sequences={self.sequences}], got {getattr(self, name)}")
        if self.dtype not in DTYPES:
            raise AnalysisError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        bad = [r for r in self.ratios if not 0 <= r < 1]
        if bad:
            raise AnalysisError(f"ratios must be in [0, 1), got {bad[0]}")
