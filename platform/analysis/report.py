"""The expert analysis as one self-contained HTML page: tables, and the PNG figures inlined as base64."""

from __future__ import annotations

import base64
import html
from collections.abc import Callable
from pathlib import Path
from typing import Any

TOKENS_SHOWN = 6  # per expert in the vocabulary tables
STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.5em; text-align: right; }
th { background: #f3f3f3; } td.text { text-align: left; font-family: ui-monospace, monospace; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
code { background: #f3f3f3; padding: 0 0.2em; }
"""


def annotate_tokens(layers: list[dict], decode: Callable[[int], str]) -> None:
    """Add each top token's text (``decode(id)``) to the vocabulary entries of ``layers``, in place."""
    for entry in layers:
        for kind in entry["vocab"].values():
            for tokens in kind["top_tokens"].values():
                for t in tokens:
                    if len(t) == 3:
                        t.append(decode(int(t[0])))


def _table(header: list[str], rows: list[list[Any]], text_columns: tuple[int, ...] = ()) -> str:
    def cell(i: int, v: Any) -> str:
        shown = f"{v:.4f}" if isinstance(v, float) else html.escape(str(v))
        return f'<td class="text">{shown}</td>' if i in text_columns else f"<td>{shown}</td>"

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(cell(i, v) for i, v in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _image(path: Path, alt: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _tokens(tokens: list[list[Any]]) -> str:
    return "  ".join(f"{t[3]!r} {100 * t[1]:.0f}% ({t[2]})" if len(t) > 3 else f"{t[0]} {100 * t[1]:.0f}%"
                     for t in tokens[:TOKENS_SHOWN])  # fmt: skip


def html_report(report: dict, figures: dict[str, Path]) -> str:
    """The page: what was analyzed, the balance table, each figure, the ablation, saturation and vocabulary tables."""
    layers, model = report["layers"], report["model"]
    domains = list(layers[0]["domains"])
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>raymoe analyze experts</title>"
             f"<style>{STYLE}</style></head><body>",
             "<h1>raymoe analyze experts</h1>",
             f"<p>checkpoint <code>{html.escape(str(report['checkpoint']))}</code> (step {report.get('step')}), "
             f"{model['n_routed_experts']} routed experts, top-{model['num_experts_per_tok']}, "
             f"runner {html.escape(str(report['runner']))}, {report['seconds']:.1f} s.</p>"]  # fmt: skip
    parts.append("<h2>Domains</h2>" + _table(
        ["domain", "source", "tokens", "loss"],
        [[d, info["source"], info["tokens"], (report.get("ablation") or {}).get("plain", {}).get(d, "")]
         for d, info in report["domains"].items()]))  # fmt: skip
    header = ["layer", "MaxVio", "entropy (nats)", "effective experts"] + [f"eff. {d}" for d in domains]
    rows = [[e["name"], e["maxvio"], e["entropy"], e["effective_experts"],
             *[e["domains"][d]["effective_experts"] for d in domains]] for e in layers]  # fmt: skip
    parts.append("<h2>Load and balance</h2>" + _table(header, rows))
    for name in ("load", "balance", "domain_specialization", "vocab_specialization", "coactivation"):
        if name in figures:
            parts.append(f"<h3>{name.replace('_', ' ')}</h3>" + _image(figures[name], name))
    if report.get("ablation"):
        ab = report["ablation"]
        rows = [[f"top of {mask}", d, *losses] for mask, by in ab["top"].items() for d, losses in by.items()]
        rows += [["random", d, *losses] for d, losses in ab["random"].items()]
        parts.append("<h2>Masking ablation</h2><p>Loss per domain with the given experts of every main MoE layer "
                     "masked (the gate routes among the others); columns: experts masked per layer.</p>"
                     + _table(["masked", "loss on", *[str(n) for n in ab["masked_experts"]]], rows))  # fmt: skip
        if "masking_ablation" in figures:
            parts.append(_image(figures["masking_ablation"], "masking ablation"))
    if report.get("saturation"):
        sat = report["saturation"]
        rows = [[name, *values] for name, values in sat["layers"].items()] + [["mean", *sat["mean"]]]
        parts.append(f"<h2>Router saturation</h2><p>Against step {sat['final_step']}.</p>"
                     + _table(["layer", *[str(s) for s in sat["steps"]]], rows))  # fmt: skip
        if "saturation" in figures:
            parts.append(_image(figures["saturation"], "router saturation"))
    parts.append("<h2>Vocabulary specialization</h2><p>Per expert, the tokens most often routed to it: "
                 "token, N(x, e)/N(x), (N(x)).</p>")  # fmt: skip
    for e in layers:
        kinds = list(e["vocab"])
        rows = [[expert, *[_tokens(e["vocab"][k]["top_tokens"].get(str(expert), [])) for k in kinds]]
                for expert in range(model["n_routed_experts"])]  # fmt: skip
        summary = ", ".join(f"{k} {100 * e['vocab'][k]['mean_max_specialization']:.1f}%" for k in kinds)
        parts.append(f"<h3>{e['name']} (mean max specialization: {summary})</h3>"
                     + _table(["expert", *[f"{k} tokens" for k in kinds]], rows, text_columns=(1, 2)))  # fmt: skip
    parts.append("</body></html>")
    return "\n".join(parts)
