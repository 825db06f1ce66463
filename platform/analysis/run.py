"""One expert analysis of a checkpoint, end to end: the library behind ``raymoe analyze experts``.

:func:`analyze_experts` routes every domain's sequences through a
:class:`~raymoe.platform.analysis.experts.RoutingSource` (the caller says how to build one for a
checkpoint location: the local engine or the actor graph), computes the routing metrics, the
masking ablation and the router saturation over the run's checkpoints, and returns the JSON-ready
report; :func:`write_outputs` writes it as JSON, PNG figures and one self-contained HTML page;
:func:`log_to_mlflow` logs all of it as an MLflow run of its own.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from raymoe.platform.analysis.experts import (
    Batch,
    RoutingSource,
    ablation_ratios,
    masking_ablation,
    routing_report,
    saturation_report,
)
from raymoe.platform.analysis.figures import write_figures
from raymoe.platform.analysis.metrics import max_mask_ratio
from raymoe.platform.analysis.options import AnalysisError, ExpertsConfig
from raymoe.platform.analysis.report import html_report
from raymoe.platform.checkpoint.layout import CHECKPOINTS_DIR, STEP_DIR_RE, run_checkpoints
from raymoe.platform.config import ModelConfig, TrackingConfig

logger = logging.getLogger(__name__)

REPORT_FILE = "experts.json"
HTML_FILE = "report.html"
FIGURES_DIR = "figures"


def check_routing_layers(model: ModelConfig, location: str) -> None:
    """AnalysisError when the checkpoint's model routes nothing (no routed experts, or only dense layers)."""
    mtp_moe = model.num_nextn_predict_layers if model.n_routed_experts > 0 else 0
    if model.n_routed_experts <= 0 or (model.num_moe_layers <= 0 and mtp_moe == 0):
        raise AnalysisError(
            f"checkpoint {location} has no routing layers (n_routed_experts={model.n_routed_experts}, "
            f"{model.num_hidden_layers} layers of which first_k_dense_replace={model.first_k_dense_replace} "
            "are dense): there is no routing to analyze"
        )


def checkpoints_of_run(location: str) -> list[tuple[int, str]]:
    """The checkpoints of the run that training checkpoint ``location`` belongs to, up to it: (step, location).

    ``location`` is ``ROOT/checkpoints/step_N``; a checkpoint elsewhere is a run of one."""
    parts = str(location).rstrip("/").rsplit("/", 2)
    m = STEP_DIR_RE.match(parts[-1]) if len(parts) == 3 else None
    if m is None or parts[1] != CHECKPOINTS_DIR:
        return []
    step = int(m.group(1))
    return [(s, loc) for s, loc in run_checkpoints(parts[0]) if s <= step]


def _first(batches: list[Batch], sequences: int) -> list[Batch]:
    """The first ``sequences`` sequences of ``batches`` (whole batches, the last one cut)."""
    out, n = [], 0
    for ids, labels in batches:
        if n >= sequences:
            break
        take = min(ids.shape[0], sequences - n)
        out.append((ids[:take], labels[:take]))
        n += take
    return out


