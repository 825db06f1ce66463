"""``raymoe bench serve``: the serving engine against transformers, and the Serve app under concurrent streams.

    raymoe bench serve                      # trains a bench-preset checkpoint with MTP once (outputs/bench-serve)
    raymoe bench serve --checkpoint DIR     # any checkpoint (MTP modules make the MTP rows meaningful)
    raymoe bench serve --json               # the report as one JSON object, the last line of stdout

In one run, side by side:

1. **Batch-1 decode in this process** (bf16, greedy, a prompt of real text, exactly
   ``--new-tokens`` tokens): transformers' ``DeepseekV3ForCausalLM.generate`` on the same weights
   (exported to its format), our engine with MTP speculative decoding off, and on (with its
   acceptance rate).
2. **HTTP**: one Serve replica of ``raymoe.pipelines.serve``; 1, 4 and 16 concurrent clients, each
   streaming ``--requests`` completions one after another: aggregate tokens/s, time to first token
   and request latency (p50, p99), MTP on and off.

Goals (issue 6): batch-1 decode at least 3x transformers; 16 streams at least 6x the aggregate
tokens/s of one. The default checkpoint is the ``bench`` preset with one MTP module, trained for
``--train-steps`` steps on the built-in corpus, so that the drafts have something to agree with.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

DEFAULT_OUTPUT = "outputs/bench-serve"
GOAL_BATCH1_SPEEDUP = 3.0
GOAL_STREAM_SCALING = 6.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", help="serve this checkpoint instead of training one")
    parser.add_argument("--train-steps", type=int, default=150, help="steps of the default checkpoint (default 150)")
    parser.add_argument(
        "--output", default=DEFAULT_OUTPUT, help=f"where the default checkpoint goes ({DEFAULT_OUTPUT})"
    )
    parser.add_argument("--prompt-len", type=int, default=32, help="prompt tokens (default 32)")
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens generated per request (default 128)")
    parser.add_argument("--concurrency", default="1,4,16", help="concurrent streaming clients (default 1,4,16)")
    parser.add_argument("--requests", type=int, default=2, help="requests per client (default 2)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--no-hf", action="store_true", help="skip transformers")
    parser.add_argument("--no-http", action="store_true", help="skip the HTTP part")
    # on 2 cores one torch thread is faster over HTTP (the proxy and the clients need the other core):
    # 1 client 67-76 tok/s against 51 with 2 threads; 16 clients 410 against 335 (bench preset, eager, bf16)
    parser.add_argument("--replica-threads", type=int, help="torch threads of the replica (default: Ray's, 1 here)")
    parser.add_argument("--stream-interval-ms", type=int, default=20, help="the replica's stream_interval_ms (20)")
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


def _prompts(tokenizer: Any, n: int, length: int) -> list[list[int]]:
    """``n`` prompts of ``length`` tokens: consecutive pieces of a standard-library module's source."""
    import inspect
    import json as json_module

    ids = tokenizer.encode(inspect.getsource(json_module.decoder) + inspect.getsource(json_module.encoder)).ids
    if len(ids) < n * length:
        raise ValueError(f"the prompt text has {len(ids)} tokens; {n} prompts of {length} need more")
    return [ids[i * length : (i + 1) * length] for i in range(n)]


# --------------------------------------------------------------------------- batch-1 decode


def _decode_ours(served: Any, prompt: list[int], new_tokens: int, speculative: bool, compiled: bool = False) -> dict:
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
    engine.counters.clear()
    t0 = time.perf_counter()
    (tokens,) = run_to_completion(engine, [prompt], [params])
    elapsed = time.perf_counter() - t0
    stats = engine.stats()
    out = {"tokens_per_s": len(tokens) / elapsed, "tokens": tokens, "acceptance_rate": stats["acceptance_rate"],
           "steps": stats["steps"]}  # fmt: skip
    if compiled:
        out["compile_s"] = runner.compile_seconds
    return out


