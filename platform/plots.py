"""PNG plots of a training run: the loss curve, the expert load first against last, load and bias over time.

The loss curve sets like against like: the main (next-token) training loss against the
validation loss, which is main-only too; the training objective (main + λ·MTP) has a panel of
its own. Expert-load rows are named after their layer (``layer 3``; ``MTP 1`` for the first MTP
module, layer id ``num_hidden_layers``).

Figures are drawn with matplotlib's Agg canvas directly (no ``pyplot``), so no GUI backend is
touched and the process-wide backend choice of a user's session is left as it is.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.image import AxesImage

LOSS_CURVE_FILE = "loss_curve.png"
HEATMAP_FILE = "expert_load_heatmap.png"  # first window against last window
TIMELINE_FILE = "expert_load_over_time.png"  # per layer, per expert: load and bias at every step
FIGURE_DPI = 120
LOSS_FIGSIZE_IN = (7.0, 6.0)
HEATMAP_HEIGHT_PER_LAYER_IN = 0.35
HEATMAP_MIN_HEIGHT_IN = 2.5
HEATMAP_MAX_HEIGHT_IN = 12.0
HEATMAP_WIDTH_IN = 8.0
HEATMAP_PANEL_WSPACE = 0.35  # room between side-by-side panels for the next panel's MaxVio labels
MAX_LABELLED_LAYERS = 32  # above this, the y axis keeps matplotlib's own ticks
LOAD_WINDOW_STEPS = 20  # the first and last window of the heatmap: up to this many steps each
MAX_TIME_BINS = 256  # the over-time plot keeps at most this many columns (adjacent steps merged)
MAX_TIMELINE_LAYERS = 16  # above this, the over-time plot shows evenly spaced layers (the last one kept)
TIMELINE_HEIGHT_PER_LAYER_IN = 1.6
TIMELINE_WIDTH_IN = 11.0


def layer_name(layer: int, num_hidden_layers: int) -> str:
    """``layer 3`` for a main layer, ``MTP 1`` for MTP depth 1 (layer ``num_hidden_layers``)."""
    return f"layer {layer}" if layer < num_hidden_layers else f"MTP {layer - num_hidden_layers + 1}"


def moe_layer_names(num_hidden_layers: int, first_k_dense_replace: int, num_mtp_modules: int) -> list[str]:
    """The names of a model's MoE layers in the trainers' row order: main MoE layers, then MTP modules."""
    ids = [*range(first_k_dense_replace, num_hidden_layers), *(num_hidden_layers + k for k in range(num_mtp_modules))]
    return [layer_name(layer, num_hidden_layers) for layer in ids]


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` as a PNG at ``path`` (parents created), at FIGURE_DPI, tight; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, format="png", dpi=FIGURE_DPI, bbox_inches="tight")
    return path


def loss_figure(
    steps: Sequence[int],
    main_losses: Sequence[float],
    val_steps: Sequence[int],
    val_losses: Sequence[float],
    total_losses: Sequence[float] = (),
    total_steps: Sequence[int] | None = None,
) -> Figure:
    """The main training loss against the validation loss (top), and the training objective apart (below).

    Args:
        steps, main_losses: the main (next-token) training loss at each logged optimizer step.
        val_steps, val_losses: the validation loss (main only) at the steps it was measured (may be empty).
        total_losses: the training objective (main + λ·MTP, + the auxiliary loss if any) at
            ``total_steps`` (default ``steps``); empty: no second panel.
    """
    fig = Figure(figsize=LOSS_FIGSIZE_IN if len(total_losses) else (LOSS_FIGSIZE_IN[0], LOSS_FIGSIZE_IN[1] / 1.5))
    axes = fig.subplots(2, 1, sharex=True) if len(total_losses) else [fig.add_subplot()]
    ax = axes[0]
    if len(steps):
        ax.plot(steps, main_losses, label="train (main)", linewidth=1.2)
    if len(val_steps):
        ax.plot(val_steps, val_losses, "o-", label="validation (main)", markersize=4)
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("next-token loss: train against validation")
    if len(steps) or len(val_steps):
        ax.legend()
    if len(total_losses):
        axes[1].plot(steps if total_steps is None else total_steps, total_losses, color="tab:gray", linewidth=1.2,
                     label="train objective (main + λ·MTP)")  # fmt: skip
        axes[1].set_ylabel("loss (nats/token)")
        axes[1].set_title("training objective (not comparable with validation)")
        axes[1].legend()
    for a in axes:
        a.grid(True, alpha=0.3)
    axes[-1].set_xlabel("step")
    return fig


def normalized_loads(loads_LE: np.ndarray) -> np.ndarray:
    """Per-layer load relative to the layer's mean load (1.0 = perfectly balanced; 0 where unused)."""
    loads_LE = np.asarray(loads_LE, dtype=np.float64)
    mean_L1 = loads_LE.mean(axis=1, keepdims=True)
    return np.divide(loads_LE, mean_L1, out=np.zeros_like(loads_LE), where=mean_L1 > 0)