def analyze_experts(
    location: str,
    step: int | None,
    model: ModelConfig,
    domains: dict[str, list[Batch]],
    sources: dict[str, str],
    make_source: Callable[[str], RoutingSource],
    cfg: ExpertsConfig,
    runner: str = "local",
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """The report of one checkpoint: routing metrics per MoE layer, masking ablation, router saturation.

    Args:
        location: the checkpoint (resolved); ``step`` its training step (None for a Hugging Face one).
        model: its model config.
        domains: name -> (input_ids, labels) batches; ``sources`` name -> where its text came from.
        make_source: builds the RoutingSource of a checkpoint location (closed here after use).
        cfg: sizes and options.
        runner: what ``make_source`` runs on (for the report).
        progress: called with a short note after each piece of work.
    """
    cfg.validate()
    check_routing_layers(model, location)
    note = progress or (lambda _what: None)
    t0 = time.perf_counter()
    E = model.n_routed_experts
    source = make_source(location)
    run = checkpoints_of_run(location) if cfg.saturation_sequences > 0 else []
    sat_batches = {d: _first(b, cfg.saturation_sequences) for d, b in domains.items()}
    by_step: dict[int, list] = {}
    try:
        records = {}
        for name, batches in domains.items():
            records[name] = source.record(batches)
            note(f"routed {name}")
        layers = routing_report(records, E, cfg.min_count, cfg.top_tokens)
        ablation = None
        if cfg.ablation_sequences > 0:
            limit = max_mask_ratio(E, model.num_experts_per_tok, model.n_group, model.topk_group)
            ratios = ablation_ratios(cfg.ratios, E, limit)
            main = [e for e in layers if e["layer"] < model.num_hidden_layers]
            loads = {d: {e["layer"]: torch.tensor(e["domains"][d]["load"]) for e in main} for d in domains}
            subset = {d: _first(b, cfg.ablation_sequences) for d, b in domains.items()}
            ablation = masking_ablation(source, subset, loads, ratios, E, cfg.seed, lambda: note("ablation"))
            ablation["max_ratio"] = limit
        if run:
            by_step[run[-1][0]] = [r for d in sat_batches for r in source.record(sat_batches[d])]
    finally:
        source.close()
    for s, loc in run[:-1]:  # the run's earlier checkpoints route the same sequences
        earlier = make_source(loc)
        try:
            by_step[s] = [r for d in sat_batches for r in earlier.record(sat_batches[d])]
        finally:
            earlier.close()
        note(f"routed step {s}")
    saturation = saturation_report(by_step) if by_step else None
    return {
        "checkpoint": location, "step": step, "runner": runner, "config": asdict(cfg),
        "model": {"n_routed_experts": E, "num_experts_per_tok": model.num_experts_per_tok,
                  "num_hidden_layers": model.num_hidden_layers, "first_k_dense_replace": model.first_k_dense_replace,
                  "num_nextn_predict_layers": model.num_nextn_predict_layers, "n_group": model.n_group,
                  "topk_group": model.topk_group},
        "domains": {d: {"source": sources.get(d, ""), "sequences": sum(b[0].shape[0] for b in batches),
                        "tokens": sum(b[0].numel() for b in batches)} for d, batches in domains.items()},
        "layers": layers, "ablation": ablation, "saturation": saturation,
        "seconds": time.perf_counter() - t0,
    }  # fmt: skip


def write_outputs(report: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """``experts.json``, ``figures/*.png`` and ``report.html`` (figures inlined) in ``out_dir``: name -> path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures = write_figures(report, out / FIGURES_DIR)
    (out / REPORT_FILE).write_text(json.dumps(report, indent=1))
    (out / HTML_FILE).write_text(html_report(report, figures), encoding="utf-8")
    return {"json": out / REPORT_FILE, "html": out / HTML_FILE, **figures}


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_").lower()


def report_metrics(report: dict[str, Any]) -> list[tuple[dict[str, float], int]]:
    """The report's numbers as MLflow metrics: (values, step) groups."""
    values: dict[str, float] = {}
    for e in report["layers"]:
        n = _slug(e["name"])
        values |= {f"maxvio/{n}": e["maxvio"], f"entropy/{n}": e["entropy"],
                   f"effective_experts/{n}": e["effective_experts"]}  # fmt: skip
        values |= {f"vocab_{k}/{n}": v["mean_max_specialization"] for k, v in e["vocab"].items()}
        for d, info in e["domains"].items():
            values[f"maxvio/{n}/{_slug(d)}"] = info["maxvio"]
            values[f"effective_experts/{n}/{_slug(d)}"] = info["effective_experts"]
    groups = [(values, int(report.get("step") or 0))]
    ab = report.get("ablation")
    if ab:
        values |= {f"loss/{_slug(d)}": v for d, v in ab["plain"].items()}
        for i, n_masked in enumerate(ab["masked_experts"]):
            point = {f"ablation/top_{_slug(mask)}/{_slug(d)}": losses[i]
                     for mask, by in ab["top"].items() for d, losses in by.items()}  # fmt: skip
            point |= {f"ablation/random/{_slug(d)}": losses[i] for d, losses in ab["random"].items()}
            groups.append((point, n_masked))
    sat = report.get("saturation")
    if sat:
        for i, step in enumerate(sat["steps"]):
            point = {"saturation/mean": sat["mean"][i]}
            point |= {f"saturation/{_slug(name)}": v[i] for name, v in sat["layers"].items()}
            groups.append((point, step))
    return groups


def log_to_mlflow(
    report: dict[str, Any], files: dict[str, Path], tracking: TrackingConfig, run_name: str | None = None
) -> str | None:
    """Log the report as an MLflow run of its own: params, metrics, the JSON, the HTML and the figures.

    Returns the run id (None when tracking is off or the store could not be reached)."""
    from raymoe.platform.tracking import Tracker

    name = run_name or f"analyze experts {Path(str(report['checkpoint'])).name}"
    tags = {"raymoe.command": "analyze experts", "analyzed_checkpoint": report["checkpoint"]}
    tracker = Tracker(tracking, run_name=name, tags=tags)
    params = {"checkpoint": report["checkpoint"], "step": report.get("step"), "runner": report["runner"],
              **{f"analysis.{k}": v for k, v in report["config"].items()},
              **{f"domain.{d}": info["source"] for d, info in report["domains"].items()}}  # fmt: skip
    with tracker:
        tracker.start(params)
        for values, step in report_metrics(report):
            tracker.log_metrics(values, step)
        tracker.log_artifact(files["json"])
        tracker.log_artifact(files["html"])
        for name, path in files.items():
            if name not in ("json", "html"):
                tracker.log_artifact(path, FIGURES_DIR)
    return tracker.run_id