def _decode_hf(checkpoint: str, prompt: list[int], new_tokens: int, dtype: torch.dtype) -> dict[str, Any]:
    from transformers import DeepseekV3ForCausalLM

    from raymoe.platform.checkpoint import export_hf
    from raymoe.platform.checkpoint.layout import is_hf_checkpoint

    if is_hf_checkpoint(checkpoint):  # already in transformers' format
        model = DeepseekV3ForCausalLM.from_pretrained(checkpoint, dtype=dtype).eval()
    else:
        with tempfile.TemporaryDirectory() as tmp:
            export_hf(checkpoint, tmp)
            model = DeepseekV3ForCausalLM.from_pretrained(tmp, dtype=dtype).eval()
    model.generation_config.eos_token_id = None  # exactly new_tokens
    ids = torch.tensor([prompt])
    mask = torch.ones_like(ids)

    def call(n: int) -> list[int]:
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0)
        return out[0, len(prompt) :].tolist()

    call(8)  # warm-up
    t0 = time.perf_counter()
    tokens = call(new_tokens)
    elapsed = time.perf_counter() - t0
    return {"tokens_per_s": len(tokens) / elapsed, "tokens": tokens,
            "experts_implementation": getattr(model.config, "_experts_implementation", None)}  # fmt: skip


# --------------------------------------------------------------------------- HTTP


def _stream_one(url: str, body: dict) -> dict[str, float]:
    import requests

    t0 = time.perf_counter()
    first = None
    tokens = 0
    with requests.post(f"{url}/v1/completions", json=body, stream=True, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines(decode_unicode=True):
            if not line or not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk.get("choices"):
                first = time.perf_counter() - t0
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return {"ttft_s": first or 0.0, "latency_s": time.perf_counter() - t0, "tokens": tokens}


def _percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q * (len(values) - 1))))]


def _http(checkpoint: str, args: argparse.Namespace, prompts: list[list[int]], speculative: bool) -> list[dict]:
    import requests
    from ray import serve

    from raymoe.pipelines.serve import RaymoeServer, ServeArgs

    serve_args = ServeArgs(checkpoint=checkpoint, dtype=args.dtype, speculative=speculative,
                           threads=args.replica_threads, max_tokens=args.new_tokens, compile=args.compile,
                           stream_interval_ms=args.stream_interval_ms)  # fmt: skip
    app = RaymoeServer.options(num_replicas=1, autoscaling_config=None, ray_actor_options={"num_cpus": 0})
    serve.run(app.bind(serve_args), name="bench", route_prefix="/")
    url = f"http://127.0.0.1:{args._port}"
    levels = [int(c) for c in args.concurrency.split(",")]
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
    prompts = _prompts(served.tokenizer, max(max(levels) * args.requests, 1), args.prompt_len)
    prompt = prompts[0]
    has_mtp = served.model.cfg.num_nextn_predict_layers > 0
    print(f"bench serve: {checkpoint} ({'with' if has_mtp else 'without'} MTP), {args.dtype}, "
          f"torch threads {torch.get_num_threads()}", flush=True)  # fmt: skip
    decode: dict[str, Any] = {}
    if not args.no_hf:
        decode["transformers"] = _decode_hf(served.location, prompt, args.new_tokens, dtype)
    decode["raymoe"] = _decode_ours(served, prompt, args.new_tokens, speculative=False)
    if has_mtp:
        decode["raymoe_mtp"] = _decode_ours(served, prompt, args.new_tokens, speculative=True)
    if args.compile:
        decode["raymoe_compiled"] = _decode_ours(served, prompt, args.new_tokens, speculative=False, compiled=True)
        if has_mtp:
            decode["raymoe_mtp_compiled"] = _decode_ours(served, prompt, args.new_tokens, True, compiled=True)
    ref = decode["raymoe"]["tokens"]
    for d in decode.values():
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
    return summarize(checkpoint, args, decode, http, time.perf_counter() - t_start)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def summarize(checkpoint: str, args: argparse.Namespace, decode: dict, http: list[dict], total_s: float) -> dict:
    hf = decode.get("transformers", {}).get("tokens_per_s")
    best = max(d["tokens_per_s"] for name, d in decode.items() if name != "transformers")
    for d in decode.values():
        d["x_transformers"] = d["tokens_per_s"] / hf if hf else None
    scaling = {}
    for spec in (True, False):
        rows = {r["clients"]: r for r in http if r["speculative"] == spec}
        if 1 in rows:
            for r in rows.values():
                r["x_one_client"] = r["aggregate_tokens_per_s"] / rows[1]["aggregate_tokens_per_s"]
            top = max(rows)
            scaling["mtp_on" if spec else "mtp_off"] = rows[top]["x_one_client"]
    mtp = decode.get("raymoe_mtp")
    return {
        "benchmark": "serve",
        "checkpoint": checkpoint,
        "dtype": args.dtype,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "threads": torch.get_num_threads(),
        "load_average": os.getloadavg()[0],
        "decode": decode,
        "http": http,
        "batch1_speedup": best / hf if hf else None,
        "mtp_speedup": mtp["tokens_per_s"] / decode["raymoe"]["tokens_per_s"] if mtp else None,
        "acceptance_rate": mtp["acceptance_rate"] if mtp else None,
        "stream_scaling": scaling,
        "goals": {"batch1_speedup": GOAL_BATCH1_SPEEDUP, "stream_scaling": GOAL_STREAM_SCALING},
        "total_s": total_s,
    }


