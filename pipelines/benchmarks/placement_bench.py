"""``raymoe bench placement``: expert placement on the serving graph under a skewed workload.

    raymoe bench placement                       # the bench checkpoint, ep=4, on Ray actors
    raymoe bench placement --ep 2 --redundant 8 --json
    raymoe bench placement --in-process          # the same schedule without Ray (the math only)

The graph runner (one stage, ``--ep`` expert shards) serves the same greedy requests under each
placement, one after another on one Ray:

- ``contiguous``: experts in blocks (the default);
- ``training loads``: balanced by the loads the checkpoint's training run saved
  (:func:`raymoe.platform.analysis.loads.find_loads`);
- ``live``: balanced by the counts of an observation run of the workload on the contiguous graph;
- ``live + R copies``: the same with ``--redundant`` extra copies of the hottest experts per layer;
- ``re-placed live``: starts contiguous, with ``rebalance_every`` (``--rebalance-every``) so that the
  runner re-places (with the copies) from its own counts during the runs, where that pays.

The workload is skewed on purpose: every prompt is a piece of one standard-library module's
source (``json``'s decoder and encoder), as a deployment that serves one kind of text sees. The
observation run uses other pieces of it than the measured runs. For each placement it reports,
**measured** from the shards' own counts of (row, expert) pairs over the measured runs, max/mean
tokens per shard (1.0 is even), the expert copies and the largest shard's expert bytes against the
mean, and decode tok/s (median of ``--repeats``). On one machine the shards share its cores, so an
even split is not expected to raise tok/s here: the shard that computes most is what a step waits
for once each shard has its own GPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import torch


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", help="default: the bench preset with MTP, trained once (outputs/bench-serve)")
    parser.add_argument("--train-steps", type=int, default=150, help="steps of the default checkpoint (150)")
    parser.add_argument("--ep", type=int, default=4, help="expert shards (default 4)")
    parser.add_argument("--redundant", type=int, default=4, help="extra expert copies per MoE layer (default 4)")
    parser.add_argument("--rebalance-every", type=int, default=16, help="the re-placing runner's interval (16 steps)")
    parser.add_argument("--requests", type=int, default=16, help="concurrent requests (default 16)")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--in-process", action="store_true", help="plain objects in this process instead of Ray")
    parser.add_argument("--json", action="store_true", help="print the report as JSON, the last line of stdout")


def main(args: argparse.Namespace) -> int:
    report = run(args)
    lines = [format_table(report), f"measured in {report['seconds']:.0f} s on {report['date']}"]
    print("\n".join(lines + ([json.dumps(report)] if args.json else [])))
    return 0


def _serve(runner: Any, prompts: list[list[int]], new_tokens: int) -> tuple[int, float]:
    from raymoe.platform.inference.engine import Engine, EngineConfig, run_to_completion
    from raymoe.platform.inference.sampling import SamplingParams

    need = len(prompts) * (max(map(len, prompts)) + new_tokens + runner.block_size)
    engine = Engine(runner, EngineConfig(max_batch_size=len(prompts), cache_tokens=need, speculative=False))
    params = [SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)] * len(prompts)
    t0 = time.perf_counter()
    outs = run_to_completion(engine, prompts, params)
    return sum(map(len, outs)), time.perf_counter() - t0


def _measure(name: str, runner: Any, observe: list[list[int]], measured: list[list[int]], args: Any) -> dict:
    """Observation run (the live counts; a re-placing runner moves its experts here), then the measured runs."""
    from raymoe.actors.placement import imbalance, shard_loads

    _serve(runner, observe, args.new_tokens)
    observed = torch.tensor(runner.expert_loads()["loads"], dtype=torch.float64)
    before_tokens = runner.shard_tokens()
    before_loads = torch.tensor(runner.expert_loads()["loads"], dtype=torch.float64)
    rates = []
    for _ in range(args.repeats):
        n, seconds = _serve(runner, measured, args.new_tokens)
        rates.append(n / seconds)
    per_shard = (runner.shard_tokens() - before_tokens).double()  # [layers, ep], measured by the shards
    loads = torch.tensor(runner.expert_loads()["loads"], dtype=torch.float64) - before_loads
    stats = runner.stats()
    experts = [v for k, v in stats["actor_param_bytes"].items() if k.startswith("Shard")]
    return {
        "placement": name,
        "shard_tokens": per_shard.sum(0).tolist(),
        "imbalance": imbalance(per_shard),
        "total_imbalance": float(per_shard.sum(0).max() / per_shard.sum(0).mean()),
        "predicted": imbalance(shard_loads(runner.placement, loads)),
        "copies": runner.placement.num_replicas,
        "moved": sum(r["moved"] for r in runner.rebalances),
        "rebalances": len(runner.rebalances),
        "expert_bytes_max_over_mean": max(experts) / (sum(experts) / len(experts)),
        "expert_bytes": experts,
        "tokens_per_s": statistics.median(rates),
        "runs": rates,
        "_observed": observed,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    from raymoe.actors.graph import GraphRunner
    from raymoe.actors.runtime import ensure_ray
    from raymoe.pipelines.benchmarks.serve_bench import _prompts, ensure_checkpoint
    from raymoe.platform.analysis.loads import find_loads
    from raymoe.platform.inference.loading import open_served
    from raymoe.platform.inference.runner import cache_blocks

    checkpoint = args.checkpoint or ensure_checkpoint("outputs/bench-serve", args.train_steps)
    served = open_served(checkpoint)
    cfg = served.model_config
    n, length = args.requests, args.prompt_len
    observe = _prompts(served.tokenizer, n, length, offset=0)
    measured = _prompts(served.tokenizer, n, length, offset=n * length)
    if not args.in_process:
        ensure_ray()
    blocks = cache_blocks(2 * n * (length + args.new_tokens + 16), 16)
    dtype = getattr(torch, args.dtype)

    def runner(**kw: Any) -> GraphRunner:
        return GraphRunner(served.location, cfg, blocks, 16, pp=1, ep=args.ep, dtype=dtype,
                           in_process=args.in_process, **kw)  # fmt: skip

    rows, live = [], None
    training = find_loads(served.location)
    configs: list[tuple[str, dict]] = [("contiguous", {})]
    if training is not None:
        configs.append((f"{training.source} loads", {"expert_loads": training.loads}))
    configs += [("live", {}), (f"live + {args.redundant} copies", {"redundant": args.redundant}),
                ("re-placed live", {"redundant": args.redundant, "rebalance_every": args.rebalance_every})]  # fmt: skip
    t_start = time.perf_counter()
    for name, kw in configs:
        if name.startswith("live"):
            kw = {**kw, "expert_loads": live}
        r = runner(**kw)
        try:
            row = _measure(name, r, observe, measured, args)
        finally:
            r.close()
        if name == "contiguous":
            live = row["_observed"]  # the observation run's counts on the contiguous graph
        del row["_observed"]
        rows.append(row)
        print(f"bench placement: {name}: max/mean {row['imbalance']:.2f}, {row['tokens_per_s']:.1f} tok/s", flush=True)
    return {"checkpoint": served.location, "ep": args.ep, "redundant": args.redundant, "requests": n,
            "prompt_len": length, "new_tokens": args.new_tokens, "dtype": args.dtype,
            "actors": "in process" if args.in_process else "Ray actors", "rows": rows,
            "date": time.strftime("%Y-%m-%d"), "seconds": time.perf_counter() - t_start}  # fmt: skip


def format_table(report: dict[str, Any]) -> str:
    head = (f"bench placement: {report['checkpoint']} ({report['dtype']}; 1 stage, {report['ep']} expert shards, "
            f"{report['actors']}; {report['requests']} requests x {report['new_tokens']} tokens, "
            "skewed prompts)")  # fmt: skip
    lines = [head, "| placement | max/mean tokens per shard | predicted | copies | moved | "
             "expert bytes max/mean | tok/s |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for r in report["rows"]:
        lines.append(f"| {r['placement']} | {r['imbalance']:.2f} | {r['predicted']:.2f} | {r['copies']} | "
                     f"{r['moved']} | {r['expert_bytes_max_over_mean']:.2f} | {r['tokens_per_s']:.1f} |")  # fmt: skip
    return "\n".join(lines)
