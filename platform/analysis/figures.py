"""PNG figures of an expert analysis (the report of :mod:`raymoe.pipelines.analyze`), drawn on matplotlib's Agg canvas.

Each function takes the JSON-ready report (``layers``: :func:`~raymoe.platform.analysis.experts.routing_report`;
``saturation``; ``ablation``) and writes one PNG; :func:`write_figures` writes every figure there is data for.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from raymoe.platform.plots import save_figure

PANEL_HEIGHT_IN = 2.2
PANEL_WIDTH_IN = 8.0
SQUARE_PANEL_IN = 4.0
MAX_PANELS_PER_ROW = 3
LINESTYLES = ("-", "--", ":", "-.")


def _panels(n: int, width: float, height: float, ncols: int = 1) -> tuple[Figure, list[Any]]:
    ncols = max(1, min(ncols, n))
    nrows = max(1, -(-n // ncols))
    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).reshape(-1)
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, list(axes[:n])


def domain_specialization_figure(layers: list[dict], path: str | Path) -> Path:
    """Per MoE layer a heatmap domains × experts of N(e, D)/N(D) in % (uniform: 100·K/E)."""
    fig, axes = _panels(len(layers), PANEL_WIDTH_IN, PANEL_HEIGHT_IN)
    for ax, entry in zip(axes, layers):
        domains = list(entry["domain_specialization"])
        values = 100 * np.array([entry["domain_specialization"][d] for d in domains])
        image = ax.imshow(values, aspect="auto", interpolation="nearest", cmap="magma", vmin=0.0)
        fig.colorbar(image, ax=ax, label="% of domain tokens")
        ax.set_yticks(range(len(domains)), domains)
        ax.set_title(f"{entry['name']}: domain specialization N(e, D)/N(D)", fontsize=9)
        ax.set_xlabel("routed expert")
    return save_figure(fig, path)


def coactivation_figure(layers: list[dict], path: str | Path) -> Path:
    """Per MoE layer the co-activation matrix N(e_i, e_j)/N(e_i) in % (row i, column j)."""
    fig, axes = _panels(len(layers), SQUARE_PANEL_IN, SQUARE_PANEL_IN, MAX_PANELS_PER_ROW)
    for ax, entry in zip(axes, layers):
        image = ax.imshow(100 * np.array(entry["coactivation"]), interpolation="nearest", cmap="Reds", vmin=0.0)
        fig.colorbar(image, ax=ax, shrink=0.8, label="%")
        ax.set_title(f"{entry['name']}: co-activation", fontsize=9)
        ax.set_xlabel("expert j")
        ax.set_ylabel("expert i")
    return save_figure(fig, path)


def load_figure(layers: list[dict], path: str | Path) -> Path:
    """Heatmap MoE layers × experts of load / mean load over all domains, each row named with its MaxVio
    and effective number of experts."""
    rel = np.array([np.array(e["load"]) / max(np.mean(e["load"]), 1e-12) for e in layers])
    fig = Figure(figsize=(PANEL_WIDTH_IN, 1.5 + 0.4 * len(layers)), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(rel, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0.0)
    fig.colorbar(image, ax=ax, label="load / layer mean load")
    ax.set_yticks(
        range(len(layers)),
        [f"{e['name']} (MaxVio {e['maxvio']:.2f}, eff. {e['effective_experts']:.1f})" for e in layers],
    )
    ax.set_xlabel("routed expert")
    ax.set_title("expert load, all domains")
    return save_figure(fig, path)


def balance_figure(layers: list[dict], n_experts: int, path: str | Path) -> Path:
    """Effective number of experts exp(H) per MoE layer and domain (bars), E dashed."""
    domains = list(layers[0]["domains"])
    fig = Figure(figsize=(PANEL_WIDTH_IN, 3.5), layout="constrained")
    ax = fig.add_subplot()
    width = 0.8 / max(len(domains), 1)
    x = np.arange(len(layers))
    for i, d in enumerate(domains):
        ax.bar(x + i * width, [e["domains"][d]["effective_experts"] for e in layers], width, label=d)
    ax.axhline(n_experts, color="grey", linestyle="--", linewidth=1, label=f"E = {n_experts}")
    ax.set_xticks(x + width * (len(domains) - 1) / 2, [e["name"] for e in layers])
    ax.set_ylabel("effective experts exp(H)")
    ax.set_title("routing entropy as an effective number of experts")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def vocab_figure(layers: list[dict], path: str | Path) -> Path:
    """Mean over tokens of max_e N(x, e)/N(x) per MoE layer, for input and predicted tokens."""
    kinds = [k for k in ("input", "predicted") if all(k in e["vocab"] for e in layers)]
    fig = Figure(figsize=(PANEL_WIDTH_IN, 3.5), layout="constrained")
    ax = fig.add_subplot()
    x = np.arange(len(layers))
    for i, kind in enumerate(kinds):
        ax.bar(x + 0.4 * i, [100 * e["vocab"][kind]["mean_max_specialization"] for e in layers], 0.4,
               label=f"{kind} token")  # fmt: skip
    ax.set_xticks(x + 0.2 * (len(kinds) - 1), [e["name"] for e in layers])
    ax.set_ylim(0, 100)
    ax.set_ylabel("mean max_e N(x, e)/N(x) (%)")
    ax.set_title("vocabulary specialization")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def saturation_figure(saturation: dict, path: str | Path) -> Path:
    """Router saturation (%) of each checkpoint against the final one, per layer and their mean."""
    fig = Figure(figsize=(PANEL_WIDTH_IN, 4.0), layout="constrained")
    ax = fig.add_subplot()
    steps = saturation["steps"]
    for i, (name, values) in enumerate(saturation["layers"].items()):
        ax.plot(steps, [100 * v for v in values], marker="o", markersize=3,
                linestyle=LINESTYLES[i % len(LINESTYLES)], label=name)  # fmt: skip
    ax.plot(steps, [100 * v for v in saturation["mean"]], color="black", linewidth=2, label="mean")
    ax.set_xlabel("checkpoint step")
    ax.set_ylabel("top-k matching the final checkpoint (%)")
    ax.set_ylim(0, 105)
    ax.set_title(f"router saturation against step {saturation['final_step']}")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def ablation_figure(ablation: dict, path: str | Path) -> Path:
    """Per evaluated domain: the loss against the fraction of experts masked, for each domain's most-routed
    experts (solid) and random experts (dashed)."""
    domains = list(ablation["plain"])
    fig, axes = _panels(len(domains), SQUARE_PANEL_IN, 3.2, MAX_PANELS_PER_ROW)
    ratios = [100 * r for r in ablation["ratios"]]
    for ax, d in zip(axes, domains):
        for mask, by_domain in ablation["top"].items():
            ax.plot(ratios, by_domain[d], marker="o", markersize=3, label=f"top experts of {mask}")
        ax.plot(ratios, ablation["random"][d], color="grey", linestyle="--", marker="x", label="random experts")
        ax.set_title(f"loss on {d}", fontsize=9)
        ax.set_xlabel("experts masked per layer (%)")
        ax.set_ylabel("loss (nats/token)")
        ax.legend(fontsize=7)
    return save_figure(fig, path)


def write_figures(report: dict, directory: str | Path) -> dict[str, Path]:
    """Every figure the report has data for, as PNG files in ``directory``: name -> path."""
    directory = Path(directory)
    layers = report["layers"]
    out = {
        "load": load_figure(layers, directory / "load.png"),
        "balance": balance_figure(layers, report["model"]["n_routed_experts"], directory / "balance.png"),
        "domain_specialization": domain_specialization_figure(layers, directory / "domain_specialization.png"),
        "vocab_specialization": vocab_figure(layers, directory / "vocab_specialization.png"),
        "coactivation": coactivation_figure(layers, directory / "coactivation.png"),
    }
    if report.get("saturation"):
        out["saturation"] = saturation_figure(report["saturation"], directory / "saturation.png")
    if report.get("ablation"):
        out["masking_ablation"] = ablation_figure(report["ablation"], directory / "masking_ablation.png")
    return out