def _row_labels(n_layers: int, layer_names: Sequence[str] | None) -> list[str]:
    """The given names when there is one per row, else the row numbers."""
    if layer_names is not None and len(layer_names) == n_layers:
        return list(layer_names)
    return [str(i) for i in range(n_layers)]


def _draw_load_panel(ax: Axes, rel_LE: np.ndarray, labels: list[str], title: str, vmax: float) -> AxesImage:
    """One layers × experts panel of relative load, its rows labelled with their name (if any) and MaxVio."""
    image = ax.imshow(rel_LE, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0.0, vmax=vmax)
    n_layers = rel_LE.shape[0]
    if n_layers <= MAX_LABELLED_LAYERS:
        max_vio_L = rel_LE.max(axis=1) - 1.0
        ax.set_yticks(range(n_layers))
        ax.set_yticklabels(
            [f"{name} (MaxVio {v:.2f})" if name else f"MaxVio {v:.2f}" for name, v in zip(labels, max_vio_L)]
        )
    ax.set_xlabel(f"routed expert (of {rel_LE.shape[1]})")
    ax.set_title(title)
    return image


def expert_load_heatmap(
    loads: np.ndarray,
    path: str | Path,
    title: str = "expert load over the run",
    layer_names: Sequence[str] | None = None,
) -> Path:
    """Draw a heatmap of per-expert load, MoE layers × experts, normalized per layer; write a PNG.

    Args:
        loads: ``[n_moe_layers, n_routed_experts]`` token counts (e.g. summed over all steps).
        path: the PNG file to write (parents are created).
        title: the figure title.
        layer_names: one name per row (``layer 3``, ``MTP 1``); None or a wrong length: row numbers.

    Each cell is load / mean load of its layer, so 1.0 is perfect balance and the row maximum
    minus one is the layer's MaxVio; the y labels show that MaxVio.
    """
    return save_figure(load_windows_figure([(title, loads)], layer_names), path)


def load_windows_figure(windows: Sequence[tuple[str, np.ndarray]], layer_names: Sequence[str] | None = None) -> Figure:
    """Heatmaps of relative load side by side (e.g. the first window and the last), on one colour scale.

    Args:
        windows: ``(title, loads [n_moe_layers, n_experts])`` per panel, all of one shape.
        layer_names: one name per row; None or a wrong length: row numbers.
    """
    rels = [normalized_loads(_as_layers_experts(loads)) for _, loads in windows]
    if len({r.shape for r in rels}) > 1:
        raise ValueError(f"every window's loads must have one shape, got {[r.shape for r in rels]}")
    n_layers, n_experts = rels[0].shape if rels else (0, 0)
    height = min(max(HEATMAP_MIN_HEIGHT_IN, HEATMAP_HEIGHT_PER_LAYER_IN * n_layers + 1.5), HEATMAP_MAX_HEIGHT_IN)
    fig = Figure(figsize=(HEATMAP_WIDTH_IN * max(len(rels), 1) * 0.75 + 2.0, height))
    axes = fig.subplots(1, max(len(rels), 1), squeeze=False, gridspec_kw={"wspace": HEATMAP_PANEL_WSPACE})[
        0
    ]  # not sharey: each panel labels its own MaxVio
    if rels and rels[0].size:
        labels = _row_labels(n_layers, layer_names)
        vmax = max(float(r.max()) for r in rels) or 1.0
        for i, (ax, rel_LE, (title, _)) in enumerate(zip(axes, rels, windows)):
            image = _draw_load_panel(ax, rel_LE, labels if i == 0 else [""] * n_layers, title, vmax)
        fig.colorbar(image, ax=list(axes), label="load / layer mean load")
    else:
        axes[0].text(0.5, 0.5, "no MoE layers", ha="center", va="center", transform=axes[0].transAxes)
        axes[0].set_xlabel(f"routed expert (of {n_experts})")
    axes[0].set_ylabel("MoE layer")
    return fig


