"""``raymoe analyze experts``: what a checkpoint's experts learned, from its recorded routing.

    raymoe analyze experts --checkpoint outputs/demo
    raymoe analyze experts --checkpoint outputs/run1 --domain web=web.jsonl --domain notes=notes/ --runner graph --ep 2

Each domain (default: the standard library split into code, docs and tests; or ``--domain NAME=PATH``,
any corpus ``prepare-data`` reads) is tokenized with the checkpoint's tokenizer and routed through the
model, on the local engine or on the actor graph. Writes ``experts.json``, ``figures/*.png`` and a
self-contained ``report.html`` to ``--out`` and logs them as an MLflow run of their own. The library
behind it is :mod:`raymoe.platform.analysis.run`; the formulas are in ``docs/analysis.md``.
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
    """Add the ``analyze`` subcommand and its ``experts`` analysis."""
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


def run(args: argparse.Namespace) -> int:
    """Analyze; exit code 0, or 2 with a one-line message naming the bad input."""
    from raymoe.platform.checkpoint.layout import CheckpointError
    from raymoe.platform.config import ConfigError
    from raymoe.platform.data.shards import DataError

    try:
        return _experts(args)
    except (AnalysisError, CheckpointError, ConfigError, DataError) as exc:
        print(f"raymoe analyze experts: {exc}", file=sys.stderr)
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
