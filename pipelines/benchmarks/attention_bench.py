"""``raymoe bench attention``: the naive and the absorbed MLA path over the paged cache, side by side, per run length.

    raymoe bench attention                    # the bench preset, bf16, runs of 1..512 tokens after 0 and 512 cached
    raymoe bench attention --preset small --dtype fp32 --json

Serving attends each run of a step (a prefill chunk, a decode token, a token and its draft) either
by the *absorbed* path (attention over the latent; the paged decode kernel on CUDA) or by the
*naive* path (decompress the run's keys and values, ordinary attention). The engine switches at
:data:`~raymoe.platform.model.attention.NAIVE_MIN_RUN` tokens, set from this benchmark. This measures,
for one MLA layer of the preset, the median time of one run of S new tokens over C already cached
ones by each path (the model's own code: ``PagedAttention`` with every run naive or every run
absorbed), and prints where the naive path starts to pay, next to the FLOP count's answer. On a
machine shared with other work, run it with ``OMP_NUM_THREADS=1``: two threads on two busy cores
stall each other and the timings scatter.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DEFAULT_RUNS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="bench", help="preset whose attention shapes are measured (default bench)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="default bf16 (what serving runs)")
    parser.add_argument("--runs", default=",".join(map(str, DEFAULT_RUNS)), help="run lengths S, comma-separated")
    parser.add_argument("--cached", default="0,512", help="tokens already cached before the run, comma-separated")
    parser.add_argument("--repeats", type=int, default=7, help="timed calls per cell (the median is reported)")
    parser.add_argument("--json", action="store_true", help="also print the report as one JSON object (last line)")


def _time(fn, repeats: int) -> float:  # noqa: ANN001
    fn()  # warm-up (oneDNN primitives, allocations)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(preset: str, dtype: torch.dtype, runs: list[int], cached: list[int], repeats: int) -> dict[str, Any]:
    """Median seconds of one run through one MLA layer by each path, per (cached, S)."""
    from raymoe.platform.config import load_config
    from raymoe.platform.inference.batch import SeqRun, build_step
    from raymoe.platform.inference.cache import BlockCache
    from raymoe.platform.model.attention import MLA, naive_flop_crossover, naive_min_run
    from raymoe.platform.model.layers import RotaryEmbedding
    from raymoe.platform.model.transformer import cast_parameters

    cfg = load_config(preset).model
    torch.manual_seed(0)
    mla = cast_parameters(MLA(cfg, 0), dtype).eval()
    for p in mla.parameters():
        torch.nn.init.normal_(p, std=0.02)
    rotary = RotaryEmbedding(cfg)
    block = 16
    most = max(cached) + max(runs)
    blocks = list(range(1, -(-most // block) + 1))
    cache = BlockCache([0], len(blocks) + 1, block, cfg.kv_lora_rank + cfg.qk_rope_head_dim, dtype)
    rows = []
    with torch.inference_mode():
        for c in cached:
            for s in runs:
                x = torch.randn(s, cfg.hidden_size, dtype=dtype)
                cell = {"cached": c, "run": s}
                for name, threshold in (("naive", 1), ("absorbed", 1 << 30)):
                    step = build_step([SeqRun(list(range(s)), c, blocks)], block, threshold)
                    ctx = step.attention(cache.flat, cache.layer_base)
                    cos, sin = rotary.cos[step.positions].to(dtype), rotary.sin[step.positions].to(dtype)
                    cell[f"{name}_s"] = _time(lambda x=x, ctx=ctx, cos=cos, sin=sin: mla(x, cos, sin, ctx), repeats)
                cell["naive_faster"] = cell["naive_s"] < cell["absorbed_s"]
                rows.append(cell)
    crossover: dict[int, int | None] = {}
    for c in cached:
        # the shortest run from which the naive path is faster at it and at every longer run measured
        crossover[c] = None
        for r in sorted((r for r in rows if r["cached"] == c), key=lambda r: -r["run"]):
            if not r["naive_faster"]:
                break
            crossover[c] = r["run"]
    return {"benchmark": "attention", "preset": preset, "dtype": str(dtype).removeprefix("torch."),
            "threads": torch.get_num_threads(), "rows": rows, "measured_naive_from": crossover,
            "naive_min_run": naive_min_run(cfg), "flop_crossover": naive_flop_crossover(cfg)}  # fmt: skip


def format_table(report: dict[str, Any]) -> str:
    lines = [f"raymoe bench attention: one MLA layer of the {report['preset']} preset, {report['dtype']}, "
             f"{report['threads']} threads; median ms of one run of S tokens", "",
             "| cached | S | naive ms | absorbed ms | naive / absorbed |",
             "| ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for r in report["rows"]:
        lines.append(f"| {r['cached']} | {r['run']} | {r['naive_s'] * 1e3:.3f} | {r['absorbed_s'] * 1e3:.3f} | "
                     f"{r['naive_s'] / r['absorbed_s']:.2f} |")  # fmt: skip
    lines.append("")
    for c, s in report["measured_naive_from"].items():
        lines.append(f"after {c} cached tokens the naive path is faster from S = {s} (measured)")
    lines.append(f"the engine switches at {report['naive_min_run']} tokens (NAIVE_MIN_RUN); the FLOP count alone "
                 f"would at {report['flop_crossover']}")  # fmt: skip
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    runs = [int(s) for s in args.runs.split(",") if s.strip()]
    cached = [int(s) for s in args.cached.split(",") if s.strip()]
    report = measure(args.preset, DTYPES[args.dtype], runs, cached, args.repeats)
    print(format_table(report))
    if args.json:
        print(json.dumps(report))
    return 0