def _as_layers_experts(loads: np.ndarray) -> np.ndarray:
    loads_LE = np.asarray(loads, dtype=np.float64)
    if loads_LE.ndim != 2:
        raise ValueError(f"loads must be [n_moe_layers, n_experts], got shape {loads_LE.shape}")
    return loads_LE


def timeline_layers(n_layers: int, max_layers: int = MAX_TIMELINE_LAYERS) -> list[int]:
    """The rows the over-time plot draws: all of them, or ``max_layers`` evenly spaced with the first and last."""
    if n_layers <= max_layers:
        return list(range(n_layers))
    return sorted({round(x) for x in np.linspace(0, n_layers - 1, max_layers)})


def timeline_figure(
    steps: Sequence[int],
    loads_TLE: np.ndarray,
    biases_TLE: np.ndarray | None,
    layer_names: Sequence[str] | None = None,
    last_step: int | None = None,
) -> Figure:
    """Per MoE layer, per expert: relative load and gate bias over time (experts × steps), one row per layer.

    Args:
        steps: the first step of each time bin ``[T]``.
        loads_TLE: ``[T, n_moe_layers, n_experts]`` tokens routed in each bin.
        biases_TLE: ``[T, n_moe_layers, n_experts]`` the gate bias at the end of each bin, or None.
        layer_names: one name per layer; None or a wrong length: row numbers.
        last_step: the last step of the last bin (default: that bin's first step).

    Load is load / the layer's mean load in that bin (1.0 balanced); the bias panel is centred
    on 0 (red: raised, so the expert is chosen more; blue: lowered).
    """
    loads_TLE = np.asarray(loads_TLE, dtype=np.float64)
    if loads_TLE.ndim != 3 or loads_TLE.shape[0] != len(steps):
        raise ValueError(f"loads must be [len(steps)={len(steps)}, n_moe_layers, n_experts], got {loads_TLE.shape}")
    has_bias = biases_TLE is not None and np.asarray(biases_TLE).shape == loads_TLE.shape
    _, n_layers, n_experts = loads_TLE.shape
    rows = timeline_layers(n_layers)
    labels = _row_labels(n_layers, layer_names)
    n_cols = 2 if has_bias else 1
    fig = Figure(figsize=(TIMELINE_WIDTH_IN if has_bias else TIMELINE_WIDTH_IN / 1.8,
                          max(HEATMAP_MIN_HEIGHT_IN, TIMELINE_HEIGHT_PER_LAYER_IN * len(rows) + 1.0)))  # fmt: skip
    axes = fig.subplots(max(len(rows), 1), n_cols, sharex=True, squeeze=False)
    last = (steps[-1] if last_step is None else last_step) + 1 if len(steps) else 1
    extent = (steps[0] if len(steps) else 0, last, n_experts - 0.5, -0.5)
    for r, layer in enumerate(rows):
        rel_EL = normalized_loads(loads_TLE[:, layer, :]).T  # [experts, time]
        image = axes[r, 0].imshow(rel_EL, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0.0,
                                  extent=extent)  # fmt: skip
        fig.colorbar(image, ax=axes[r, 0], label="load / mean")
        axes[r, 0].set_ylabel(f"{labels[layer]}\nexpert")
        if has_bias:
            bias_ET = np.asarray(biases_TLE, dtype=np.float64)[:, layer, :].T
            span = float(np.abs(bias_ET).max()) or 1e-3
            image = axes[r, 1].imshow(bias_ET, aspect="auto", interpolation="nearest", cmap="coolwarm", vmin=-span,
                                      vmax=span, extent=extent)  # fmt: skip
            fig.colorbar(image, ax=axes[r, 1], label="bias")
    axes[0, 0].set_title("load per expert over time")
    if has_bias:
        axes[0, 1].set_title("gate bias per expert over time")
    for ax in axes[-1]:
        ax.set_xlabel("step")
    shown = "" if len(rows) == n_layers else f" ({len(rows)} of {n_layers} layers)"
    fig.suptitle(f"expert load and bias, steps {extent[0]}-{last - 1}{shown}")
    return fig


