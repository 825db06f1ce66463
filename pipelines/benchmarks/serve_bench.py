"""``raymoe bench serve``: the serving engine against transformers, and the Serve app under concurrent streams.

    raymoe bench serve                      # trains a bench-preset checkpoint with MTP once (outputs/bench-serve)
    raymoe bench serve --checkpoint DIR     # any checkpoint (MTP modules make the MTP rows meaningful)
    raymoe bench serve --json               # the report as one JSON object, the last line of stdout

In one run, side by side:

1. **Batch-1 decode in this process** (bf16, greedy, a prompt of real text, exactly
   ``--new-tokens`` tokens): transformers' ``DeepseekV3ForCausalLM.generate`` on the same weights
   (exported to its format), our engine with MTP speculative decoding off, and on (with its
   acceptance rate).
2. **HTTP**: one Serve replica of ``raymoe.pipelines.serve``; 1, 16 and 64 concurrent clients, each
   streaming ``--requests`` completions one after another, prompts of mixed lengths (every other
   one ``--long-prompt-len`` tokens, the rest ``--prompt-len``): aggregate tokens/s, time to first
   token, inter-token latency (the gap between a stream's consecutive events, with the replica's
   ``stream_interval_ms`` 0 so that each engine step's tokens go at once) and request latency
   (p50, p99), MTP on and off.

Goals (issue 15): batch-1 decode at least 2x transformers' best configuration; 16 streams at least
8x the aggregate tokens/s of one. The default checkpoint is the ``bench`` preset with one MTP
module, trained for ``--train-steps`` steps on the built-in corpus, so that the drafts have
something to agree with.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

DEFAULT_OUTPUT = "outputs/bench-serve"
GOAL_BATCH1_SPEEDUP = 2.0  # against transformers' best configuration here
GOAL_STREAM_SCALING = 8.0
GOAL_STREAMS = 16  # the scaling goal is at 16 clients


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", help="serve this checkpoint instead of training one")
    parser.add_argument("--train-steps", type=int, default=150, help="steps of the default checkpoint (default 150)")
    parser.add_argument(
        "--output", default=DEFAULT_OUTPUT, help=f"where the default checkpoint goes ({DEFAULT_OUTPUT})"
    )
    parser.add_argument("--prompt-len", type=int, default=32, help="prompt tokens (default 32)")
    parser.add_argument(
        "--long-prompt-len", type=int, default=1024, help="every other HTTP prompt's tokens (1024; 0: --prompt-len)"
    )
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens generated per request (default 128)")
    parser.add_argument("--concurrency", default="1,16,64", help="concurrent streaming clients (default 1,16,64)")
    parser.add_argument("--requests", type=int, default=2, help="requests per client (default 2)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--no-hf", action="store_true", help="skip transformers")
    parser.add_argument("--hf-configs", help="transformers configurations, comma-separated (default: all; see "
                        "hf_baselines.DEFAULT_CONFIGS), e.g. grouped_mm,grouped_mm+static+compile")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=3, help="timed batch-1 runs per row, the median reported (3)")
    parser.add_argument("--no-http", action="store_true", help="skip the HTTP part")
    # on 2 cores one torch thread is faster over HTTP (the proxy and the clients need the other core):
    # 1 client 67-76 tok/s against 51 with 2 threads; 16 clients 410 against 335 (bench preset, eager, bf16)
    parser.add_argument("--replica-threads", type=int, help="torch threads of the replica (default: Ray's, 1 here)")
    parser.add_argument("--stream-interval-ms", type=int, default=0, help="the replica's stream_interval_ms (0)")
    parser.add_argument("--compile", action="store_true", help="also the compiled runner (in process and over HTTP)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON (the last line)")


def main(args: argparse.Namespace) -> int:
    report = run(args)
    print(format_table(report))
    if args.json:
        print(json.dumps(report))
    return 0


# --------------------------------------------------------------------------- the checkpoint


def ensure_checkpoint(output: str, steps: int) -> str:
    """A bench-preset checkpoint with one MTP module, trained for ``steps`` steps (once; reused after)."""
    from raymoe.pipelines.pretrain import default_data_dir, ensure_default_data
    from raymoe.platform.checkpoint.layout import latest_checkpoint
    from raymoe.platform.config import load_config
    from raymoe.platform.train.loop import pretrain

    out = Path(output) / f"mtp-{steps}"
    found = latest_checkpoint(str(out))
    if found is not None:
        return found
    cfg = load_config(
        "bench",
        ["model.num_nextn_predict_layers=1", f"train.steps={steps}", f"train.checkpoint_every={steps}",
         "train.eval_every=0", "train.dtype=bf16", "train.lr=3e-3", "tracking.enabled=false"],
    )  # fmt: skip
    data = ensure_default_data(default_data_dir(cfg), cfg, progress=False)
    print(f"bench serve: training the bench preset with MTP for {steps} steps into {out} (once)", flush=True)
    t0 = time.perf_counter()
    pretrain(cfg, data, out, progress=False)  # the local trainer
    print(f"bench serve: trained in {time.perf_counter() - t0:.0f} s", flush=True)
    return latest_checkpoint(str(out))


def _prompts(tokenizer: Any, n: int, length: int, offset: int = 0) -> list[list[int]]:
    """``n`` prompts of ``length`` tokens: consecutive pieces of a standard-library module's source, from
    ``offset`` on, wrapping around (prompts need not differ: the engine caches no prefixes)."""
    import inspect
    import json as json_module

    ids = tokenizer.encode(inspect.getsource(json_module.decoder) + inspect.getsource(json_module.encoder)).ids
    if len(ids) < length:
        raise ValueError(f"the prompt text has {len(ids)} tokens; a prompt of {length} needs more")
    out = []
    for i in range(n):
        first = (offset + i * length) % (len(ids) - length + 1)
        out.append(ids[first : first + length])
    return out


def _mixed_prompts(tokenizer: Any, n: int, short: int, long: int) -> list[list[int]]:
    """``n`` prompts alternating ``short`` and ``long`` tokens (all ``short`` when ``long`` is 0)."""
    shorts = _prompts(tokenizer, n, short)
    longs = _prompts(tokenizer, n, long, offset=7) if long else shorts
    return [longs[i] if long and i % 2 else shorts[i] for i in range(n)]


# --------------------------------------------------------------------------- batch-1 decode


def _decode_ours(served: Any, prompt: list[int], new_tokens: int, speculative: bool, compiled: bool = False,
                 repeats: int = 3) -> dict:  # fmt: skip
    """Batch-1 greedy decode of exactly ``new_tokens`` on one engine: the median of ``repeats`` timed runs."""
    import statistics

    from raymoe.platform.inference.engine import Engine, EngineConfig, run_to_completion
    from raymoe.platform.inference.runner import LocalRunner, cache_blocks
    from raymoe.platform.inference.sampling import SamplingParams

    block = 16
    blocks = cache_blocks(4 * (len(prompt) + new_tokens), block)
    if compiled:
        from raymoe.platform.inference.compiled import CompiledLocalRunner

        runner = CompiledLocalRunner(served.model, blocks, block)
    else:
        runner = LocalRunner(served.model, blocks, block)  # served.model: loaded in run()
    engine = Engine(runner, EngineConfig(cache_tokens=4 * (len(prompt) + new_tokens), speculative=speculative))
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    run_to_completion(engine, [prompt], [SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)])  # warm-up
    runs, stats = [], {}
    for _ in range(repeats):
        engine.counters.clear()
        t0 = time.perf_counter()
        (tokens,) = run_to_completion(engine, [prompt], [params])
        runs.append(len(tokens) / (time.perf_counter() - t0))
        stats = engine.stats()
    out = {"tokens_per_s": statistics.median(runs), "runs_tokens_per_s": runs, "tokens": tokens,
           "acceptance_rate": stats["acceptance_rate"], "steps": stats["steps"]}  # fmt: skip
    if compiled:
        out["compile_s"] = runner.compile_seconds
    return out


# --------------------------------------------------------------------------- HTTP


def _stream_one(url: str, body: dict) -> dict[str, Any]:
    import requests

    t0 = time.perf_counter()
    events: list[float] = []  # arrival of each chunk that carries text
    tokens = 0
    with requests.post(f"{url}/v1/completions", json=body, stream=True, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines(decode_unicode=True):
            if not line or not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                events.append(time.perf_counter() - t0)
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    gaps = [b - a for a, b in zip(events, events[1:])]
    return {"ttft_s": events[0] if events else 0.0, "latency_s": time.perf_counter() - t0, "tokens": tokens,
            "gaps_s": gaps}  # fmt: skip


def _percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q * (len(values) - 1))))]


def _http(checkpoint: str, args: argparse.Namespace, prompts: list[list[int]], speculative: bool) -> list[dict]:
    import requests
    from ray import serve

    from raymoe.pipelines.serve import RaymoeServer, ServeArgs

    levels = [int(c) for c in args.concurrency.split(",")]
    longest = max(args.prompt_len, args.long_prompt_len)
    # room for every client at the largest level: all of them run at once, none waits for the cache
    serve_args = ServeArgs(checkpoint=checkpoint, dtype=args.dtype, speculative=speculative,
                           threads=args.replica_threads, max_tokens=args.new_tokens, compile=args.compile,
                           stream_interval_ms=args.stream_interval_ms, max_batch_size=max(levels),
                           cache_tokens=max(levels) * (longest + args.new_tokens + 1) + 64)  # fmt: skip
    app = RaymoeServer.options(num_replicas=1, autoscaling_config=None, ray_actor_options={"num_cpus": 0})
    serve.run(app.bind(serve_args), name="bench", route_prefix="/")
    url = f"http://127.0.0.1:{args._port}"
    rows = []
    try:
        usage = {"stream": True, "stream_options": {"include_usage": True}}  # the last chunk counts the tokens
        warm = {"model": "raymoe", "prompt": prompts[0], "max_tokens": 8, "temperature": 0, **usage}
        _stream_one(url, warm)
        for clients in levels:
            requests.get(f"{url}/stats", timeout=10)

            def client(i: int, clients: int = clients) -> list[dict]:
                out = []
                for j in range(args.requests):
                    prompt = prompts[(i * args.requests + j) % len(prompts)]
                    body = {"model": "raymoe", "prompt": prompt, "max_tokens": args.new_tokens, "temperature": 0,
                            "ignore_eos": True, **usage}  # fmt: skip
                    out.append(_stream_one(url, body))
                return out

            before = requests.get(f"{url}/stats", timeout=10).json()
            t0 = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(clients) as pool:
                results = [r for rs in pool.map(client, range(clients)) for r in rs]
            wall = time.perf_counter() - t0
            after = requests.get(f"{url}/stats", timeout=10).json()
            proposed = after["draft_proposed"] - before["draft_proposed"]
            rows.append({
                "speculative": speculative,
                "clients": clients,
                "requests": len(results),
                "tokens": sum(r["tokens"] for r in results),
                "aggregate_tokens_per_s": sum(r["tokens"] for r in results) / wall,
                "ttft_p50_s": _percentile([r["ttft_s"] for r in results], 0.5),
                "ttft_p99_s": _percentile([r["ttft_s"] for r in results], 0.99),
                "itl_p50_s": _percentile([g for r in results for g in r["gaps_s"]] or [0.0], 0.5),
                "itl_p99_s": _percentile([g for r in results for g in r["gaps_s"]] or [0.0], 0.99),
                "latency_p50_s": _percentile([r["latency_s"] for r in results], 0.5),
                "latency_p99_s": _percentile([r["latency_s"] for r in results], 0.99),
                "acceptance_rate": (after["draft_accepted"] - before["draft_accepted"]) / max(proposed, 1)
                if proposed else None,
            })  # fmt: skip
            print(f"bench serve: HTTP, MTP {'on' if speculative else 'off'}, {clients} clients: "
                  f"{rows[-1]['aggregate_tokens_per_s']:.0f} tok/s", flush=True)  # fmt: skip
    finally:
        serve.delete("bench")
    return rows


# --------------------------------------------------------------------------- the run


def run(args: argparse.Namespace) -> dict[str, Any]:
    from raymoe.platform.checkpoint.reader import load_model
    from raymoe.platform.inference.loading import open_served

    t_start = time.perf_counter()
    checkpoint = args.checkpoint or ensure_checkpoint(args.output, args.train_steps)
    dtype = getattr(torch, args.dtype)
    served = open_served(checkpoint)
    served.model = load_model(served.reader, dtype=dtype)
    levels = [int(c) for c in args.concurrency.split(",")]
    prompts = _mixed_prompts(served.tokenizer, max(max(levels) * args.requests, 2), args.prompt_len,
                             args.long_prompt_len)  # fmt: skip
    prompt = prompts[0]  # batch-1 decode: a --prompt-len prompt
    has_mtp = served.model.cfg.num_nextn_predict_layers > 0
    print(f"bench serve: {checkpoint} ({'with' if has_mtp else 'without'} MTP), {args.dtype}, "
          f"torch threads {torch.get_num_threads()}", flush=True)  # fmt: skip
    baselines: dict[str, Any] = {}
    if not args.no_hf:  # transformers at its best here: every configuration that runs (hf_baselines)
        from raymoe.pipelines.benchmarks.hf_baselines import export_for_transformers, measure_transformers

        configs = args.hf_configs.split(",") if args.hf_configs else None
        with export_for_transformers(served.location) as hf_dir:
            baselines = measure_transformers(hf_dir, prompt, args.new_tokens, dtype, args.repeats, configs)
    decode: dict[str, Any] = {}
    n = args.repeats
    decode["raymoe"] = _decode_ours(served, prompt, args.new_tokens, speculative=False, repeats=n)
    if has_mtp:
        decode["raymoe_mtp"] = _decode_ours(served, prompt, args.new_tokens, speculative=True, repeats=n)
    if args.compile:
        decode["raymoe_compiled"] = _decode_ours(served, prompt, args.new_tokens, False, compiled=True, repeats=n)
        if has_mtp:
            decode["raymoe_mtp_compiled"] = _decode_ours(served, prompt, args.new_tokens, True, True, repeats=n)
    ref = decode["raymoe"]["tokens"]
    for d in [*decode.values(), *baselines.values()]:
        d["same_tokens_as_raymoe"] = sum(a == b for a, b in zip(d.pop("tokens"), ref))
    del served
    http: list[dict] = []
    if not args.no_http:
        import ray
        from ray import serve

        from raymoe.actors.runtime import ensure_ray

        started = not ray.is_initialized()
        ensure_ray()
        args._port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": args._port})
        try:
            for speculative in [True, False] if has_mtp else [False]:
                http.extend(_http(checkpoint, args, prompts, speculative))
        finally:
            serve.shutdown()
            if started:
                ray.shutdown()
    return summarize(checkpoint, args, decode, baselines, http, time.perf_counter() - t_start)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def summarize(checkpoint: str, args: argparse.Namespace, decode: dict, baselines: dict, http: list[dict],
              total_s: float) -> dict:  # fmt: skip
    from raymoe.pipelines.benchmarks.hf_baselines import best_baseline

    best_name = best_baseline(baselines) if baselines else None
    hf = baselines[best_name]["tokens_per_s"] if best_name else None
    ours = max(decode, key=lambda name: decode[name]["tokens_per_s"])
    for d in decode.values():
        d["x_best_baseline"] = d["tokens_per_s"] / hf if hf else None
    scaling = {}
    for spec in (True, False):
        rows = {r["clients"]: r for r in http if r["speculative"] == spec}
        if 1 in rows:
            for r in rows.values():
                r["x_one_client"] = r["aggregate_tokens_per_s"] / rows[1]["aggregate_tokens_per_s"]
            at = GOAL_STREAMS if GOAL_STREAMS in rows else max(rows)
            scaling["mtp_on" if spec else "mtp_off"] = {"clients": at, "x_one_client": rows[at]["x_one_client"]}
    mtp = decode.get("raymoe_mtp")
    return {
        "benchmark": "serve",
        "checkpoint": checkpoint,
        "dtype": args.dtype,
        "prompt_len": args.prompt_len,
        "long_prompt_len": args.long_prompt_len,
        "stream_interval_ms": args.stream_interval_ms,
        "new_tokens": args.new_tokens,
        "threads": torch.get_num_threads(),
        "load_average": os.getloadavg()[0],
        "repeats": args.repeats,
        "baselines": baselines,
        "best_baseline": best_name,
        "decode": decode,
        "best_raymoe": ours,
        "http": http,
        "batch1_speedup": decode[ours]["tokens_per_s"] / hf if hf else None,
        "mtp_speedup": mtp["tokens_per_s"] / decode["raymoe"]["tokens_per_s"] if mtp else None,
        "acceptance_rate": mtp["acceptance_rate"] if mtp else None,
        "stream_scaling": scaling,
        "goals": {"batch1_speedup": GOAL_BATCH1_SPEEDUP, "stream_scaling": GOAL_STREAM_SCALING},
        "total_s": total_s,
    }


def format_table(report: dict) -> str:
    from raymoe.pipelines.benchmarks.hf_baselines import CONFIG_LABELS

    best = report["best_baseline"]
    lines = [f"raymoe bench serve: {report['checkpoint']}, {report['dtype']}, {report['prompt_len']}-token prompt, "
             f"{report['new_tokens']} new tokens, median of {report['repeats']} runs, load average "
             f"{report['load_average']:.1f}", "",
             "| batch-1 decode (one process) | tok/s | runs | × best baseline | MTP acceptance "
             "| tokens equal to raymoe's |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    names = {"raymoe": "raymoe, MTP off", "raymoe_mtp": "raymoe, MTP on",
             "raymoe_compiled": "raymoe compiled, MTP off",
             "raymoe_mtp_compiled": "raymoe compiled, MTP on"}  # fmt: skip
    hf = report["baselines"][best]["tokens_per_s"] if best else None
    for name, d in report["baselines"].items():
        label = CONFIG_LABELS.get(name, name) + (" **(best baseline)**" if name == best else "")
        if d["error"] is not None:
            lines.append(f"| {label} | – | – | – | – | does not run: {d['error'].replace('|', '/')} |")
            continue
        runs = ", ".join(f"{r:.1f}" for r in d["runs_tokens_per_s"])
        lines.append(f"| {label} | {d['tokens_per_s']:.1f} | {runs} | {d['tokens_per_s'] / hf:.2f} | – | "
                     f"{d['same_tokens_as_raymoe']}/{report['new_tokens']} |")  # fmt: skip
    for name, d in report["decode"].items():
        x = f"{d['x_best_baseline']:.2f}" if d.get("x_best_baseline") else "–"
        acc = f"{d['acceptance_rate']:.2f}" if d.get("acceptance_rate") is not None else "–"
        runs = ", ".join(f"{r:.1f}" for r in d["runs_tokens_per_s"])
        lines.append(f"| {names[name]} | {d['tokens_per_s']:.1f} | {runs} | {x} | {acc} | "
                     f"{d['same_tokens_as_raymoe']}/{report['new_tokens']} |")  # fmt: skip
    if report["http"]:
        mix = (f"prompts of {report['prompt_len']} and {report['long_prompt_len']} tokens alternating"
               if report["long_prompt_len"] else f"{report['prompt_len']}-token prompts")  # fmt: skip
        lines += ["", f"HTTP streams: {mix}, {report['new_tokens']} new tokens each, stream_interval_ms "
                  f"{report['stream_interval_ms']}", "",
                  "| HTTP streams | MTP | aggregate tok/s | × 1 client | TTFT p50 / p99 (s) "
                  "| ITL p50 / p99 (ms) | latency p50 / p99 (s) | acceptance |",
                  "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
        for r in report["http"]:
            acc = f"{r['acceptance_rate']:.2f}" if r["acceptance_rate"] is not None else "–"
            lines.append(
                f"| {r['clients']} | {'on' if r['speculative'] else 'off'} | {r['aggregate_tokens_per_s']:.0f} | "
                f"{r.get('x_one_client', 0):.2f} | {r['ttft_p50_s']:.3f} / {r['ttft_p99_s']:.3f} | "
                f"{1e3 * r['itl_p50_s']:.1f} / {1e3 * r['itl_p99_s']:.1f} | "
                f"{r['latency_p50_s']:.2f} / {r['latency_p99_s']:.2f} | {acc} |"
            )
    lines.append("")
    b1 = report["batch1_speedup"]
    if b1 is not None:
        verdict = "met" if b1 >= GOAL_BATCH1_SPEEDUP else "NOT met"
        lines.append(f"batch-1 decode: {names[report['best_raymoe']]} {b1:.2f}× the best baseline, "
                     f"{CONFIG_LABELS.get(best, best)} (goal ≥ {GOAL_BATCH1_SPEEDUP:g}×: {verdict})")  # fmt: skip
    for key, value in report["stream_scaling"].items():
        x = value["x_one_client"]
        verdict = "met" if x >= GOAL_STREAM_SCALING else "NOT met"
        lines.append(f"streams, {key}: {value['clients']} clients {x:.2f}× the aggregate of one "
                     f"(goal ≥ {GOAL_STREAM_SCALING:g}× at {GOAL_STREAMS}: {verdict})")  # fmt: skip
    if report["mtp_speedup"] is not None:
        lines.append(f"MTP speculative decoding: {report['mtp_speedup']:.2f}× plain decode at batch 1, "
                     f"acceptance {report['acceptance_rate']:.2f}")  # fmt: skip
    lines.append(f"total {report['total_s']:.0f} s")
    return "\n".join(lines)
