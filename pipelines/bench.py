"""``raymoe bench``: benchmarks that print a table (and write JSON); they compare side by side in one run.

    raymoe bench model                          # the bench preset: ours vs transformers, fp32 and bf16
    raymoe bench model --json --out bench.json  # the report as JSON too (the last line of stdout)
    raymoe bench model --quick                  # seconds: tiny preset, ours vs transformers eager, fp32
    raymoe bench model --impls ours,grouped_mm --dtypes bf16 train.batch_size=4
    raymoe bench model --impls ours,ours+compile,grouped_mm,grouped_mm+compile --dtypes bf16  # compiled too
    raymoe bench graph                          # the local trainer against the actor graph at 4 layouts
    raymoe bench graph --json --dtype bf16 --steps 5
    raymoe bench experts                        # serving under an expert budget (issue 17)
    raymoe bench placement                      # experts balanced, replicated and re-placed on the graph

``raymoe bench model`` is :mod:`raymoe.pipelines.benchmarks.model_bench`, ``raymoe bench graph``
:mod:`raymoe.pipelines.benchmarks.graph_bench`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

from raymoe.pipelines.benchmarks.model_bench import (
    COMPILED,
    DTYPES,
    IMPLEMENTATIONS,
    MODES,
    OURS,
    BenchOptions,
    Job,
    check_options,
    is_ours,
    plan_jobs,
    run_model_bench,
)

# 1-min load average above which timings are flagged: with other processes on the 2 cores, a
# 2-thread 256^3 fp32 matmul measured 0.0014 TFLOP/s against 0.077 on one thread (load 3.6)
BUSY_LOAD_AVERAGE = 1.0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``bench`` subcommand and its benchmarks (``bench model``, ``bench graph``)."""
    parser = subparsers.add_parser("bench", help="benchmarks: tables of tokens/s, MFU and memory", description=__doc__)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    benchmarks = parser.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    _register_model(benchmarks)
    _register_graph(benchmarks)
    _register_recovery(benchmarks)
    benchmarks_dir = "raymoe.pipelines.benchmarks"
    _register_module(benchmarks, "serve", f"{benchmarks_dir}.serve_bench", "serving: decode, HTTP streams, MTP")
    _register_module(benchmarks, "experts", f"{benchmarks_dir}.experts_bench",
                     "serving under an expert budget: memory, tok/s, perplexity, cache hits")  # fmt: skip
    _register_module(benchmarks, "placement", f"{benchmarks_dir}.placement_bench",
                     "experts on the serving graph's shards: balanced, replicated, re-placed live")  # fmt: skip
    _register_module(benchmarks, "kernels", f"{benchmarks_dir}.kernel_bench", "Triton kernels against torch (GPU)")
    _register_module(benchmarks, "attention", f"{benchmarks_dir}.attention_bench",
                     "naive against absorbed MLA over the paged cache, per run length")  # fmt: skip


def _register_module(benchmarks: argparse._SubParsersAction, name: str, module: str, help: str) -> None:
    """A benchmark whose module defines ``add_arguments(parser)`` and ``main(args) -> exit code``."""
    import importlib

    mod = importlib.import_module(module)
    parser = benchmarks.add_parser(name, help=help, description=mod.__doc__)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    mod.add_arguments(parser)
    parser.set_defaults(func=mod.main)


def _csv(text: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in text.split(",") if item.strip())


