"""``raymoe analyze experts``: what a checkpoint's experts learned, from its recorded routing.

    raymoe analyze experts --checkpoint outputs/demo
    raymoe analyze experts --checkpoint outputs/run1 --domain web=web.jsonl --domain notes=notes/ --runner graph --ep 2

Each domain (default: the standard library split into code, docs and tests; or ``--domain NAME=PATH``,
any corpus ``prepare-data`` reads) is tokenized with the checkpoint's tokenizer and routed through the
model, on the local engine or on the actor graph. Writes ``experts.json``, ``figures/*.png`` and a
self-contained ``report.html`` to ``--out`` and logs them as an MLflow run of their own. The library
behind it is :mod:`raymoe.platform.analysis.run`; the formulas are in ``docs/analysis.md``.

``raymoe analyze shift --checkpoint C --in D1 --out D2`` routes held-out in-domain and shifted
sequences with the bias frozen (MaxVio_global, load distributions, their overlap), then trains on
D2 for ``--steps`` steps with the bias adapting and reports when balance returns
(:mod:`raymoe.platform.analysis.shift`; ``shift.json``, figures and ``shift.html`` in ``--output-dir``).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from raymoe.platform.analysis.options import DEFAULT_EXPERIMENT, DTYPES, AnalysisError, ExpertsConfig

logger = logging.getLogger(__name__)

EXIT_BAD_INPUT = 2
RUNNERS = ("local", "graph")


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``analyze`` subcommand and its ``experts`` and ``shift`` analyses."""
    p = sub.add_parser("analyze", help="analyze a checkpoint's routing", description=__doc__.split("\n\n")[0])
    which = p.add_subparsers(dest="analysis", required=True, metavar="ANALYSIS")
    e = which.add_parser("experts", help="domain and vocabulary specialization, co-activation, saturation, masking")
    e.add_argument(
        "--checkpoint",
        required=True,
        metavar="LOCATION",
        help="a training output (its latest checkpoint), a training or Hugging Face checkpoint",
    )
    e.add_argument(
        "--domain",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="a domain: any corpus prepare-data reads (repeat; default: the stdlib as code, docs, tests)",
    )
    d = ExpertsConfig()
    e.add_argument("--out", default="outputs/analysis", help="output directory (default outputs/analysis)")
    e.add_argument("--seq-len", type=int, default=d.seq_len, help=f"tokens per sequence (default {d.seq_len})")
    e.add_argument("--sequences", type=int, default=d.sequences, help=f"per domain (default {d.sequences})")
    e.add_argument("--batch-size", type=int, default=d.batch_size, help=f"sequences a forward (default {d.batch_size})")
    e.add_argument(
        "--ablation-sequences",
        type=int,
        default=d.ablation_sequences,
        help=f"sequences per domain of the masking ablation (default {d.ablation_sequences}; 0: none)",
    )
    e.add_argument(
        "--ratios",
        default=",".join(str(r) for r in d.ratios),
        help="fractions of experts masked per layer, comma-separated (default %(default)s)",
    )
    e.add_argument(
        "--saturation-sequences",
        type=int,
        default=d.saturation_sequences,
        help=f"sequences per domain routed at every checkpoint of the run (default {d.saturation_sequences}"
        "; 0: no saturation)",
    )
    e.add_argument(
        "--min-count", type=int, default=d.min_count, help=f"vocabulary: tokens seen this often ({d.min_count})"
    )
    e.add_argument("--seed", type=int, default=d.seed, help="seed of the random experts masked (default 0)")
    e.add_argument("--runner", choices=RUNNERS, default="local", help="local engine (default) or the actor graph")
    e.add_argument("--pp", type=int, default=1, help="graph: attention stages (default 1)")
    e.add_argument("--ep", type=int, default=1, help="graph: expert shards (default 1)")
    e.add_argument("--device", default="auto", help="auto (CUDA when visible), cpu or cuda")
    e.add_argument("--dtype", choices=DTYPES, default=d.dtype, help="fp32 (the reference, default) or bf16 autocast")
    e.add_argument("--experiment", default=DEFAULT_EXPERIMENT, help=f"MLflow experiment (default {DEFAULT_EXPERIMENT})")
    e.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    e.add_argument("--no-progress", action="store_true")
    e.set_defaults(func=run)
    _register_shift(which)


