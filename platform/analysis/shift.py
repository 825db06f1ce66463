"""Routing under distribution shift: the library behind ``raymoe analyze shift``.

A checkpoint trained on one distribution meets another: an in-domain set D1 and a shifted set D2
(held-out sequences of each). Two regimes are measured.

**Bias frozen, as served.** D1 and D2 are routed through the checkpoint as it is. Per MoE layer
(main layers and MTP modules), with load_e the tokens routed to expert e (top-K) over the
held-out sequences:

- MaxVio_global = (max_e load_e − mean load) / mean load, over the whole held-out set (Wang et
  al., arXiv 2408.15664; :func:`~raymoe.platform.train.balance.max_violation`);
- the load distribution p_e = load_e / Σ_e load_e (sums to 1);
- the routing overlap O(D1, D2) = Σ_e min(p1_e, p2_e), the histogram intersection of the two load
  distributions: 1 when D2 spreads its tokens over the experts exactly as D1 does, 0 when no
  expert serves both; 1 − O is their total-variation distance. Tokens differ between D1 and D2,
  so a per-token measure (top-K Jaccard of one token) does not exist; this is a distribution measure.

**Bias adapting.** Training continues on D2 (other sequences than the held-out ones) from the
checkpoint's weights and biases: N optimizer steps, a fresh AdamW at a constant small lr, the
auxiliary-loss-free bias rule b_e ← b_e + γ·sign(mean load − load_e) after every step at γ.
After every ``eval_every`` steps the held-out D2 is evaluated (forward only, the trainer's
``evaluate``: MaxVio_global per main MoE layer; the MTP modules are not run there).
``steps_to_rebalance`` is the first evaluated step t (0 = before any step) at which the mean over
the main MoE layers of MaxVio_global on D2 is at most the frozen in-domain level, the same mean on
D1, times (1 + tolerance); None when it does not happen within N steps. MaxVio of a few thousand
tokens is noisy and the sign rule overshoots at a large γ, so ``balanced_from`` is reported too:
the first evaluated step from which every later one stays at or below that threshold. Every summary "mean" here
is over the main MoE layers, the layers the evaluation measures.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol

import torch

from raymoe.platform.analysis import metrics as m
from raymoe.platform.analysis.capture import RoutingRecord
from raymoe.platform.analysis.experts import Batch, LocalSource, RoutingSource, layer_rows
from raymoe.platform.analysis.shift_options import DEFAULT_GAMMA, ShiftConfig
from raymoe.platform.config import (
    ElasticConfig,
    ModelConfig,
    ParallelConfig,
    RaymoeConfig,
    TrackingConfig,
    TrainConfig,
    validate,
)
from raymoe.platform.plots import layer_name

logger = logging.getLogger(__name__)

REPORT_FILE = "shift.json"
HTML_FILE = "shift.html"
FIGURES_DIR = "figures"
ROLES = ("in", "out")  # D1 (in-domain), D2 (shifted)
# what the continued training takes from the checkpoint's own training config, when it has one
INHERITED_TRAIN_FIELDS = ("weight_decay", "beta1", "beta2", "grad_clip", "mtp_lambda", "seq_aux_alpha")


# --------------------------------------------------------------------------- metrics


def load_distribution(counts: torch.Tensor) -> torch.Tensor:
    """p_e = load_e / Σ load: counts [E] -> [E] float64 summing to 1 (zeros without tokens)."""
    total = float(counts.sum())
    return counts.double() / total if total > 0 else torch.zeros_like(counts, dtype=torch.float64)


def routing_overlap(counts_a: torch.Tensor, counts_b: torch.Tensor) -> float:
    """Σ_e min(p_a, p_b) of two load vectors [E]: 1 for the same distribution, 0 for disjoint experts (or no tokens)."""
    return float(torch.minimum(load_distribution(counts_a), load_distribution(counts_b)).sum())


def steps_to_rebalance(steps: list[int], values: list[float], reference: float, tolerance: float) -> int | None:
    """The first of ``steps`` whose value is at most ``reference`` × (1 + ``tolerance``); None when none is."""
    threshold = reference * (1.0 + tolerance)
    return next((s for s, v in zip(steps, values) if v <= threshold), None)


def balanced_from(steps: list[int], values: list[float], reference: float, tolerance: float) -> int | None:
    """The first of ``steps`` from which every value is at most ``reference`` × (1 + ``tolerance``) (balance back
    and staying back, to the last step measured); None when the last value is above."""
    threshold = reference * (1.0 + tolerance)
    out = None
    for s, v in zip(steps, values):
        out = (s if out is None else out) if v <= threshold else None
    return out


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _balance(counts: torch.Tensor) -> dict[str, Any]:
    return {"tokens": int(round(float(counts.sum()))), "load": counts.tolist(),
            "distribution": load_distribution(counts).tolist(), "maxvio": m.max_vio(counts),
            "effective_experts": m.effective_experts(counts)}  # fmt: skip


def layer_loads(records: list[RoutingRecord], n_experts: int) -> dict[int, torch.Tensor]:
    """load_e per MoE layer over ``records`` (valid rows only: an MTP module's last rows predict nothing)."""
    return {layer: m.expert_counts(layer_rows(records, layer).idx, n_experts) for layer in records[0].layers}


def frozen_report(
    loads_in: dict[int, torch.Tensor], loads_out: dict[int, torch.Tensor], num_hidden_layers: int
) -> dict[str, Any]:
    """Per MoE layer: MaxVio_global, load and load distribution of D1 (``in``) and D2 (``out``), and their overlap;
    and the means over the main MoE layers."""
    layers = []
    for layer, counts_in in loads_in.items():
        counts_out = loads_out[layer]
        layers.append({"layer": layer, "name": layer_name(layer, num_hidden_layers),
                       "main": layer < num_hidden_layers, "in": _balance(counts_in), "out": _balance(counts_out),
                       "overlap": routing_overlap(counts_in, counts_out)})  # fmt: skip
    main = [e for e in layers if e["main"]]
    return {"layers": layers, "maxvio_in": _mean([e["in"]["maxvio"] for e in main]),
            "maxvio_out": _mean([e["out"]["maxvio"] for e in main]),
            "overlap": _mean([e["overlap"] for e in main])}  # fmt: skip


# --------------------------------------------------------------------------- the continued training


class Trainer(Protocol):
    """What the continued training needs of a trainer (:class:`~raymoe.platform.train.trainer.LocalTrainer`,
    the actor graph's ``GraphTrainer``)."""

    def train_step(self, micro_batches: list[Batch]) -> Any: ...

    def evaluate(self, batches: list[Batch]) -> tuple[float, torch.Tensor]: ...


def resolve_gamma(cfg: ShiftConfig, state: dict[str, Any] | None) -> float:
    """γ: the option, else the checkpoint's ``train.bias_update_speed``, else :data:`DEFAULT_GAMMA`."""
    if cfg.gamma is not None:
        return cfg.gamma
    recorded = ((state or {}).get("config") or {}).get("train", {}).get("bias_update_speed")
    return float(recorded) if recorded is not None else DEFAULT_GAMMA


def continued_training_config(
    model: ModelConfig,
    location: str,
    state: dict[str, Any] | None,
    cfg: ShiftConfig,
    parallel: ParallelConfig | None = None,
) -> RaymoeConfig:
    """The config of the continued training on D2: from ``location``'s weights and biases (``train.init_from``),
    ``cfg.steps`` steps of ``cfg.train_batch`` sequences at constant ``cfg.lr`` and γ (:func:`resolve_gamma`);
    weight decay, betas, clipping, λ and α as the checkpoint was trained (``state``'s config) or the defaults.
    ConfigError (from validation) names a field that does not fit."""
    recorded = ((state or {}).get("config") or {}).get("train", {})
    inherited = {k: recorded[k] for k in INHERITED_TRAIN_FIELDS if k in recorded}
    train = TrainConfig(**inherited, steps=max(cfg.steps, 1), batch_size=cfg.train_batch, seq_len=cfg.seq_len,
                        lr=cfg.lr, min_lr_ratio=1.0, warmup_steps=0, bias_update_speed=resolve_gamma(cfg, state),
                        bias_update_speed_final=None, init_from=str(location), dtype=cfg.dtype, seed=cfg.seed,
                        eval_every=0, checkpoint_every=0)  # fmt: skip
    parallel = parallel or ParallelConfig()
    parallel = ParallelConfig(**{**asdict(parallel), "micro_batches": cfg.micro_batches(), "dp": 1})
    out = RaymoeConfig(model=model, parallel=parallel, train=train, tracking=TrackingConfig(enabled=False),
                       elastic=ElasticConfig(enabled=False))  # fmt: skip
    validate(out)
    return out


class TrainerSource(LocalSource):
    """A :class:`LocalSource` over a local trainer's model that leaves the model in the mode it found it in."""

    def __init__(self, model: Any, dtype: str = "fp32") -> None:
        was_training = model.training
        super().__init__(model, keep_scores=False, dtype=dtype)
        model.train(was_training)

    def record(self, batches: list[Batch]) -> list[RoutingRecord]:
        was_training = self.model.training
        self.model.eval()
        try:
            return super().record(batches)
        finally:
            self.model.train(was_training)


def split_rows(batches: list[Batch], held_out: int, batch_size: int) -> tuple[list[Batch], Batch | None]:
    """A domain's sequences as (the first ``held_out`` in batches of ``batch_size``, the rest as one [P, S] pair
    or None when there is no rest)."""
    ids = torch.cat([b[0] for b in batches])
    labels = torch.cat([b[1] for b in batches])
    n = min(held_out, len(ids))
    held = [(ids[i : min(i + batch_size, n)], labels[i : min(i + batch_size, n)]) for i in range(0, n, batch_size)]
    rest = (ids[held_out:], labels[held_out:]) if len(ids) > held_out else None
    return held, rest


def train_batch(pool: Batch, step: int, sequences: int, micro_batches: int) -> list[Batch]:
    """Step ``step``'s micro-batches: the next ``sequences`` rows of ``pool`` (cycling), cut into ``micro_batches``."""
    ids, labels = pool
    rows = torch.tensor([(step * sequences + i) % ids.shape[0] for i in range(sequences)])
    return list(zip(ids[rows].chunk(micro_batches), labels[rows].chunk(micro_batches)))


def adapt(
    trainer: Trainer,
    held_out: list[Batch],
    pool: Batch,
    cfg: ShiftConfig,
    layer_names: list[str],
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Continued training on ``pool`` for ``cfg.steps`` steps, the held-out D2 evaluated before and every
    ``cfg.eval_every`` steps: MaxVio_global per main MoE layer (named), their mean, the loss; and each step's
    training loss and the mean MaxVio of its own batch (before that step's bias update).

    ``layer_names``: the main MoE layers' names, in the order ``trainer.evaluate`` returns them."""
    note = progress or (lambda _what: None)
    names = list(layer_names)
    series: dict[str, Any] = {"steps": [], "maxvio": {n: [] for n in names}, "maxvio_mean": [], "loss": []}
    train: dict[str, list[float]] = {"loss": [], "maxvio_mean": []}

    def evaluate(step: int) -> None:
        loss, vio = trainer.evaluate(held_out)
        series["steps"].append(step)
        for n, v in zip(names, vio.tolist()):
            series["maxvio"][n].append(v)
        series["maxvio_mean"].append(_mean(vio.tolist()))
        series["loss"].append(loss)

    evaluate(0)
    n_main = len(names)
    for step in range(1, cfg.steps + 1):
        metrics = trainer.train_step(train_batch(pool, step - 1, cfg.train_batch, cfg.micro_batches()))
        train["loss"].append(float(metrics.loss))
        train["maxvio_mean"].append(_mean(metrics.max_vio[:n_main].tolist()))
        if step % cfg.eval_every == 0 or step == cfg.steps:
            evaluate(step)
        note(f"step {step}")
    return {"held_out": series, "train": train}


def analyze_shift(
    location: str,
    step: int | None,
    model: ModelConfig,
    domains: dict[str, dict[str, Any]],
    trainer: Trainer,
    source: RoutingSource,
    cfg: ShiftConfig,
    gamma: float,
    runner: str = "local",
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """The shift report of one checkpoint: frozen-bias routing of D1 and D2, then the continued training on D2.

    Args:
        location: the checkpoint (resolved); ``step`` its training step (None for a Hugging Face one).
        model: its model config.
        domains: ``{"in": ..., "out": ...}``, each ``{"name", "source", "held_out": [Batch]}``; ``out`` also
            ``"pool"``, the D2 sequences trained on ([P, S] input ids and labels; None when ``cfg.steps`` is 0).
        trainer: built with ``location``'s weights (:func:`continued_training_config`); it trains here.
        source: routes through the trainer's model (frozen part first, then again after the training).
        cfg: sizes and options; ``gamma`` the γ the trainer runs at (for the report).
        runner: what the trainer runs on (for the report).
        progress: called with a short note after each piece of work.
    """
    cfg.validate()
    note = progress or (lambda _what: None)
    t0 = time.perf_counter()
    E, L = model.n_routed_experts, model.num_hidden_layers
    held = {r: domains[r]["held_out"] for r in ROLES}
    loads = {r: layer_loads(source.record(held[r]), E) for r in ROLES}
    note("routed D1 and D2")
    frozen = frozen_report(loads["in"], loads["out"], L)
    main_names = [e["name"] for e in frozen["layers"] if e["main"]]
    loss_in_before, vio_in_before = trainer.evaluate(held["in"])
    adapting: dict[str, Any] | None = None
    if cfg.steps > 0:
        run = adapt(trainer, held["out"], domains["out"]["pool"], cfg, main_names, note)
        series = run["held_out"]
        reference = frozen["maxvio_in"]
        per_layer_ref = {e["name"]: e["in"]["maxvio"] for e in frozen["layers"] if e["main"]}
        loss_in_after, vio_in_after = trainer.evaluate(held["in"])
        after = layer_loads(source.record(held["out"]), E)
        note("routed D2 after the training")
        adapting = {
            "gamma": gamma, "lr": cfg.lr, "steps": cfg.steps, "train_batch": cfg.train_batch,
            "reference": reference, "tolerance": cfg.tolerance, "threshold": reference * (1 + cfg.tolerance),
            "steps_to_rebalance": steps_to_rebalance(series["steps"], series["maxvio_mean"], reference,
                                                     cfg.tolerance),
            "balanced_from": balanced_from(series["steps"], series["maxvio_mean"], reference, cfg.tolerance),
            "steps_to_rebalance_by_layer": {n: steps_to_rebalance(series["steps"], v, per_layer_ref[n], cfg.tolerance)
                                            for n, v in series["maxvio"].items()},
            "held_out": series, "train": run["train"],
            "in_after": {"loss": loss_in_after, "maxvio_mean": _mean(vio_in_after.tolist())},
            "layers_after": [{"layer": e["layer"], "name": e["name"], "out": _balance(after[e["layer"]]),
                              "overlap": routing_overlap(loads["in"][e["layer"]], after[e["layer"]])}
                             for e in frozen["layers"]],
        }  # fmt: skip
    return {
        "checkpoint": location, "step": step, "runner": runner, "config": {**asdict(cfg), "gamma": gamma},
        "model": {"n_routed_experts": E, "num_experts_per_tok": model.num_experts_per_tok, "num_hidden_layers": L,
                  "first_k_dense_replace": model.first_k_dense_replace,
                  "num_nextn_predict_layers": model.num_nextn_predict_layers},
        "domains": {r: {"name": domains[r]["name"], "source": domains[r]["source"],
                        "sequences": sum(b[0].shape[0] for b in held[r]),
                        "tokens": sum(b[0].numel() for b in held[r])} for r in ROLES}
                   | {"train": {"sequences": 0 if domains["out"].get("pool") is None
                                else int(domains["out"]["pool"][0].shape[0])}},
        "frozen": {**frozen, "loss_in": loss_in_before, "evaluate_maxvio_in": _mean(vio_in_before.tolist())},
        "adapting": adapting,
        "seconds": time.perf_counter() - t0,
    }  # fmt: skip


# --------------------------------------------------------------------------- outputs


def write_outputs(report: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """``shift.json``, ``figures/shift_*.png`` and ``shift.html`` (figures inlined) in ``out_dir``: name -> path."""
    from raymoe.platform.analysis.shift_report import html_page, write_figures

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures = write_figures(report, out / FIGURES_DIR)
    (out / REPORT_FILE).write_text(json.dumps(report, indent=1))
    (out / HTML_FILE).write_text(html_page(report, figures), encoding="utf-8")
    return {"json": out / REPORT_FILE, "html": out / HTML_FILE, **figures}


def report_metrics(report: dict[str, Any]) -> list[tuple[dict[str, float], int]]:
    """The report's numbers as MLflow metrics: (values, step) groups (the series by training step)."""
    from raymoe.platform.analysis.run import _slug

    values: dict[str, float] = {}
    fr = report["frozen"]
    for e in fr["layers"]:
        n = _slug(e["name"])
        values |= {f"frozen/maxvio_in/{n}": e["in"]["maxvio"], f"frozen/maxvio_out/{n}": e["out"]["maxvio"],
                   f"frozen/overlap/{n}": e["overlap"]}  # fmt: skip
    values |= {"frozen/maxvio_in": fr["maxvio_in"], "frozen/maxvio_out": fr["maxvio_out"],
               "frozen/overlap": fr["overlap"]}  # fmt: skip
    groups = [(values, 0)]
    ad = report.get("adapting")
    if ad:
        if ad["steps_to_rebalance"] is not None:
            values["steps_to_rebalance"] = float(ad["steps_to_rebalance"])
        s = ad["held_out"]
        for i, step in enumerate(s["steps"]):
            point = {"adapt/maxvio_out": s["maxvio_mean"][i], "adapt/loss_out": s["loss"][i]}
            point |= {f"adapt/maxvio_out/{_slug(n)}": v[i] for n, v in s["maxvio"].items()}
            groups.append((point, step))
        for i, loss in enumerate(ad["train"]["loss"]):
            groups.append(({"adapt/train_loss": loss, "adapt/train_maxvio": ad["train"]["maxvio_mean"][i]}, i + 1))
    return groups


def log_to_mlflow(report: dict[str, Any], files: dict[str, Path], tracking: TrackingConfig) -> str | None:
    """Log the report as an MLflow run of its own: params, metrics, the JSON, the HTML and the figures.

    Returns the run id (None when tracking is off or the store could not be reached)."""
    from raymoe.platform.tracking import Tracker

    d = report["domains"]
    name = f"analyze shift {Path(str(report['checkpoint'])).name} {d['in']['name']}->{d['out']['name']}"
    tags = {"raymoe.command": "analyze shift", "analyzed_checkpoint": report["checkpoint"]}
    tracker = Tracker(tracking, run_name=name, tags=tags)
    params = {"checkpoint": report["checkpoint"], "step": report.get("step"), "runner": report["runner"],
              **{f"analysis.{k}": v for k, v in report["config"].items()},
              **{f"domain.{r}": f"{d[r]['name']} ({d[r]['source']})" for r in ROLES}}  # fmt: skip
    with tracker:
        tracker.start(params)
        for values, step in report_metrics(report):
            tracker.log_metrics(values, step)
        tracker.log_artifact(files["json"])
        tracker.log_artifact(files["html"])
        for key, path in files.items():
            if key not in ("json", "html"):
                tracker.log_artifact(path, FIGURES_DIR)
    return tracker.run_id
