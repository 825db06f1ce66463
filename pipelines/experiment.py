"""``raymoe experiment balance``: the paper's balance table (loss-free vs aux loss vs none);
``raymoe experiment finetune``: full vs ESFT-token vs ESFT-gate vs frozen-router fine-tuning on one narrow domain."""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from raymoe.platform.config import load_config

DEFAULT_STEPS = 250
DEFAULT_GAMMA = 0.005  # the paper's 0.001 is for runs of many thousand steps; measured here: 0.01 balances 60 steps


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("experiment", help="reproducible experiments")
    which = p.add_subparsers(dest="experiment", required=True, metavar="EXPERIMENT")
    b = which.add_parser("balance", help="loss-free balancing vs the auxiliary loss vs none (Wang et al., Table 1)")
    b.add_argument("preset", nargs="?", default="small", help="preset (default small)")
    b.add_argument("overrides", nargs="*", help="dotted overrides")
    b.add_argument("--data", help="prepared data (default: the stdlib corpus)")
    b.add_argument("--output", default="outputs/balance", help="output directory")
    b.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"steps per run (default {DEFAULT_STEPS})")
    b.add_argument("--gamma", type=float, default=DEFAULT_GAMMA, help=f"bias update speed (default {DEFAULT_GAMMA})")
    b.add_argument("--alpha", type=float, default=0.001, help="aux-loss weight of the baseline (default 0.001)")
    b.add_argument("--json", action="store_true", help="also print the rows as one JSON line")
    b.add_argument("--no-progress", action="store_true")
    b.set_defaults(func=_balance)
    register_finetune(which)


def _balance(args: argparse.Namespace) -> int:
    from raymoe.pipelines.pretrain import default_data_dir, ensure_default_data
    from raymoe.platform.train.experiment import balance_experiment, format_table

    cfg = load_config(args.preset, [f"train.steps={args.steps}", *args.overrides])
    data_dir = Path(args.data) if args.data else ensure_default_data(default_data_dir(cfg), cfg)
    t0 = time.perf_counter()
    rows = balance_experiment(
        cfg, data_dir, args.output, gamma=args.gamma, alpha=args.alpha, progress=not args.no_progress
    )
    print(f"\nbalance experiment: preset {args.preset}, {args.steps} steps per run, gamma {args.gamma}, "
          f"alpha {args.alpha}, {time.perf_counter() - t0:.0f} s\n")  # fmt: skip
    print(format_table(rows))
    if args.json:
        print(json.dumps([r.__dict__ for r in rows]))
    return 0


FINETUNE_DOMAIN = "docs"  # the built-in corpus' docstrings and comments: prose, beside the code it pretrained on
FINETUNE_METHODS_RUN = ("full", "esft-token", "esft-gate", "frozen-router")


def register_finetune(which: argparse._SubParsersAction) -> None:
    f = which.add_parser("finetune", help="full vs ESFT-token vs ESFT-gate vs frozen-router on one narrow domain")
    f.add_argument("overrides", nargs="*", help="dotted overrides for every fine-tune")
    f.add_argument("--from", dest="base", help="the checkpoint to fine-tune (default: pretrain `small` first)")
    f.add_argument("--pretrain-steps", type=int, default=150, help="steps of that pretraining (default 150)")
    f.add_argument(
        "--domain", default=FINETUNE_DOMAIN, help=f"built-in domain to fine-tune on (default {FINETUNE_DOMAIN})"
    )
    f.add_argument("--general", help="prepared data whose validation split measures forgetting (default: the base's "
                   "built-in corpus)")  # fmt: skip
    f.add_argument("--output", default="outputs/experiment-finetune", help="output directory")
    f.add_argument("--steps", type=int, default=50, help="fine-tuning steps per method (default 50)")
    f.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (default 1e-4)")
    f.add_argument("--methods", default=",".join(FINETUNE_METHODS_RUN), help="comma-separated (default all four)")
    f.add_argument("--runner", choices=("local", "graph"), default="local")
    f.add_argument("--json", action="store_true", help="also print the rows as one JSON line")
    f.add_argument("--no-progress", action="store_true")
    f.set_defaults(func=_finetune)


def _domain_data(base: str, domain: str, out: Path, seq_len: int) -> Path:
    """The built-in ``domain`` prepared with the checkpoint's tokenizer into ``out`` (once)."""
    from raymoe.platform import storage
    from raymoe.platform.analysis.domains import DEFAULT_DOMAINS, stdlib_domain_texts
    from raymoe.platform.checkpoint.layout import TOKENIZER_FILE
    from raymoe.platform.config import ConfigError
    from raymoe.platform.data.prepare import PrepareConfig, prepare_dataset
    from raymoe.platform.data.shards import DataError, read_manifest

    if domain not in DEFAULT_DOMAINS:
        raise ConfigError(f"--domain {domain!r}: one of {', '.join(DEFAULT_DOMAINS)}")
    try:
        if read_manifest(out).seq_len == seq_len:
            return out
    except DataError:
        pass
    tokenizer = storage.join(base, TOKENIZER_FILE)
    if not storage.is_file(tokenizer):
        raise ConfigError(f"checkpoint {base} has no {TOKENIZER_FILE}: the domain cannot be tokenized as it was")
    corpus = out.parent / f"{domain}.jsonl"
    corpus.parent.mkdir(parents=True, exist_ok=True)
    texts = stdlib_domain_texts(4_000_000)[domain]
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    prepare_dataset(out, PrepareConfig(corpus=[str(corpus)], tokenizer=tokenizer, seq_len=seq_len, seed=0),
                    progress=False)  # fmt: skip
    return out