def _register_shift(which: argparse._SubParsersAction) -> None:
    """The ``shift`` analysis: routing of in-domain and shifted data, bias frozen and adapting."""
    from raymoe.platform.analysis.shift_options import DEFAULT_GAMMA, ShiftConfig

    s = which.add_parser(
        "shift",
        help="routing under distribution shift: MaxVio, load and overlap, bias frozen and adapting",
        description="Route held-out in-domain (--in) and shifted (--out) sequences with the bias frozen, then "
        "train on the shifted data for --steps steps with the bias adapting and report when balance returns.",
    )
    s.add_argument("--checkpoint", required=True, metavar="LOCATION", help="as for analyze experts")
    domain_help = ("a built-in domain (code, docs, tests: the stdlib split), any corpus prepare-data reads "
                   "(file or directory), or NAME=PATH")  # fmt: skip
    s.add_argument("--in", dest="domain_in", required=True, metavar="D1", help=f"the in-domain data: {domain_help}")
    s.add_argument("--out", dest="domain_out", required=True, metavar="D2", help=f"the shifted data: {domain_help}")
    d = ShiftConfig()
    s.add_argument("--output-dir", default="outputs/analysis", help="where the report goes (default %(default)s)")
    s.add_argument("--seq-len", type=int, default=d.seq_len, help=f"tokens per sequence (default {d.seq_len})")
    s.add_argument("--sequences", type=int, default=d.sequences, help=f"held out per domain (default {d.sequences})")
    s.add_argument("--batch-size", type=int, default=d.batch_size, help=f"sequences a forward (default {d.batch_size})")
    s.add_argument("--steps", type=int, default=d.steps, help=f"N: continued-training steps on D2 (default {d.steps}"
                   "; 0: bias frozen only)")  # fmt: skip
    s.add_argument("--train-batch", type=int, default=d.train_batch,
                   help=f"D2 sequences per training step (default {d.train_batch})")  # fmt: skip
    s.add_argument("--lr", type=float, default=d.lr, help=f"constant learning rate, fresh AdamW (default {d.lr:g})")
    s.add_argument("--gamma", type=float, default=None,
                   help=f"γ, the bias update speed (default: the checkpoint's train.bias_update_speed, else "
                   f"{DEFAULT_GAMMA:g})")  # fmt: skip
    s.add_argument("--tolerance", type=float, default=d.tolerance,
                   help=f"balance is back at MaxVio <= in-domain × (1 + this) (default {d.tolerance:g})")  # fmt: skip
    s.add_argument("--eval-every", type=int, default=d.eval_every, help="evaluate D2 every this many steps (1)")
    s.add_argument("--seed", type=int, default=d.seed, help="seed of the continued training (default 0)")
    s.add_argument("--runner", choices=RUNNERS, default="local", help="local engine (default) or the actor graph")
    s.add_argument("--pp", type=int, default=1, help="graph: attention stages (default 1)")
    s.add_argument("--ep", type=int, default=1, help="graph: expert shards (default 1)")
    s.add_argument("--device", default="auto", help="auto (CUDA when visible), cpu or cuda")
    s.add_argument("--dtype", choices=DTYPES, default=d.dtype, help="fp32 (the reference, default) or bf16 autocast")
    s.add_argument("--experiment", default=DEFAULT_EXPERIMENT, help=f"MLflow experiment (default {DEFAULT_EXPERIMENT})")
    s.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Analyze; exit code 0, or 2 with a one-line message naming the bad input."""
    from raymoe.platform.checkpoint.layout import CheckpointError
    from raymoe.platform.config import ConfigError
    from raymoe.platform.data.shards import DataError

    try:
        return _shift(args) if args.analysis == "shift" else _experts(args)
    except (AnalysisError, CheckpointError, ConfigError, DataError) as exc:
        print(f"raymoe analyze {args.analysis}: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT


def parse_domains(specs: list[str]) -> dict[str, str]:
    """``NAME=PATH`` arguments -> {name: path}; AnalysisError naming a malformed, repeated or missing one."""
    out: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise AnalysisError(f"--domain {spec!r}: expected NAME=PATH")
        if name in out:
            raise AnalysisError(f"--domain {name}: given twice")
        if not Path(path).exists():
            raise AnalysisError(f"--domain {name}={path}: unknown domain path {path}: no such file or directory")
        out[name] = path
    return out


def _ratios(text: str) -> list[float]:
    try:
        return [float(r) for r in text.split(",") if r.strip()]
    except ValueError:
        raise AnalysisError(f"--ratios {text!r}: expected numbers separated by commas") from None


def _experts(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from raymoe.platform.analysis.domains import chars_for, domain_batches, read_domain_texts, stdlib_domain_texts
    from raymoe.platform.analysis.run import analyze_experts, check_routing_layers, log_to_mlflow, write_outputs
    from raymoe.platform.config import TrackingConfig
    from raymoe.platform.inference.loading import open_served

    t0 = time.perf_counter()
    paths = parse_domains(args.domain)
    cfg = ExpertsConfig(
        seq_len=args.seq_len,
        sequences=args.sequences,
        batch_size=args.batch_size,
        ablation_sequences=args.ablation_sequences,
        ratios=_ratios(args.ratios),
        saturation_sequences=args.saturation_sequences,
        min_count=args.min_count,
        seed=args.seed,
        dtype=args.dtype,
    )
    cfg.validate()
    served = open_served(args.checkpoint)
    model, location = served.model_config, served.location
    check_routing_layers(model, location)
    if cfg.seq_len > model.max_position_embeddings:
        raise AnalysisError(
            f"--seq-len {cfg.seq_len} exceeds the model's max_position_embeddings ({model.max_position_embeddings})"
        )
    want = chars_for(cfg.sequences * cfg.seq_len)
    texts = {n: read_domain_texts(p, want) for n, p in paths.items()} if paths else stdlib_domain_texts(want)
    eos = served.eos_token_id
    domains = {
        n: domain_batches(t, served.tokenizer, eos, cfg.seq_len, cfg.sequences, cfg.batch_size, n)
        for n, t in texts.items()
    }
    sources = paths or dict.fromkeys(texts, "python stdlib (the built-in split)")
    make_source = _source_factory(args, model)
    step = served.reader.state.get("step") if getattr(served.reader, "state", None) else None
    with tqdm(desc="analyze", unit="pass", disable=True if args.no_progress else None) as bar:
        report = analyze_experts(
            location,
            step,
            model,
            domains,
            sources,
            make_source,
            cfg,
            args.runner,
            progress=lambda what: (bar.set_postfix_str(what), bar.update()),
        )
    from raymoe.platform.analysis.report import annotate_tokens

    annotate_tokens(report["layers"], lambda t: served.tokenizer.decode([t], skip_special_tokens=False))
    files = write_outputs(report, args.out)
    run_id = None
    if not args.no_mlflow:
        run_id = log_to_mlflow(report, files, TrackingConfig(experiment=args.experiment))
    _print_summary(report, files, run_id, time.perf_counter() - t0)
    return 0


def _source_factory(args: argparse.Namespace, model: object):  # noqa: ANN202
    """Build a RoutingSource of a checkpoint location on the runner asked for."""
    if args.runner == "graph":
        from raymoe.actors.analysis import GraphSource
        from raymoe.actors.runtime import ensure_ray
        from raymoe.platform.config import ParallelConfig

        ensure_ray()
        parallel = ParallelConfig(pp=args.pp, ep=args.ep, device=args.device)
        return lambda location: GraphSource.from_checkpoint(location, model, parallel, args.dtype)
    from raymoe.platform.analysis.experts import LocalSource
    from raymoe.platform.checkpoint.reader import load_model
    from raymoe.platform.devices import resolve_device

    device = resolve_device(args.device)
    return lambda location: LocalSource(load_model(location, device=device), dtype=args.dtype)


def _print_summary(report: dict, files: dict, run_id: str | None, seconds: float) -> None:
    print(
        f"analyzed {report['checkpoint']} (step {report['step']}) on the {report['runner']} runner in {seconds:.0f} s"
    )
    domains = list(report["domains"])
    print(f"{'layer':<10}{'MaxVio':>8}{'eff. experts':>14}  " + "  ".join(f"{d + ' spec. max':>14}" for d in domains))
    for e in report["layers"]:
        spec = [max(e["domain_specialization"][d]) for d in domains]
        print(
            f"{e['name']:<10}{e['maxvio']:>8.3f}{e['effective_experts']:>14.2f}  "
            + "  ".join(f"{100 * s:>13.1f}%" for s in spec)
        )
    ab = report.get("ablation")
    if ab:
        print("masking ablation (loss on each domain; masked experts per layer " + str(ab["masked_experts"]) + "):")
        for mask, by in ab["top"].items():
            for d, losses in by.items():
                print(f"  top of {mask:<8} on {d:<8} " + " ".join(f"{v:.3f}" for v in losses))
        for d, losses in ab["random"].items():
            print(f"  random          on {d:<8} " + " ".join(f"{v:.3f}" for v in losses))
    sat = report.get("saturation")
    if sat:
        print(
            "router saturation against step {}: {}".format(
                sat["final_step"], ", ".join(f"step {s} {100 * v:.1f}%" for s, v in zip(sat["steps"], sat["mean"]))
            )
        )
    print(f"report: {files['html']}  (JSON {files['json']}, figures in {Path(files['html']).parent / 'figures'})")
    if run_id:
        print(f"MLflow run {run_id}")


# --------------------------------------------------------------------------- analyze shift


def parse_shift_domain(spec: str, flag: str, builtin: tuple[str, ...]) -> tuple[str, str | None]:
    """``--in``/``--out`` -> (name, path): a built-in domain (path None), ``NAME=PATH``, or a PATH (named by its
    stem); AnalysisError naming an empty spec or an unknown domain path."""
    if spec in builtin:
        return spec, None
    name, sep, path = spec.partition("=")
    if not sep:
        name, path = Path(spec.rstrip("/")).stem or spec, spec
    if not name.strip() or not path.strip():
        raise AnalysisError(f"{flag} {spec!r}: expected a built-in domain ({', '.join(builtin)}), PATH or NAME=PATH")
    if not Path(path).exists():
        raise AnalysisError(
            f"{flag} {spec}: unknown domain path {path}: no such file or directory "
            f"(nor a built-in domain: {', '.join(builtin)})"
        )
    return name, path


def _shift(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from raymoe.platform.analysis.domains import (
        DEFAULT_DOMAINS,
        chars_for,
        domain_batches,
        read_domain_texts,
        stdlib_domain_texts,
    )
    from raymoe.platform.analysis.run import check_routing_layers
    from raymoe.platform.analysis.shift import (
        ROLES,
        analyze_shift,
        continued_training_config,
        log_to_mlflow,
        resolve_gamma,
        split_rows,
        write_outputs,
    )
    from raymoe.platform.analysis.shift_options import ShiftConfig
    from raymoe.platform.config import ParallelConfig, TrackingConfig
    from raymoe.platform.inference.loading import open_served

    t0 = time.perf_counter()
    specs = {"in": parse_shift_domain(args.domain_in, "--in", DEFAULT_DOMAINS),
             "out": parse_shift_domain(args.domain_out, "--out", DEFAULT_DOMAINS)}  # fmt: skip
    cfg = ShiftConfig(seq_len=args.seq_len, sequences=args.sequences, batch_size=args.batch_size, steps=args.steps,
                      train_batch=args.train_batch, lr=args.lr, gamma=args.gamma, tolerance=args.tolerance,
                      eval_every=args.eval_every, seed=args.seed, dtype=args.dtype)  # fmt: skip
    cfg.validate()
    served = open_served(args.checkpoint)
    model, location = served.model_config, served.location
    check_routing_layers(model, location)
    if cfg.seq_len > model.max_position_embeddings:
        raise AnalysisError(
            f"--seq-len {cfg.seq_len} exceeds the model's max_position_embeddings ({model.max_position_embeddings})"
        )
    state = getattr(served.reader, "state", None)
    wanted = {"in": cfg.sequences, "out": cfg.sequences + cfg.steps * cfg.train_batch}  # sequences to cut
    builtin = [r for r in ROLES if specs[r][1] is None]
    stdlib = stdlib_domain_texts(chars_for(max(wanted[r] for r in builtin) * cfg.seq_len)) if builtin else {}
    domains = {}
    for r in ROLES:
        name, path = specs[r]
        texts = stdlib[name] if path is None else read_domain_texts(path, chars_for(wanted[r] * cfg.seq_len))
        cut = domain_batches(texts, served.tokenizer, served.eos_token_id, cfg.seq_len, wanted[r], wanted[r],
                             f"{name} (--{r})")  # fmt: skip
        held, pool = split_rows(cut, cfg.sequences, cfg.batch_size)
        source = path if path is not None else "python stdlib (the built-in split)"
        domains[r] = {"name": name, "source": source, "held_out": held, "pool": pool if r == "out" else None}
    pool = domains["out"]["pool"]
    if cfg.steps > 0 and pool is None:
        raise AnalysisError(
            f"--out {args.domain_out}: no sequences of {cfg.seq_len} tokens left to train on after the "
            f"{cfg.sequences} held out: give more text, fewer --sequences or --steps 0"
        )
    if cfg.steps > 0 and pool[0].shape[0] < wanted["out"] - cfg.sequences:
        logger.warning("--out %s: %d training sequences for %d steps of %d: they repeat", args.domain_out,
                       pool[0].shape[0], cfg.steps, cfg.train_batch)  # fmt: skip
    graph = args.runner == "graph"
    parallel = ParallelConfig(pp=args.pp, ep=args.ep, device=args.device) if graph else ParallelConfig()
    parallel.device = args.device
    train_cfg = continued_training_config(model, location, state, cfg, parallel)
    trainer, source = _shift_trainer(train_cfg, graph, cfg.dtype)
    step = state.get("step") if state else None
    try:
        with tqdm(desc="analyze shift", total=cfg.steps + 2, unit="step",
                  disable=True if args.no_progress else None) as bar:  # fmt: skip
            note = lambda what: (bar.set_postfix_str(what), bar.update())  # noqa: E731
            report = analyze_shift(location, step, model, domains, trainer, source, cfg, resolve_gamma(cfg, state),
                                   args.runner, progress=note)  # fmt: skip
    finally:
        trainer.shutdown() if graph else trainer.close()
    files = write_outputs(report, args.output_dir)
    run_id = None
    if not args.no_mlflow:
        run_id = log_to_mlflow(report, files, TrackingConfig(experiment=args.experiment))
    _print_shift(report, files, run_id, time.perf_counter() - t0)
    return 0


def _shift_trainer(train_cfg: object, graph: bool, dtype: str) -> tuple:
    """(trainer, the RoutingSource routing through it) of the continued training, on the runner asked for."""
    if graph:
        from raymoe.actors.analysis import GraphSource
        from raymoe.actors.driver import GraphTrainer
        from raymoe.actors.runtime import ensure_ray

        ensure_ray()
        trainer = GraphTrainer(train_cfg)
        return trainer, GraphSource(trainer)
    from raymoe.platform.analysis.shift import TrainerSource
    from raymoe.platform.train.trainer import LocalTrainer

    trainer = LocalTrainer(train_cfg)
    return trainer, TrainerSource(trainer.model, dtype)


def _print_shift(report: dict, files: dict, run_id: str | None, seconds: float) -> None:
    d, fr, ad = report["domains"], report["frozen"], report["adapting"]
    print(f"analyzed {report['checkpoint']} (step {report['step']}) on the {report['runner']} runner in "
          f"{seconds:.0f} s: D1 {d['in']['name']}, D2 {d['out']['name']}, {d['in']['sequences']} and "
          f"{d['out']['sequences']} held-out sequences")  # fmt: skip
    after = {e["layer"]: e for e in (ad or {}).get("layers_after", [])}
    head = f"{'bias frozen':<12}{'MaxVio D1':>10}{'MaxVio D2':>10}{'overlap':>9}"
    print(head + (f"  | after {ad['steps']} steps: MaxVio D2, overlap with D1" if ad else ""))
    for e in fr["layers"]:
        line = f"{e['name']:<12}{e['in']['maxvio']:>10.3f}{e['out']['maxvio']:>10.3f}{e['overlap']:>9.3f}"
        if ad:
            a = after[e["layer"]]
            line += f"  | {a['out']['maxvio']:>8.3f}{a['overlap']:>9.3f}"
        print(line)
    print(f"{'mean (main)':<12}{fr['maxvio_in']:>10.3f}{fr['maxvio_out']:>10.3f}{fr['overlap']:>9.3f}")
    if ad:
        s = ad["held_out"]
        back = ad["steps_to_rebalance"]
        said = f"balance back after {back} steps" if back is not None else f"not back within {ad['steps']} steps"
        if back is not None and ad["balanced_from"] != back:
            stays = ad["balanced_from"]
            said += f", staying back from step {stays}" if stays is not None else ", not staying back"
        print(f"bias adapting: {ad['steps']} steps on {d['out']['name']} (lr {ad['lr']:g}, γ {ad['gamma']:g}): mean "
              f"MaxVio on D2 {s['maxvio_mean'][0]:.3f} -> {s['maxvio_mean'][-1]:.3f} (D1 frozen {ad['reference']:.3f}, "
              f"threshold {ad['threshold']:.3f}); {said}; loss D2 {s['loss'][0]:.3f} -> {s['loss'][-1]:.3f}, "
              f"D1 {fr['loss_in']:.3f} -> {ad['in_after']['loss']:.3f}")  # fmt: skip
    print(f"report: {files['html']}  (JSON {files['json']}, figures in {Path(files['html']).parent / 'figures'})")
    if run_id:
        print(f"MLflow run {run_id}")
