"""The balance experiment of Wang et al. (arXiv 2408.15664, Table 1), by one function call.

The same model trains on the same data three ways: (a) auxiliary-loss-free bias balancing,
(b) the auxiliary-loss baseline (sequence-wise balance loss with α = 0.001, no bias updates),
(c) no balancing at all. Each is an MLflow run in one experiment; the result rows hold the
validation loss and perplexity, MaxVio_global on the validation set and the mean MaxVio_batch
over the last fifth of training.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

from raymoe.platform.config import RaymoeConfig
from raymoe.platform.train.loop import pretrain

AUX_LOSS_ALPHA = 0.001  # the paper's auxiliary-loss baseline


@dataclass
class BalanceRow:
    """One method's results."""

    method: str
    val_loss: float
    val_perplexity: float
    max_vio_global: float
    max_vio_batch_tail: float
    run_id: str | None


def variants(cfg: RaymoeConfig, gamma: float, alpha: float = AUX_LOSS_ALPHA) -> dict[str, RaymoeConfig]:
    """The three configurations: loss-free (γ, α=0), aux-loss (γ=0, α), none (γ=0, α=0)."""

    def with_train(**changes: float) -> RaymoeConfig:
        return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **changes))

    return {
        "loss-free": with_train(bias_update_speed=gamma, seq_aux_alpha=0.0),
        "aux-loss": with_train(bias_update_speed=0.0, seq_aux_alpha=alpha),
        "none": with_train(bias_update_speed=0.0, seq_aux_alpha=0.0),
    }


def balance_experiment(
    cfg: RaymoeConfig,
    data_dir: str | Path,
    output: str | Path,
    gamma: float,
    alpha: float = AUX_LOSS_ALPHA,
    experiment: str = "raymoe-balance",
    progress: bool = True,
) -> list[BalanceRow]:
    """Train the three variants of ``cfg`` on ``data_dir``; return a row per method."""
    rows = []
    for method, variant in variants(cfg, gamma, alpha).items():
        result = pretrain(
            variant,
            data_dir,
            Path(output) / method,
            progress=progress,
            run_name=f"balance/{method}",
            experiment=experiment,
        )
        rows.append(
            BalanceRow(
                method=method,
                val_loss=result.val_loss,
                val_perplexity=math.exp(result.val_loss),
                max_vio_global=result.max_vio_global,
                max_vio_batch_tail=result.max_vio_batch_tail,
                run_id=result.run_id,
            )
        )
    return rows


def format_table(rows: list[BalanceRow]) -> str:
    """The rows as an aligned text table (Markdown-compatible)."""
    lines = [
        "| method | validation loss | perplexity | MaxVio_global | MaxVio_batch (last 1/5) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r.method} | {r.val_loss:.4f} | {r.val_perplexity:.2f} | {r.max_vio_global:.3f} | "
            f"{r.max_vio_batch_tail:.3f} |"
        )
    return "\n".join(lines)
