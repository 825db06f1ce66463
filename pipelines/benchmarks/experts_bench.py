"""``raymoe bench experts``: serving under an expert budget, every configuration measured in its own process.

    raymoe bench experts                         # the bench checkpoint (trained once, as bench serve's)
    raymoe bench experts --budgets 100,25 --policies frequency --json
    raymoe bench experts --checkpoint outputs/demo --warm-dtype int4

Budgets (default 100, 50, 25 and 12.5 % of the routed experts' bytes in the compute dtype) under
each ranking policy (frequency: the loads of a calibration pass over the training split, run here
first with :func:`raymoe.platform.analysis.loads.calibrate`; uniform; random), against the full
model on the eager runner and (``--compile``, the default) on the compiled decode runner, the
fastest full-precision configuration. For each, in a fresh process:

- **resident memory, measured**: the growth of the process's anonymous resident bytes (``RssAnon``)
  from before loading to after loading, and to the end (decode workspaces and what the allocator
  kept of transient copies), its peak (``VmHWM``), and the expert tensors it holds (hot, warm, the
  cache's copies at the end); memory-mapped cold experts' pages are file-backed (``RssFile``),
  in the JSON apart;
- **tok/s** of greedy decode at batch 1 and 16 (``--new-tokens`` each, MTP drafts off, medians of
  ``--repeats`` runs after a warm-up);
- **held-out perplexity** over ``--eval-sequences`` validation sequences, and **greedy-token
  agreement**: the share of their positions whose argmax equals the full model's;
- the **cache hit rate** and the **prefetch hit rate** over the decode runs.

It prints the table, writes a Pareto figure (``--figure``: perplexity and batch-1 tok/s against
the expert bytes held) and with ``--json`` the report as the last line of stdout. Goal (issue 17):
at 25 % of the expert bytes, perplexity within +2 % of full and batch-1 tok/s at least 60 % of full.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

DEFAULT_FIGURE = "docs/figures/bench-experts-pareto.png"
GOAL_PPL_INCREASE = 0.02
GOAL_B1_RATIO = 0.60
GOAL_BUDGET = 25.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", help="default: the bench preset with MTP, trained once (outputs/bench-serve)")
    parser.add_argument("--train-steps", type=int, default=150, help="steps of the default checkpoint (150)")
    parser.add_argument("--data", help="prepared data (default: the built-in corpus for the checkpoint's vocabulary)")
    parser.add_argument("--budgets", default="100,50,25,12.5", help="percent of the routed experts' bytes")
    parser.add_argument("--policies", default="frequency,uniform,random")
    parser.add_argument("--warm-dtype", default="int8", help="fp8 | int8 | int4 (default int8)")
    parser.add_argument("--cold", default="offload", help="offload | quantized (default offload)")
    parser.add_argument("--eviction", default="lru", help="lru | lfu (default lru)")
    parser.add_argument("--prefetch", default="auto", help="auto (on CUDA only) | on | off")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--eval-sequences", type=int, default=16, help="held-out sequences (default 16)")
    parser.add_argument("--calibration-batches", type=int, default=8, help="batches of the calibration pass (8)")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens decoded per request (default 64)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled full-precision runner")
    parser.add_argument("--figure", default=DEFAULT_FIGURE, help=f"the Pareto PNG ({DEFAULT_FIGURE}; '' for none)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON, the last line of stdout")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # one configuration, in this process (JSON)


def main(args: argparse.Namespace) -> int:
    if args.worker:
        print("RESULT " + json.dumps(_worker(json.loads(args.worker))), flush=True)
        return 0
    report = run(args)
    print(format_table(report))
    if args.figure:
        pareto_figure(report, args.figure)
        print(f"figure: {args.figure}")
    if args.json:
        print(json.dumps(report))
    return 0


# --------------------------------------------------------------------------- one configuration


def _eval_rows(data: str, n: int) -> torch.Tensor:
    from raymoe.platform.data.loader import ShardStore

    store = ShardStore(data, "validation")
    return store.rows(torch.arange(min(n, len(store)))).long()  # [n, S + 1]


def _heldout(runner: Any, rows: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Mean NLL over the rows' next tokens through the runner (one prefill per sequence), and the argmax ids."""
    from raymoe.platform.inference.batch import SeqRun, build_step

    nll, count, argmax = 0.0, 0, []
    blocks = list(range(1, -(-rows.shape[1] // runner.block_size) + 1))
    for row in rows:
        ids, labels = row[:-1].tolist(), row[1:]
        batch = build_step([SeqRun(ids, 0, blocks)], runner.block_size, runner.naive_min_run)
        logits, _ = runner.main(batch, torch.arange(len(ids)))
        nll += float(torch.nn.functional.cross_entropy(logits.float(), labels, reduction="sum"))
        count += len(ids)
        argmax.append(logits.argmax(-1))
    return nll / count, torch.stack(argmax)


def _decode(runner: Any, prompts: list[list[int]], new_tokens: int, repeats: int) -> dict[str, Any]:
    from raymoe.platform.inference.engine import Engine, EngineConfig, run_to_completion
    from raymoe.platform.inference.sampling import SamplingParams

    need = len(prompts) * (max(map(len, prompts)) + new_tokens + runner.block_size)
    engine = Engine(runner, EngineConfig(max_batch_size=len(prompts), cache_tokens=need, speculative=False))
    params = [SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)] * len(prompts)
    run_to_completion(engine, prompts, [SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)] * len(prompts))
    store = getattr(runner, "tiered", None)
    if store is not None:
        store.counters.clear()
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        outs = run_to_completion(engine, prompts, params)
        rates.append(sum(map(len, outs)) / (time.perf_counter() - t0))
    out: dict[str, Any] = {"tokens_per_s": statistics.median(rates), "runs": rates}
    if store is not None:
        store.drain()
        c = store.stats()["expert_cache"]
        out |= {"hit_rate": c["hit_rate"], "prefetch_hit_rate": c["prefetch_hit_rate"], "uses": c["uses"],
                "uncached": c["uncached"]}  # fmt: skip
    return out


def _worker(job: dict[str, Any]) -> dict[str, Any]:
    """Load one configuration, measure it, return its row (see the module docstring)."""
    from raymoe.platform.checkpoint.reader import load_model
    from raymoe.platform.inference.expert_store import load_tiered, rss_bytes
    from raymoe.platform.inference.loading import open_served
    from raymoe.platform.inference.runner import LocalRunner, cache_blocks
    from raymoe.platform.inference.tiers import TierConfig, plan_for_checkpoint

    dtype = getattr(torch, job["dtype"])
    rows = _eval_rows(job["data"], job["eval_sequences"])
    served = open_served(job["checkpoint"], tokenizer_required=False)  # token ids only
    before = rss_bytes()
    t0 = time.perf_counter()
    blocks, block = cache_blocks(job["cache_tokens"], 16), 16
    plan = None
    if job["budget"] is None:
        model = load_model(served.reader, dtype=dtype)
        if job.get("compiled"):
            from raymoe.platform.inference.compiled import CompiledLocalRunner

            runner = CompiledLocalRunner(model, blocks, block)
        else:
            runner = LocalRunner(model, blocks, block)
        held = {"total": sum(m.experts.gate_up_proj.nbytes + m.experts.down_proj.nbytes
                             for m in model.moe_by_layer().values())}  # fmt: skip
    else:
        config = TierConfig(budget=f"{job['budget']}%", warm_dtype=job["warm_dtype"], cold=job["cold"],
                            policy=job["policy"], eviction=job["eviction"], prefetch=job["prefetch"])  # fmt: skip
        plan = plan_for_checkpoint(served.location, served.model_config, dtype, config, job.get("stats"))
        model, store = load_tiered(served.reader, plan, dtype)
        runner = LocalRunner(model, blocks, block, experts=store)
        held = store.held_bytes()
    load_s = time.perf_counter() - t0
    loaded = rss_bytes()
    nll, argmax = _heldout(runner, rows)
    agreement = None
    if job.get("reference"):
        ref = torch.load(job["reference"])
        agreement = float((argmax == ref).float().mean())
    else:
        torch.save(argmax, job["save_argmax"])
    text = rows[:, : job["prompt_len"]].tolist()
    b1 = _decode(runner, text[:1], job["new_tokens"], job["repeats"])
    b16 = _decode(runner, (text * 16)[:16], job["new_tokens"], job["repeats"])
    if plan is not None:
        held = runner.tiered.held_bytes()
    end = rss_bytes()
    runner.close()
    return {
        "name": job["name"], "budget": job["budget"], "policy": job.get("policy"),
        "tiers": plan.counts if plan else {"hot": None}, "ranking": plan.ranking if plan else None,
        "load_s": load_s, "expert_held_bytes": held["total"], "held": held,
        "rss_anon_loaded": loaded.get("RssAnon", 0) - before.get("RssAnon", 0),
        "rss_anon_end": end.get("RssAnon", 0) - before.get("RssAnon", 0),
        "rss_file_end": end.get("RssFile", 0), "peak_rss": end.get("VmHWM", 0),
        "nll": nll, "ppl": float(torch.tensor(nll).exp()), "agreement": agreement,
        "b1": b1, "b16": b16, "threads": torch.get_num_threads(),
    }  # fmt: skip


def _spawn(job: dict[str, Any]) -> dict[str, Any]:
    # -P: the working directory off sys.path, as in model_bench (a checkout's kernels/ shadows transformers' `kernels`)
    cmd = [sys.executable, "-P", "-m", "raymoe.pipelines.cli", "bench", "experts", "--worker", json.dumps(job)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"bench experts: configuration {job['name']} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


# --------------------------------------------------------------------------- the run


def run(args: argparse.Namespace) -> dict[str, Any]:
    from raymoe.pipelines.benchmarks.serve_bench import ensure_checkpoint
    from raymoe.platform.checkpoint.reader import open_checkpoint

    t_start = time.perf_counter()
    checkpoint = args.checkpoint or ensure_checkpoint("outputs/bench-serve", args.train_steps)
    cfg = open_checkpoint(checkpoint).model_config
    data = args.data or str(Path("data") / f"stdlib-{cfg.vocab_size}-256")
    budgets = [float(b) for b in args.budgets.split(",")]
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    tmp = Path(tempfile.mkdtemp(prefix="raymoe-bench-experts-"))
    stats = None
    if "frequency" in policies and any(b < 100 for b in budgets):
        from raymoe.platform.analysis.loads import calibrate

        t0 = time.perf_counter()
        loads = calibrate(checkpoint, data, batches=args.calibration_batches)
        stats = str(tmp / "expert_loads.json")
        loads.save(stats)
        print(f"bench experts: calibrated on {loads.tokens:,} tokens of {data} in {time.perf_counter() - t0:.0f} s",
              flush=True)  # fmt: skip
    base = {"checkpoint": checkpoint, "data": data, "dtype": args.dtype, "eval_sequences": args.eval_sequences,
            "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "repeats": args.repeats,
            "cache_tokens": 16 * (args.prompt_len + args.new_tokens + 32), "warm_dtype": args.warm_dtype,
            "cold": args.cold, "eviction": args.eviction, "prefetch": args.prefetch, "stats": stats}  # fmt: skip
    reference = str(tmp / "argmax.pt")
    jobs = [{**base, "name": "full, eager", "budget": None, "save_argmax": reference}]
    if not args.no_compile:
        jobs.append({**base, "name": "full, compiled", "budget": None, "compiled": True, "reference": reference})
    for budget in budgets:
        for policy in policies if budget < 100 else policies[:1]:
            name = f"{budget:g} %, {policy}" if budget < 100 else "100 %"
            jobs.append({**base, "name": name, "budget": budget, "policy": policy, "reference": reference})
    rows = []
    for job in jobs:
        print(f"bench experts: {job['name']} ...", flush=True)
        rows.append(_spawn(job))
    full = rows[0]
    for r in rows:
        r["ppl_increase"] = r["ppl"] / full["ppl"] - 1
        r["b1_ratio"] = r["b1"]["tokens_per_s"] / full["b1"]["tokens_per_s"]
        r["b16_ratio"] = r["b16"]["tokens_per_s"] / full["b16"]["tokens_per_s"]
        r["held_fraction"] = r["expert_held_bytes"] / full["expert_held_bytes"]
    goal = [r for r in rows if r["budget"] == GOAL_BUDGET and r["policy"] == "frequency"]
    best_b1 = max(r["b1"]["tokens_per_s"] for r in rows if r["budget"] is None)  # eager or compiled
    return {
        "checkpoint": checkpoint, "data": data, "dtype": args.dtype, "warm_dtype": args.warm_dtype,
        "cold": args.cold, "eviction": args.eviction, "prefetch": args.prefetch,
        "rows": rows, "seconds": time.perf_counter() - t_start,
        "goal": None if not goal else {
            "ppl_increase": goal[0]["ppl_increase"], "b1_ratio": goal[0]["b1_ratio"],
            "b1_ratio_best": goal[0]["b1"]["tokens_per_s"] / best_b1,
            "met": goal[0]["ppl_increase"] <= GOAL_PPL_INCREASE and goal[0]["b1_ratio"] >= GOAL_B1_RATIO,
        },
        "date": time.strftime("%Y-%m-%d"), "cpu_count": os.cpu_count(),
    }  # fmt: skip


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def format_table(report: dict[str, Any]) -> str:
    lines = [
        f"bench experts: {report['checkpoint']} ({report['dtype']}; warm {report['warm_dtype']}, cold "
        f"{report['cold']}, {report['eviction']}, prefetch {report['prefetch']}); "
        f"{report['seconds']:.0f} s",
        "| configuration | hot/warm/cold | expert MiB held | RssAnon MiB loaded / end | ppl | Δ ppl % | agree % "
        "| b1 tok/s | b1 × full | b16 tok/s | b16 × full | cache hit % | prefetch hit % |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in report["rows"]:
        t = r["tiers"]
        tiers = "–" if t.get("hot") is None else f"{t['hot']}/{t['warm']}/{t['cold']}"
        lines.append(
            f"| {r['name']} | {tiers} | {r['expert_held_bytes'] / 2**20:.1f} "
            f"| {r['rss_anon_loaded'] / 2**20:.0f} / {r['rss_anon_end'] / 2**20:.0f} "
            f"| {r['ppl']:.3f} | {100 * r['ppl_increase']:+.2f} | {_pct(r['agreement'])} "
            f"| {r['b1']['tokens_per_s']:.1f} | {r['b1_ratio']:.2f} | {r['b16']['tokens_per_s']:.1f} "
            f"| {r['b16_ratio']:.2f} | {_pct(r['b1'].get('hit_rate'))} | {_pct(r['b1'].get('prefetch_hit_rate'))} |"
        )
    g = report.get("goal")
    if g:
        lines.append(f"goal at {GOAL_BUDGET:g} % (frequency): ppl {100 * g['ppl_increase']:+.2f} % (≤ +2 %), batch-1 "
                     f"{g['b1_ratio']:.2f} × full eager (≥ 0.60): {'met' if g['met'] else 'NOT met'}; "
                     f"{g['b1_ratio_best']:.2f} × the fastest full-precision configuration")  # fmt: skip
    return "\n".join(lines)


def pareto_figure(report: dict[str, Any], path: str) -> None:
    """Perplexity and batch-1 tok/s against the expert bytes held, one series per policy."""
    from matplotlib.figure import Figure

    from raymoe.platform.plots import save_figure

    fig = Figure(figsize=(11, 4.2))
    axes = fig.subplots(1, 2)
    rows = report["rows"]
    full = [r for r in rows if r["budget"] is None or r["budget"] >= 100]
    series: dict[str, list[dict]] = {}
    for r in rows:
        if r["budget"] is not None and r["budget"] < 100:
            series.setdefault(r["policy"], []).append(r)
    for ax, key, label in ((axes[0], "ppl", "held-out perplexity"), (axes[1], "b1", "batch-1 decode tok/s")):
        for policy, rs in series.items():
            rs = sorted(rs + [r for r in full if r["budget"] is not None], key=lambda r: r["held_fraction"])
            ys = [r[key] if key == "ppl" else r[key]["tokens_per_s"] for r in rs]
            ax.plot([100 * r["held_fraction"] for r in rs], ys, marker="o", label=policy)
        for r in full:
            y = r[key] if key == "ppl" else r[key]["tokens_per_s"]
            ax.scatter([100 * r["held_fraction"]], [y], marker="*", s=120, zorder=3, label=r["name"])
        ax.set_xlabel("routed-expert bytes held (% of full)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"raymoe bench experts ({report['date']}, warm {report['warm_dtype']}, cold {report['cold']})")
    fig.tight_layout()
    save_figure(fig, path)
