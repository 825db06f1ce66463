"""The options of a shift analysis (light: the command line reads them without importing torch)."""

from __future__ import annotations

from dataclasses import dataclass

from raymoe.platform.analysis.options import DTYPES, AnalysisError

DEFAULT_GAMMA = 0.001  # γ when the checkpoint records none (a Hugging Face one): DeepSeek-V3's
DEFAULT_TOLERANCE = 0.1  # balance has returned at MaxVio <= in-domain MaxVio × (1 + this)
DEFAULT_SHIFT_LR = 1e-5  # small: the continued training is there to move the biases, not to re-learn D2


@dataclass(kw_only=True)
class ShiftConfig:
    """How a shift analysis routes and how long it trains; :meth:`validate` names the first wrong field.

    Args:
        seq_len: tokens per sequence (at most the model's ``max_position_embeddings``).
        sequences: held-out sequences of each domain (the in-domain D1 and the shifted D2), routed
            with the bias frozen and, for D2, evaluated during the continued training.
        batch_size: sequences per forward (and per micro-batch of the continued training).
        steps: N, the optimizer steps of continued training on D2 (0: the frozen-bias part only).
        train_batch: sequences of D2 per optimizer step (a multiple of ``batch_size``, or at most it).
        lr: constant learning rate of the continued training (fresh AdamW, no warmup, no decay).
        gamma: γ, the bias update speed; None: the checkpoint's ``train.bias_update_speed``
            (:data:`DEFAULT_GAMMA` when it records none).
        tolerance: balance has returned when the mean MaxVio_global on D2 is at most the frozen
            in-domain one × (1 + ``tolerance``).
        eval_every: evaluate MaxVio_global on the held-out D2 every this many steps (and at the last).
        seed: the continued training's seed.
        dtype: ``fp32`` (the reference) or ``bf16`` autocast.
    """

    seq_len: int = 256
    sequences: int = 16
    batch_size: int = 8
    steps: int = 50
    train_batch: int = 8
    lr: float = DEFAULT_SHIFT_LR
    gamma: float | None = None
    tolerance: float = DEFAULT_TOLERANCE
    eval_every: int = 1
    seed: int = 0
    dtype: str = "fp32"

    def micro_batches(self) -> int:
        """Micro-batches per optimizer step: ``train_batch`` cut into forwards of ``batch_size``."""
        return max(1, self.train_batch // min(self.batch_size, self.train_batch))

    def validate(self) -> None:
        for name in ("seq_len", "sequences", "batch_size", "train_batch", "eval_every"):
            if getattr(self, name) < 1:
                raise AnalysisError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.steps < 0:
            raise AnalysisError(f"steps must be >= 0, got {self.steps}")
        if self.train_batch > self.batch_size and self.train_batch % self.batch_size:
            raise AnalysisError(
                f"train_batch ({self.train_batch}) must be a multiple of batch_size ({self.batch_size}) or at most it"
            )
        if not self.lr > 0:
            raise AnalysisError(f"lr must be > 0, got {self.lr}")
        if self.gamma is not None and self.gamma < 0:
            raise AnalysisError(f"gamma must be >= 0, got {self.gamma}")
        if self.tolerance < 0:
            raise AnalysisError(f"tolerance must be >= 0, got {self.tolerance}")
        if self.dtype not in DTYPES:
            raise AnalysisError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