def _finetune(args: argparse.Namespace) -> int:
    import sys

    from raymoe.pipelines.finetune import run_finetune
    from raymoe.pipelines.pretrain import default_data_dir, ensure_default_data
    from raymoe.platform.checkpoint.layout import CheckpointError
    from raymoe.platform.checkpoint.reader import open_checkpoint
    from raymoe.platform.config import ConfigError
    from raymoe.platform.data.shards import DataError
    from raymoe.platform.train.loop import pretrain

    out = Path(args.output)
    t0 = time.perf_counter()
    try:
        base = args.base
        if base is None:
            cfg = load_config("small", [f"train.steps={args.pretrain_steps}", "tracking.experiment=raymoe-finetune"])
            data = ensure_default_data(default_data_dir(cfg), cfg, progress=not args.no_progress)
            base = pretrain(cfg, data, out / "base", progress=not args.no_progress, run_name="finetune/base").checkpoint
        reader = open_checkpoint(base)
        run_cfg = reader.run_config or load_config("small")
        seq_len = run_cfg.train.seq_len
        domain = _domain_data(reader.location, args.domain, out / f"data-{args.domain}", seq_len)
        general = args.general
        if general is None:
            cfg = dataclasses.replace(run_cfg, model=reader.model_config)
            general = str(ensure_default_data(default_data_dir(cfg), cfg, progress=not args.no_progress))
        rows = []
        for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
            r = run_finetune(reader.location, str(domain), method, str(out / method), args.runner, general,
                             args.steps, args.lr, args.overrides, save_delta=method != "full",
                             run_name=f"experiment finetune/{method}", progress=not args.no_progress)  # fmt: skip
            rows.append(r)
    except (ConfigError, CheckpointError, DataError) as exc:
        print(f"raymoe experiment finetune: {exc}", file=sys.stderr)
        return 2
    print(f"\nfine-tuning experiment: {reader.location} on the built-in {args.domain!r} domain, {args.steps} steps "
          f"per method at lr {args.lr}, runner {args.runner}, {time.perf_counter() - t0:.0f} s\n")  # fmt: skip
    print(format_finetune_table(rows))
    figure = finetune_figure_of_runs(rows, out / "finetune.png")
    if figure is not None:
        print(f"\nfigure: {figure}")
    if args.json:
        print(json.dumps([dataclasses.asdict(r) for r in rows]))
    return 0


def format_finetune_table(rows: list) -> str:
    """ESFT-style table: domain and general loss before -> after, trained parameters, saved size, wall time."""
    lines = [
        "| method | domain loss | general loss (forgetting) | trained params | saved | wall s |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        general = f"{r.general_loss_before:.3f} → {r.general_loss:.3f}" if r.general_loss is not None else "-"
        saved = f"{r.saved_bytes / 2**20:.2f} MiB" + (" (delta)" if r.delta else " (checkpoint)")
        lines.append(
            f"| {r.method} | {r.domain_loss_before:.3f} → {r.domain_loss:.3f} | {general} | "
            f"{r.trained_params:,} ({100 * r.trained_params / r.total_params:.1f} %) | {saved} | {r.seconds:.0f} |"
        )
    return "\n".join(lines)


FIGURE_METRICS = {"general loss (forgetting)": "general/loss", "effective experts (mean over MoE layers)":
                  "experts/effective/mean", "MaxVio of the step (mean)": "maxvio/mean"}  # fmt: skip


def finetune_figure_of_runs(rows: list, path: Path) -> Path | None:
    """The metrics of ``FIGURE_METRICS`` over the steps of each method's MLflow run, as one PNG (None: no runs)."""
    if not any(r.run_id for r in rows):
        return None
    from mlflow.tracking import MlflowClient

    from raymoe.platform.plots import finetune_figure, save_figure
    from raymoe.platform.tracking import resolve_tracking_uri

    client = MlflowClient(resolve_tracking_uri(None))
    series = {title: {r.method: [(m.step, m.value) for m in client.get_metric_history(r.run_id, key)]
                      for r in rows if r.run_id} for title, key in FIGURE_METRICS.items()}  # fmt: skip
    return save_figure(finetune_figure(series), path)
