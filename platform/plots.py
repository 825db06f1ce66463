"""PNG plots of a training run: the loss curve and the expert-load heatmap.

Figures are drawn with matplotlib's Agg canvas directly (no ``pyplot``), so no GUI backend is
touched and the process-wide backend choice of a user's session is left as it is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

LOSS_CURVE_FILE = "loss_curve.png"
HEATMAP_FILE = "expert_load_heatmap.png"
FIGURE_DPI = 120
LOSS_FIGSIZE_IN = (7.0, 4.0)
HEATMAP_HEIGHT_PER_LAYER_IN = 0.35
HEATMAP_MIN_HEIGHT_IN = 2.5
HEATMAP_MAX_HEIGHT_IN = 12.0
HEATMAP_WIDTH_IN = 8.0
MAX_LABELLED_LAYERS = 32  # above this, the y axis keeps matplotlib's own ticks


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` as a PNG at ``path`` (parents created), at FIGURE_DPI, tight; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, format="png", dpi=FIGURE_DPI, bbox_inches="tight")
    return path


def loss_curve(
    steps: Sequence[int],
    losses: Sequence[float],
    val_steps: Sequence[int],
    val_losses: Sequence[float],
    path: str | Path,
) -> Path:
    """Plot the training loss per step and the validation loss at its steps; write a PNG to ``path``.

    Args:
        steps, losses: the training loss (main + λ·MTP) at each logged optimizer step.
        val_steps, val_losses: the validation loss at the steps it was measured (may be empty).
        path: the PNG file to write (parents are created).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    fig = Figure(figsize=LOSS_FIGSIZE_IN)
    ax = fig.add_subplot()
    if len(steps):
        ax.plot(steps, losses, label="train loss", linewidth=1.2)
    if len(val_steps):
        ax.plot(val_steps, val_losses, "o-", label="validation loss", markersize=4)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("loss")
    ax.grid(True, alpha=0.3)
    if len(steps) or len(val_steps):
        ax.legend()
    return save_figure(fig, path)


def normalized_loads(loads_LE: np.ndarray) -> np.ndarray:
    """Per-layer load relative to the layer's mean load (1.0 = perfectly balanced; 0 where unused)."""
    loads_LE = np.asarray(loads_LE, dtype=np.float64)
    mean_L1 = loads_LE.mean(axis=1, keepdims=True)
    return np.divide(loads_LE, mean_L1, out=np.zeros_like(loads_LE), where=mean_L1 > 0)


def expert_load_heatmap(loads: np.ndarray, path: str | Path, title: str = "expert load over the run") -> Path:
    """Draw a heatmap of per-expert load, MoE layers × experts, normalized per layer; write a PNG.

    Args:
        loads: ``[n_moe_layers, n_routed_experts]`` token counts (e.g. summed over all steps).
        path: the PNG file to write (parents are created).
        title: the figure title.

    Each cell is load / mean load of its layer, so 1.0 is perfect balance and the row maximum
    minus one is the layer's MaxVio; the y labels show that MaxVio.
    """
    loads_LE = np.asarray(loads, dtype=np.float64)
    if loads_LE.ndim != 2:
        raise ValueError(f"loads must be [n_moe_layers, n_experts], got shape {loads_LE.shape}")
    rel_LE = normalized_loads(loads_LE)
    n_layers, n_experts = rel_LE.shape
    height = min(max(HEATMAP_MIN_HEIGHT_IN, HEATMAP_HEIGHT_PER_LAYER_IN * n_layers + 1.5), HEATMAP_MAX_HEIGHT_IN)
    fig = Figure(figsize=(HEATMAP_WIDTH_IN, height))
    ax = fig.add_subplot()
    if rel_LE.size:
        image = ax.imshow(rel_LE, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0.0)
        fig.colorbar(image, ax=ax, label="load / layer mean load")
        if n_layers <= MAX_LABELLED_LAYERS:
            max_vio_L = rel_LE.max(axis=1) - 1.0
            ax.set_yticks(range(n_layers))
            ax.set_yticklabels([f"{i} (MaxVio {v:.2f})" for i, v in enumerate(max_vio_L)])
    else:
        ax.text(0.5, 0.5, "no MoE layers", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel(f"routed expert (of {n_experts})")
    ax.set_ylabel("MoE layer")
    ax.set_title(title)
    return save_figure(fig, path)


@dataclass
class RunHistory:
    """What the plots of one run need, gathered step by step (see :meth:`write`)."""

    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    val_steps: list[int] = field(default_factory=list)
    val_losses: list[float] = field(default_factory=list)
    load_sum_LE: np.ndarray | None = None  # [n_moe_layers, n_experts] tokens routed, summed over steps

    def add_step(self, step: int, loss: float, loads_LE: np.ndarray) -> None:
        """One optimizer step: its loss and its per-expert loads (added to the run's totals)."""
        self.steps.append(step)
        self.losses.append(float(loss))
        loads_LE = np.asarray(loads_LE, dtype=np.float64)
        if loads_LE.ndim != 2:
            return
        if self.load_sum_LE is None:
            self.load_sum_LE = np.zeros_like(loads_LE)
        if self.load_sum_LE.shape == loads_LE.shape:  # a changed shape keeps the first one's totals
            self.load_sum_LE += loads_LE

    def add_eval(self, step: int, val_loss: float) -> None:
        """A validation loss (non-finite values are left out of the plot)."""
        if np.isfinite(val_loss):
            self.val_steps.append(step)
            self.val_losses.append(float(val_loss))

    def write(
        self,
        directory: str | Path,
        earlier_losses: Sequence[tuple[int, float]] = (),
        earlier_val_losses: Sequence[tuple[int, float]] = (),
    ) -> list[Path]:
        """Write ``loss_curve.png`` and ``expert_load_heatmap.png`` (those with data) into ``directory``.

        ``earlier_*``: ``(step, loss)`` points of a resumed run from before this process; those
        at or after this process's first step are ignored.
        """
        directory = Path(directory)
        steps, losses = _prepend(earlier_losses, self.steps, self.losses)
        val_steps, val_losses = _prepend(earlier_val_losses, self.val_steps, self.val_losses)
        files = []
        if steps or val_steps:
            files.append(loss_curve(steps, losses, val_steps, val_losses, directory / LOSS_CURVE_FILE))
        if self.load_sum_LE is not None:
            title = f"expert load, steps {self.steps[0]}-{self.steps[-1]}"
            files.append(expert_load_heatmap(self.load_sum_LE, directory / HEATMAP_FILE, title))
        return files


def _prepend(
    earlier: Sequence[tuple[int, float]], steps: list[int], values: list[float]
) -> tuple[list[int], list[float]]:
    first = steps[0] if steps else float("inf")
    kept = sorted((s, v) for s, v in earlier if s < first)
    return [s for s, _ in kept] + steps, [v for _, v in kept] + values