def _register_model(benchmarks: argparse._SubParsersAction) -> None:
    defaults, quick = BenchOptions(), BenchOptions.quick()
    parser = benchmarks.add_parser(
        "model",
        help="our training step and greedy decode against transformers' DeepseekV3, fp32 and bf16",
        description=(
            "Measure the matmul rates of this machine, then our training step and greedy decode and those of "
            "transformers' DeepseekV3ForCausalLM (each experts implementation) in float32 and bf16, every "
            "configuration in its own process; print a table of tokens/s, ratios, MFU and peak memory."
        ),
    )
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. train.batch_size=4")
    parser.add_argument("--preset", help=f"preset or .yaml (default {defaults.preset}; {quick.preset} with --quick)")
    parser.add_argument(
        "--impls",
        type=_csv,
        help=f"comma list of {','.join(IMPLEMENTATIONS)} (default all; {OURS},eager with --quick), each also as "
        f"IMPL{COMPILED} (training with torch.compile; its first step, which compiles, is shown apart)",
    )
    parser.add_argument(
        "--dtypes", type=_csv, help=f"comma list of {','.join(DTYPES)} (default both; fp32 with --quick)"
    )
    parser.add_argument("--warmup-steps", type=int, help=f"untimed training steps (default {defaults.warmup_steps})")
    parser.add_argument("--train-steps", type=int, help=f"timed training steps (default {defaults.train_steps})")
    parser.add_argument("--prompt-len", type=int, help=f"decode prompt tokens (default {defaults.prompt_len})")
    parser.add_argument("--decode-tokens", type=int, help=f"new tokens per generate (default {defaults.decode_tokens})")
    parser.add_argument("--decode-repeats", type=int, help=f"timed generate calls (default {defaults.decode_repeats})")
    parser.add_argument("--timeout-s", type=float, help=f"per configuration (default {defaults.worker_timeout_s:g})")
    parser.add_argument("--memory-limit-mib", type=int, help="address-space limit per worker (default 75%% of free)")
    parser.add_argument("--quick", action="store_true", help="a smoke test: tiny preset, one timed step, few tokens")
    parser.add_argument("--device", choices=["cpu", "cuda"], help="where every configuration runs (default cpu)")
    parser.add_argument("--json", action="store_true", help="also print the report as one JSON object (last line)")
    parser.add_argument("--out", type=Path, help="write the JSON report to this file")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run_model)


def options_from_args(args: argparse.Namespace) -> BenchOptions:
    """The :class:`BenchOptions` of the command line: ``--quick``'s or the defaults, then each given flag."""
    base = BenchOptions.quick() if args.quick else BenchOptions()
    given = {
        "preset": args.preset,
        "impls": args.impls,
        "dtypes": args.dtypes,
        "warmup_steps": args.warmup_steps,
        "train_steps": args.train_steps,
        "prompt_len": args.prompt_len,
        "decode_tokens": args.decode_tokens,
        "decode_repeats": args.decode_repeats,
        "worker_timeout_s": args.timeout_s,
        "memory_limit_mib": args.memory_limit_mib,
        "device": args.device,
    }
    changes = {name: value for name, value in given.items() if value is not None}
    return dataclasses.replace(base, overrides=list(args.overrides), **changes)


def run_model(args: argparse.Namespace) -> int:
    """Run ``raymoe bench model``; exit code 1 when a configuration of ours failed, else 0."""
    from tqdm import tqdm

    opts = options_from_args(args)
    check_options(opts)  # a bad option fails now, not after minutes of benchmarking
    with tqdm(total=len(plan_jobs(opts)), desc="bench model", unit="run", disable=args.no_progress or None) as bar:

        def progress(job: Job, result: dict[str, Any]) -> None:
            bar.set_postfix_str(job.label)
            bar.update()

        report = run_model_bench(opts, progress)
    print(format_table(report))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    if args.json:
        print(json.dumps(report))
    ours_failed = any(is_ours(c["impl"]) and (c["train_error"] or c["decode_error"]) for c in report["configs"])
    return 1 if ours_failed else 0