def format_table(report: dict) -> str:
    lines = [f"raymoe bench serve: {report['checkpoint']}, {report['dtype']}, {report['prompt_len']}-token prompt, "
             f"{report['new_tokens']} new tokens, load average {report['load_average']:.1f}", "",
             "| batch-1 decode (one process) | tok/s | × transformers | MTP acceptance | tokens equal to raymoe's |",
             "| --- | ---: | ---: | ---: | ---: |"]  # fmt: skip
    names = {"transformers": "transformers generate", "raymoe": "raymoe, MTP off", "raymoe_mtp": "raymoe, MTP on",
             "raymoe_compiled": "raymoe compiled, MTP off",
             "raymoe_mtp_compiled": "raymoe compiled, MTP on"}  # fmt: skip
    for name, d in report["decode"].items():
        x = f"{d['x_transformers']:.2f}" if d.get("x_transformers") else "–"
        acc = f"{d['acceptance_rate']:.2f}" if d.get("acceptance_rate") is not None else "–"
        lines.append(f"| {names[name]} | {d['tokens_per_s']:.1f} | {x} | {acc} | "
                     f"{d['same_tokens_as_raymoe']}/{report['new_tokens']} |")  # fmt: skip
    if report["http"]:
        lines += ["", "| HTTP streams | MTP | aggregate tok/s | × 1 client | TTFT p50 / p99 (s) "
                  "| latency p50 / p99 (s) | acceptance |",
                  "| ---: | --- | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
        for r in report["http"]:
            acc = f"{r['acceptance_rate']:.2f}" if r["acceptance_rate"] is not None else "–"
            lines.append(
                f"| {r['clients']} | {'on' if r['speculative'] else 'off'} | {r['aggregate_tokens_per_s']:.0f} | "
                f"{r.get('x_one_client', 0):.2f} | {r['ttft_p50_s']:.3f} / {r['ttft_p99_s']:.3f} | "
                f"{r['latency_p50_s']:.2f} / {r['latency_p99_s']:.2f} | {acc} |"
            )
    lines.append("")
    b1 = report["batch1_speedup"]
    if b1 is not None:
        verdict = "met" if b1 >= GOAL_BATCH1_SPEEDUP else "NOT met"
        lines.append(f"batch-1 decode: {b1:.2f}× transformers (goal ≥ {GOAL_BATCH1_SPEEDUP:g}×: {verdict})")
    for key, value in report["stream_scaling"].items():
        verdict = "met" if value >= GOAL_STREAM_SCALING else "NOT met"
        lines.append(
            f"streams, {key}: {value:.2f}× the aggregate of one client (goal ≥ {GOAL_STREAM_SCALING:g}×: {verdict})"
        )
    if report["mtp_speedup"] is not None:
        lines.append(f"MTP speculative decoding: {report['mtp_speedup']:.2f}× plain decode at batch 1, "
                     f"acceptance {report['acceptance_rate']:.2f}")  # fmt: skip
    lines.append(f"total {report['total_s']:.0f} s")
    return "\n".join(lines)
