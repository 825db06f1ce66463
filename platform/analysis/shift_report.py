"""The figures and the self-contained HTML page of a shift analysis (:mod:`raymoe.platform.analysis.shift`)."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from raymoe.platform.analysis.figures import LINESTYLES, PANEL_HEIGHT_IN, PANEL_WIDTH_IN, _panels
from raymoe.platform.analysis.report import STYLE, _image, _table
from raymoe.platform.plots import save_figure


def _label(report: dict[str, Any], role: str) -> str:
    return f"{'D1' if role == 'in' else 'D2'} {report['domains'][role]['name']}"


def maxvio_figure(report: dict[str, Any], path: str | Path) -> Path:
    """MaxVio_global on the held-out D2 over the continued training (mean over the main MoE layers, bold; each
    layer thin), each step's own training batch (grey), the frozen in-domain level and the threshold."""
    ad = report["adapting"]
    s = ad["held_out"]
    fig = Figure(figsize=(PANEL_WIDTH_IN, 4.0), layout="constrained")
    ax = fig.add_subplot()
    for i, (name, values) in enumerate(s["maxvio"].items()):
        ax.plot(s["steps"], values, linewidth=0.8, linestyle=LINESTYLES[i % len(LINESTYLES)], label=f"{name}")
    ax.plot(s["steps"], s["maxvio_mean"], color="black", linewidth=2, marker="o", markersize=3,
            label=f"mean on held-out {_label(report, 'out')}")  # fmt: skip
    train = ad["train"]["maxvio_mean"]
    ax.plot(range(1, len(train) + 1), train, color="grey", alpha=0.6, linewidth=0.8, label="training batch (mean)")
    ax.axhline(ad["reference"], color="tab:blue", linestyle="--",
               label=f"{_label(report, 'in')}, frozen ({ad['reference']:.3f})")  # fmt: skip
    ax.axhline(ad["threshold"], color="tab:blue", linestyle=":", label=f"× (1 + {ad['tolerance']:g})")
    back = ad["steps_to_rebalance"]
    if back is not None:
        ax.axvline(back, color="tab:green", linestyle="-", alpha=0.5, label=f"balance back at step {back}")
    ax.set_xlabel(f"continued-training step on {report['domains']['out']['name']} (γ = {ad['gamma']:g})")
    ax.set_ylabel("MaxVio_global")
    ax.set_ylim(bottom=0)
    ax.set_title("balance under the shift, bias adapting")
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def loads_figure(report: dict[str, Any], path: str | Path) -> Path:
    """Per MoE layer the load distribution p_e (%) of D1 and D2 with the bias frozen (bars) and of D2 after the
    continued training (step line), titled with MaxVio_global and the overlap."""
    layers = report["frozen"]["layers"]
    after = {e["layer"]: e for e in (report.get("adapting") or {}).get("layers_after", [])}
    fig, axes = _panels(len(layers), PANEL_WIDTH_IN, PANEL_HEIGHT_IN + 0.4)
    for ax, e in zip(axes, layers):
        x = np.arange(len(e["in"]["distribution"]))
        for i, role in enumerate(("in", "out")):
            ax.bar(x - 0.2 + 0.4 * i, 100 * np.array(e[role]["distribution"]), 0.4, label=_label(report, role))
        title = (f"{e['name']}: MaxVio {e['in']['maxvio']:.2f} / {e['out']['maxvio']:.2f}, "
                 f"overlap {e['overlap']:.3f}")  # fmt: skip
        if e["layer"] in after:
            a = after[e["layer"]]
            label = f"{report['domains']['out']['name']} after {report['adapting']['steps']} steps"
            edges = np.arange(len(x) + 1) - 0.5
            ax.stairs(100 * np.array(a["out"]["distribution"]), edges, color="black", linewidth=1, label=label)
            title += f"; after: MaxVio {a['out']['maxvio']:.2f}, overlap {a['overlap']:.3f}"
        ax.axhline(100 / len(x), color="grey", linestyle=":", linewidth=0.8)
        ax.set_title(title, fontsize=8)
        ax.set_xlabel("routed expert")
        ax.set_ylabel("% of routed tokens")
        ax.legend(fontsize=6)
    return save_figure(fig, path)