class TimeBins:
    """Per-step loads and biases merged into at most ``max_bins`` bins of equal width (in steps).

    When a new bin would exceed ``max_bins``, adjacent pairs merge and the width doubles, so
    memory stays bounded however long the run is. A bin holds the loads summed over its steps
    and the bias of its last step."""

    def __init__(self, max_bins: int = MAX_TIME_BINS) -> None:
        self.max_bins = max_bins
        self.width = 1
        self.starts: list[int] = []
        self.counts: list[int] = []
        self.loads: list[np.ndarray] = []
        self.biases: list[np.ndarray | None] = []

    def add(self, step: int, loads_LE: np.ndarray, biases_LE: np.ndarray | None) -> None:
        """One step's loads ``[L, E]`` (added to its bin) and biases after it (the bin's, until a later step)."""
        if self.counts and self.counts[-1] < self.width:
            self.counts[-1] += 1
            self.loads[-1] = self.loads[-1] + loads_LE
            self.biases[-1] = biases_LE
            return
        if len(self.starts) == self.max_bins:
            self._merge_pairs()
            self.add(step, loads_LE, biases_LE)
            return
        self.starts.append(step)
        self.counts.append(1)
        self.loads.append(loads_LE.copy())
        self.biases.append(biases_LE)

    def _merge_pairs(self) -> None:
        self.width *= 2
        n = len(self.starts)
        self.starts = self.starts[::2]
        self.counts = [sum(self.counts[i : i + 2]) for i in range(0, n, 2)]
        self.loads = [sum(self.loads[i : i + 2]) for i in range(0, n, 2)]
        self.biases = [self.biases[min(i + 1, n - 1)] for i in range(0, n, 2)]

    def arrays(self) -> tuple[list[int], np.ndarray, np.ndarray | None]:
        """``(bin start steps [T], loads [T, L, E], biases [T, L, E] or None when a bin has none)``."""
        loads = np.stack(self.loads) if self.loads else np.zeros((0, 0, 0))
        biases = np.stack(self.biases) if self.biases and all(b is not None for b in self.biases) else None
        return list(self.starts), loads, biases