def _cell(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def format_table(report: dict[str, Any]) -> str:
    """The report as aligned columns, then the failures, the speedups and the peak memory."""
    rates = report["matmul_tflops"]
    header = ("impl", "dtype", "train tok/s", "x HF", "MFU", "peak MiB", "1st step s", "decode tok/s", "x HF", "MFU",
              "peak MiB")  # fmt: skip
    best_hf = {}
    for mode in MODES:
        key = f"{mode}_tokens_per_s"
        hf = [c[key] for c in report["configs"] if not is_ours(c["impl"]) and c[key]]
        best_hf[mode] = max(hf, default=None)
    rows = []
    for c in report["configs"]:
        row = [c["impl"] if is_ours(c["impl"]) else f"hf {c['impl']}", c["dtype"]]
        for mode in MODES:
            tps = c[f"{mode}_tokens_per_s"]
            ratio = tps / best_hf[mode] if tps and best_hf[mode] else None
            extra = [_cell(c.get(f"{mode}_first_s"), ".2f")] if mode == "train" else []
            if tps is None:  # failed, or not run (decode of a +compile row)
                row += ["failed" if c[f"{mode}_error"] else "-", "-", "-", "-", *(["-"] if extra else [])]
                continue
            row += [format(tps, ",.1f"), _cell(ratio, ".2f"), _cell(c[f"{mode}_mfu"], ".1%")]
            row += [_cell(c[f"{mode}_peak_mib"], ",.0f"), *extra]
        rows.append(row)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: tuple[str, ...] | list[str]) -> str:
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    matmul = "  ".join(
        f"{s['dtype']} {s['name']} {s['m']}x{s['k']}x{s['n']}: {s['tflops']:.2f}" for s in report["matmul"]
    )
    out = [
        f"raymoe bench model: preset {report['preset']}, train {report['batch_size']}x{report['seq_len']} tokens "
        f"({report['warmup_steps']} warmup + {report['train_steps']} timed steps), decode batch 1 "
        f"{report['prompt_len']}-token prompt + {report['decode_tokens']} new tokens (x{report['decode_repeats']}), "
        f"{report['threads']} threads"
        + (f", on {report.get('device_name') or 'cuda'}" if report.get("device") == "cuda" else ", on the CPU"),
        f"matmul TFLOP/s  {matmul or report['matmul_error']}",
        "MFU against " + ", ".join(f"{d} {r:.2f} TFLOP/s" for d, r in rates.items()) + "; x HF = over transformers' "
        "fastest",
        "",
        line(header),
        line(["-" * w for w in widths]),
        *(line(r) for r in rows),
    ]
    failures = [
        f"  {c['impl']} {c['dtype']} {mode}: {c[f'{mode}_error']}"
        for c in report["configs"]
        for mode in MODES
        if c[f"{mode}_error"]
    ]
    if failures:
        out += ["", "failed:", *failures]
    out.append("")
    for mode in MODES:
        speedup, fastest, peak = report[f"{mode}_speedup"], report["fastest"][mode], report["peak_mib"][mode]
        if speedup is None:
            out.append(f"{mode} speedup: n/a (ours {fastest['ours']}, transformers {fastest['transformers']})")
            continue
        out.append(
            f"{mode} speedup: {speedup:.2f}x  ({fastest['ours']} over transformers {fastest['transformers']}; "
            f"peak {peak['ours']:,.0f} vs {peak['transformers']:,.0f} MiB)"
        )
    out.append(
        f"skipped: {'; '.join(report['skipped'])}.  took {report['seconds']:.0f} s; 1-min load average "
        f"{report['load_average'][0]:.2f} before the bench"
    )
    if report["load_average"][0] > BUSY_LOAD_AVERAGE:
        out.append(
            f"WARNING: the machine was busy when the bench started (load average {report['load_average'][0]:.2f}): "
            "threads that wait for each other slow down many times over; rerun on a quiet machine"
        )
    return "\n".join(out)


# --------------------------------------------------------------------------- raymoe bench graph


def _register_graph(benchmarks: argparse._SubParsersAction) -> None:
    from raymoe.pipelines.benchmarks import graph_bench

    defaults = graph_bench.GraphBenchOptions()
    layouts = " ".join(",".join(map(str, layout)) for layout in defaults.layouts)
    parser = benchmarks.add_parser(
        "graph",
        help="the training step of the local trainer against the actor graph at several (dp,pp,ep)",
        description=(
            "Train the same random batch with the local trainer and with the actor graph at each (dp,pp,ep) "
            "layout, one after another in one Ray session; print each one's median step time, its ratio to "
            "the local trainer, tokens/s and the step split into compute and transfer+wait."
        ),
    )
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. train.batch_size=4")
    parser.add_argument("--preset", help=f"preset or .yaml (default {defaults.preset})")
    parser.add_argument("--layouts", help=f"space- or ;-separated dp,pp,ep triples (default {layouts!r})")
    parser.add_argument("--no-local", action="store_true", help="skip the local trainer (no ratios then)")
    parser.add_argument("--no-ray-train", action="store_true", help="skip the Ray Train rows")
    parser.add_argument("--transports", help="parallel.transport of the graph rows (default 'object_store,direct')")
    parser.add_argument("--dtype", help="fp32 or bf16 (default: the preset's train.dtype)")
    parser.add_argument(
        "--micro-batches",
        type=int,
        help=f"micro-batches of the global batch, on every row (default {defaults.micro_batches})",
    )
    parser.add_argument("--warmup-steps", type=int, help=f"untimed steps per row (default {defaults.warmup_steps})")
    parser.add_argument("--steps", type=int, help=f"timed steps per row (default {defaults.steps})")
    parser.add_argument(
        "--actor-threads",
        type=int,
        help=f"RAYMOE_ACTOR_THREADS of all actors; 0 = unset: a share of the cores (default {defaults.actor_threads})",
    )
    parser.add_argument(
        "--actor-env", action="append", default=[], metavar="KEY=VALUE", help="an environment variable for the actors"
    )
    parser.add_argument("--json", action="store_true", help="also print the report as one JSON object (last line)")
    parser.add_argument("--out", type=Path, help="write the JSON report to this file")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run_graph)