def write_figures(report: dict[str, Any], directory: str | Path) -> dict[str, Path]:
    """Every figure the report has data for, as PNG files in ``directory``: name -> path."""
    directory = Path(directory)
    out = {"shift_loads": loads_figure(report, directory / "shift_loads.png")}
    if report.get("adapting"):
        out["shift_maxvio"] = maxvio_figure(report, directory / "shift_maxvio.png")
    return out


def html_page(report: dict[str, Any], figures: dict[str, Path]) -> str:
    """The page: what was analyzed, the frozen-bias table, the continued training's result, the figures."""
    d, fr, ad = report["domains"], report["frozen"], report.get("adapting")
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>raymoe analyze shift</title>"
             f"<style>{STYLE}</style></head><body><h1>raymoe analyze shift</h1>",
             f"<p>checkpoint <code>{html.escape(str(report['checkpoint']))}</code> (step {report.get('step')}), "
             f"{report['model']['n_routed_experts']} routed experts, top-{report['model']['num_experts_per_tok']}, "
             f"runner {html.escape(str(report['runner']))}, {report['seconds']:.1f} s.</p>",
             "<h2>Domains</h2>" + _table(["", "domain", "source", "held-out sequences", "tokens"],
                                         [[r, d[r]["name"], d[r]["source"], d[r]["sequences"], d[r]["tokens"]]
                                          for r in ("in", "out")], text_columns=(2,)),
             "<h2>Bias frozen (as served)</h2><p>MaxVio_global over the held-out set; overlap "
             "Σ_e min(p1_e, p2_e) of the load distributions (1: the same, 0: disjoint).</p>"]  # fmt: skip
    after = {e["layer"]: e for e in (ad or {}).get("layers_after", [])}
    header = ["layer", "MaxVio D1", "MaxVio D2", "overlap", "eff. experts D1", "eff. experts D2"]
    if ad:
        header += [f"MaxVio D2 after {ad['steps']}", "overlap after"]
    rows = []
    for e in fr["layers"]:
        row = [e["name"], e["in"]["maxvio"], e["out"]["maxvio"], e["overlap"], e["in"]["effective_experts"],
               e["out"]["effective_experts"]]  # fmt: skip
        if ad:
            row += [after[e["layer"]]["out"]["maxvio"], after[e["layer"]]["overlap"]]
        rows.append(row)
    rows.append(["mean (main)", fr["maxvio_in"], fr["maxvio_out"], fr["overlap"], "", "", *([""] * (2 if ad else 0))])
    parts.append(_table(header, rows))
    if ad:
        back = ad["steps_to_rebalance"]
        said = f"after <b>{back}</b> steps" if back is not None else f"<b>not within {ad['steps']} steps</b>"
        if back is not None and ad["balanced_from"] != back:
            stays = ad["balanced_from"]
            said += f" (and stays back from step {stays})" if stays is not None else " (and does not stay back)"
        parts.append(f"<h2>Bias adapting (continued training on {html.escape(d['out']['name'])})</h2>"
                     f"<p>{ad['steps']} steps of {ad['train_batch']} sequences, lr {ad['lr']:g}, γ {ad['gamma']:g}. "
                     f"Balance returns (mean MaxVio_global on D2 ≤ {ad['reference']:.4f} × (1 + {ad['tolerance']:g})"
                     f" = {ad['threshold']:.4f}) {said}. Loss on D2 {ad['held_out']['loss'][0]:.3f} → "
                     f"{ad['held_out']['loss'][-1]:.3f}; on D1 {fr['loss_in']:.3f} → {ad['in_after']['loss']:.3f}."
                     "</p>")  # fmt: skip
        s = ad["held_out"]
        parts.append(_table(["step", "mean MaxVio D2", *s["maxvio"], "loss D2"],
                            [[st, s["maxvio_mean"][i], *[v[i] for v in s["maxvio"].values()], s["loss"][i]]
                             for i, st in enumerate(s["steps"])]))  # fmt: skip
    for name in ("shift_maxvio", "shift_loads"):
        if name in figures:
            parts.append(_image(figures[name], name))
    parts.append("</body></html>")
    return "\n".join(parts)