@dataclass
class RunHistory:
    """What the plots of one run need, gathered step by step (see :meth:`write`).

    ``layer_names`` names the rows of the loads (:func:`moe_layer_names`); the training loop
    sets it. Memory is bounded: the loads are kept summed, per window and in merged time bins.
    """

    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)  # the training objective, main + λ·MTP
    main_losses: list[float] = field(default_factory=list)  # the next-token loss, what validation measures
    val_steps: list[int] = field(default_factory=list)
    val_losses: list[float] = field(default_factory=list)
    load_sum_LE: np.ndarray | None = None  # [n_moe_layers, n_experts] tokens routed, summed over steps
    layer_names: list[str] | None = None
    load_steps: int = 0  # steps whose loads were kept
    first_loads: list[tuple[int, np.ndarray]] = field(default_factory=list)  # the first LOAD_WINDOW_STEPS
    last_loads: deque = field(default_factory=lambda: deque(maxlen=LOAD_WINDOW_STEPS))  # (step, loads [L, E])
    timeline: TimeBins = field(default_factory=TimeBins)

    def add_step(
        self,
        step: int,
        loss: float,
        loads_LE: np.ndarray,
        main_loss: float | None = None,
        biases_LE: np.ndarray | None = None,
    ) -> None:
        """One optimizer step: its losses, its per-expert loads and the gate biases after it."""
        self.steps.append(step)
        self.losses.append(float(loss))
        self.main_losses.append(float(loss if main_loss is None else main_loss))
        loads_LE = np.asarray(loads_LE, dtype=np.float64)
        if loads_LE.ndim != 2:
            return
        if self.load_sum_LE is None:
            self.load_sum_LE = np.zeros_like(loads_LE)
        if self.load_sum_LE.shape != loads_LE.shape:  # a changed shape keeps the first one's totals
            return
        self.load_sum_LE += loads_LE
        self.load_steps += 1
        if len(self.first_loads) < LOAD_WINDOW_STEPS:
            self.first_loads.append((step, loads_LE.copy()))
        self.last_loads.append((step, loads_LE.copy()))
        biases = None if biases_LE is None else np.asarray(biases_LE, dtype=np.float64)
        self.timeline.add(step, loads_LE, biases if biases is not None and biases.shape == loads_LE.shape else None)

    def add_eval(self, step: int, val_loss: float) -> None:
        """A validation loss (non-finite values are left out of the plot)."""
        if np.isfinite(val_loss):
            self.val_steps.append(step)
            self.val_losses.append(float(val_loss))

    def windows(self) -> list[tuple[str, np.ndarray]]:
        """The first and the last window of loads, ``(title, loads [L, E])``: LOAD_WINDOW_STEPS steps
        each, fewer in a run of under twice that, so that the two do not overlap."""
        if not self.first_loads:
            return []
        width = max(1, min(LOAD_WINDOW_STEPS, self.load_steps // 2))
        first, last = self.first_loads[:width], list(self.last_loads)[-width:]
        return [
            (f"first {width} steps ({first[0][0]}-{first[-1][0]})", sum(loads for _, loads in first)),
            (f"last {width} steps ({last[0][0]}-{last[-1][0]})", sum(loads for _, loads in last)),
        ]

    def write(
        self,
        directory: str | Path,
        earlier_losses: Sequence[tuple[int, float]] = (),
        earlier_val_losses: Sequence[tuple[int, float]] = (),
        earlier_main_losses: Sequence[tuple[int, float]] = (),
    ) -> list[Path]:
        """Write the loss curve, the first/last-window heatmap and the over-time plot (those with data).

        ``earlier_*``: ``(step, loss)`` points of a resumed run from before this process; those
        at or after this process's first step are ignored. The load plots cover this process's steps.
        """
        directory = Path(directory)
        steps, main_losses = _prepend(earlier_main_losses, self.steps, self.main_losses)
        total_steps, losses = _prepend(earlier_losses, self.steps, self.losses)
        val_steps, val_losses = _prepend(earlier_val_losses, self.val_steps, self.val_losses)
        files = []
        if steps or val_steps:
            if losses == main_losses:  # no MTP or auxiliary term: the objective is the main loss
                losses = []
            fig = loss_figure(steps, main_losses, val_steps, val_losses, total_losses=losses, total_steps=total_steps)
            files.append(save_figure(fig, directory / LOSS_CURVE_FILE))
        if self.load_sum_LE is not None and self.first_loads:
            fig = load_windows_figure(self.windows(), self.layer_names)
            files.append(save_figure(fig, directory / HEATMAP_FILE))
            fig = timeline_figure(*self.timeline.arrays(), self.layer_names, last_step=self.steps[-1])
            files.append(save_figure(fig, directory / TIMELINE_FILE))
        return files


def _prepend(
    earlier: Sequence[tuple[int, float]], steps: list[int], values: list[float]
) -> tuple[list[int], list[float]]:
    first = steps[0] if steps else float("inf")
    kept = sorted((s, v) for s, v in earlier if s < first)
    return [s for s, _ in kept] + steps, [v for _, v in kept] + values


def finetune_figure(series: dict[str, dict[str, Sequence[tuple[int, float]]]]) -> Figure:
    """What fine-tuning does, per method: one panel per metric (e.g. the general loss and the mean effective
    experts), a line per method. ``series[metric][method]`` is [(step, value)]."""
    fig = Figure(figsize=(5.2 * len(series), 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    for ax, (metric, by_method) in zip(fig.subplots(1, len(series), squeeze=False)[0], series.items()):
        for method, points in by_method.items():
            if points:
                steps, values = zip(*sorted(points))
                ax.plot(steps, values, marker="." if len(points) < 12 else None, label=method)
        ax.set_title(metric)
        ax.set_xlabel("fine-tuning step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return fig