def graph_options_from_args(args: argparse.Namespace) -> Any:
    """The :class:`~raymoe.pipelines.benchmarks.graph_bench.GraphBenchOptions` of the command line."""
    from raymoe.pipelines.benchmarks.graph_bench import GraphBenchOptions, parse_layouts
    from raymoe.platform.config import TRANSPORTS, ConfigError

    env = {}
    for item in args.actor_env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--actor-env {item!r}: expected KEY=VALUE")
        env[key] = value
    given = {
        "preset": args.preset,
        "layouts": parse_layouts(args.layouts) if args.layouts is not None else None,
        "dtype": args.dtype,
        "micro_batches": args.micro_batches,
        "warmup_steps": args.warmup_steps,
        "steps": args.steps,
        "actor_threads": args.actor_threads,
    }
    changes = {name: value for name, value in given.items() if value is not None}
    if args.transports is not None:
        changes["transports"] = tuple(t.strip() for t in args.transports.split(",") if t.strip())
        bad = [t for t in changes["transports"] if t not in TRANSPORTS]
        if bad or not changes["transports"]:
            raise ConfigError(f"--transports: each must be one of {', '.join(TRANSPORTS)}, got {args.transports!r}")
    return GraphBenchOptions(overrides=list(args.overrides), local=not args.no_local, actor_env=env,
                             ray_train=not args.no_ray_train, **changes)  # fmt: skip


def run_graph(args: argparse.Namespace) -> int:
    """Run ``raymoe bench graph``; exit code 1 when a row failed, else 0."""
    from tqdm import tqdm

    from raymoe.pipelines.benchmarks import graph_bench

    opts = graph_options_from_args(args)
    graph_bench.check_options(opts)  # a bad option fails now, not after minutes of benchmarking
    steps_per_row = opts.warmup_steps + opts.steps  # Ray Train rows run in their workers: no progress calls
    total = sum(steps_per_row for kind, _ in graph_bench.plan_rows(opts) if kind != graph_bench.TRAIN)
    with tqdm(total=total, desc="bench graph", unit="step", disable=args.no_progress or None) as bar:

        def progress(label: str) -> None:
            bar.set_postfix_str(label)
            bar.update()

        report = graph_bench.run(opts, progress)
    print(graph_bench.format_table(report))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    if args.json:
        print(json.dumps(report))
    return 1 if any(r["error"] for r in report["rows"]) else 0


def _register_recovery(benchmarks: argparse._SubParsersAction) -> None:
    parser = benchmarks.add_parser("recovery", help="seconds the elastic graph takes to recover from a killed actor")
    parser.add_argument("preset", nargs="?", default="small", help="preset (default small)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides")
    parser.add_argument("--kill-after", type=int, default=12, help="SIGKILL the actor after this step (default 12)")
    parser.add_argument("--victim", default="Shard(1)", help="the actor to kill (default 'Shard(1)')")
    parser.add_argument("--data", help="prepared data (default: the stdlib corpus, prepared on first use)")
    parser.add_argument("--json", action="store_true", help="one JSON object as the last line")

    def _run(args: argparse.Namespace) -> int:
        from raymoe.pipelines.benchmarks.recovery_bench import main

        return main(args)

    parser.set_defaults(func=_run)
