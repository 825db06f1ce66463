"""``raymoe info``: parameter counts, KV cache, training FLOPs and GPU-hours of a model config.

    raymoe info deepseek-v3
    raymoe info deepseek-v3 --json --seq-len 4096 --tokens 14.8e12 --peak-tflops 989 --mfu 0.4
    raymoe info small model.n_routed_experts=16
    raymoe info path/to/checkpoint            # a Hugging Face DeepseekV3 config.json
    raymoe info deepseek-v3 --plan serve --devices 8 --device-memory 141GiB --host-memory 2TiB --expert-budget 60GiB
    raymoe info deepseek-v3 --plan train --nodes 256 --gpus-per-node 8 --interconnect-gbps 400

The numbers come from :mod:`raymoe.platform.info` (the model is built on the meta device, so
even the 671B configuration takes about a second). At MFU 0.407 the ``deepseek-v3`` estimate
reproduces the report's 2.664M H800 GPU-hours for 14.8T tokens at 989 TFLOP/s.
"""

from __future__ import annotations

import argparse
import json

from raymoe.platform.config import ModelConfig
from raymoe.platform.info import (
    DEEPSEEK_V3_PRETRAIN_TOKENS,
    DEFAULT_SEQ_LEN,
    H800_BF16_PEAK_TFLOPS,
    ModelInfo,
    model_info,
    resolve_model_config,
)
from raymoe.platform.plan import (
    DEFAULT_GROUP_SIZE,
    DEFAULT_INTERCONNECT_GBPS,
    DEFAULT_KV_TOKENS,
    DEFAULT_RESERVE,
    ServePlan,
    TrainPlan,
    serve_plan,
    train_plan,
)

DEFAULT_MFU = 0.4
GIGA = 1e9
MEGA = 1e6


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``info`` subcommand."""
    parser = subparsers.add_parser(
        "info",
        help="parameter counts, KV cache, training FLOPs and GPU-hours of a config",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument(
        "config", metavar="PRESET_OR_CONFIG", help="a preset name, a .yaml file, or a checkpoint dir / config.json"
    )
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.n_routed_experts=16")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument(
        "--seq-len", type=int, default=DEFAULT_SEQ_LEN, help=f"tokens per sequence (default {DEFAULT_SEQ_LEN})"
    )
    parser.add_argument(
        "--tokens",
        type=float,
        default=DEEPSEEK_V3_PRETRAIN_TOKENS,
        help=f"training tokens (default {DEEPSEEK_V3_PRETRAIN_TOKENS:.3g})",
    )
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=H800_BF16_PEAK_TFLOPS,
        help=f"peak TFLOP/s of one GPU (default {H800_BF16_PEAK_TFLOPS:g}, H800 dense bf16)",
    )
    parser.add_argument(
        "--mfu", type=float, default=DEFAULT_MFU, help=f"model FLOPs utilization (default {DEFAULT_MFU})"
    )
    _register_plan(parser)
    parser.set_defaults(func=run)


def _register_plan(parser: argparse.ArgumentParser) -> None:
    """The ``--plan serve|train`` options (see :mod:`raymoe.platform.plan` and docs/planning.md)."""
    reserve_default = DEFAULT_RESERVE.replace("%", "%%")  # argparse formats help strings with %
    plan = parser.add_argument_group("capacity plan (--plan serve|train; sizes like 141GiB, 80GB, 2TiB)")
    plan.add_argument("--plan", choices=("serve", "train"), help="print where the model sits instead of the counts")
    plan.add_argument("--device-memory", default="80GiB", help="memory of one device (default 80GiB, an H100/H800)")
    plan.add_argument(
        "--reserve",
        default=DEFAULT_RESERVE,
        help=f"per device, kept free for activations and the runtime: a size or a %% (default {reserve_default})",
    )
    serve = parser.add_argument_group("--plan serve")
    serve.add_argument("--devices", type=int, default=1, help="devices of the machine (default 1)")
    serve.add_argument("--host-memory", default="1TiB", help="the machine's memory for offloaded experts (1TiB)")
    serve.add_argument(
        "--expert-budget",
        default=None,
        help="device bytes for routed experts, per device: a size or a %% of their bf16 bytes "
        "(default: what is left after the reserve, the non-expert weights and --kv-tokens of cache)",
    )
    serve.add_argument("--warm-dtype", default="fp8", help="warm experts: fp8 | int8 | int4 (default fp8)")
    serve.add_argument(
        "--group-size", type=int, default=DEFAULT_GROUP_SIZE, help="weights per int8/int4 scale (default 128)"
    )
    serve.add_argument(
        "--cold", default="offload", help="cold experts: offload (host, bf16) | quantized (default offload)"
    )
    serve.add_argument("--cold-dtype", default="int4", help="with --cold quantized: fp8 | int8 | int4 (default int4)")
    serve.add_argument(
        "--kv-tokens",
        type=int,
        default=DEFAULT_KV_TOKENS,
        help=f"latent-cache tokens per device the default budget leaves room for (default {DEFAULT_KV_TOKENS})",
    )
    train = parser.add_argument_group("--plan train (also --seq-len, --peak-tflops, --mfu)")
    train.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    train.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8)")
    train.add_argument(
        "--interconnect-gbps",
        type=float,
        default=DEFAULT_INTERCONNECT_GBPS,
        help=f"network bandwidth per GPU, Gbit/s one way (default {DEFAULT_INTERCONNECT_GBPS:g})",
    )
    train.add_argument("--pp", type=int, default=None, help="pipeline stages (default: the fewest that fit)")
    train.add_argument("--ep", type=int, default=None, help="expert shards (default: min(GPUs, n_routed_experts))")
    train.add_argument("--micro-batch", type=int, default=1, help="sequences per micro-batch (default 1)")
    train.add_argument("--micro-batches", type=int, default=1, help="micro-batches per replica per step (default 1)")
    train.add_argument(
        "--recompute", action="store_true", help="activation checkpointing: blocks keep only their input"
    )
    train.add_argument("--overlap", action="store_true", help="step = max(compute, all-to-all) instead of their sum")
    train.add_argument("--moment-dtype", default="fp32", help="AdamW moments: fp32 | bf16 (default fp32)")


def run(args: argparse.Namespace) -> int:
    """Print the report of ``args.config``; exit code 0 (2 on a bad argument)."""
    if args.seq_len <= 0 or args.tokens <= 0 or args.peak_tflops <= 0 or not 0 < args.mfu <= 1:
        from raymoe.platform.config import ConfigError

        raise ConfigError("--seq-len, --tokens and --peak-tflops must be > 0 and --mfu in (0, 1]")
    cfg = resolve_model_config(args.config, args.overrides)
    if args.plan is not None:
        return run_plan(args, cfg)
    info = model_info(cfg, args.seq_len, tokens=args.tokens, peak_tflops=args.peak_tflops, mfu=args.mfu)
    if args.json:
        print(json.dumps({"config": args.config, **info.to_dict()}))
    else:
        print(format_table(args.config, info))
    return 0


def format_table(name: str, info: ModelInfo) -> str:
    """A readable two-column table of ``info``."""
    rows = [
        ("total parameters (no MTP)", f"{info.total_params / GIGA:,.3f} B  ({info.total_params:,})"),
        ("activated per token (no MTP)", f"{info.activated_params / GIGA:,.3f} B  ({info.activated_params:,})"),
        ("  of which embedding / head", f"{info.embedding_params / GIGA:.3f} B / {info.head_params / GIGA:.3f} B"),
        ("MTP modules (unique)", f"{info.mtp_params / GIGA:,.3f} B  ({info.mtp_params:,})"),
        ("MTP activated per token", f"{info.mtp_activated_params / GIGA:,.3f} B"),
        (
            "activated matrix params",
            f"{info.activated_matrix_params / GIGA:,.3f} B (+{info.mtp_activated_matrix_params / GIGA:.3f} B MTP)",
        ),
        ("MLA cache per token (bf16)", f"{info.kv_cache_bytes_per_token_mla:,} bytes"),
        (
            "MHA cache per token (bf16)",
            f"{info.kv_cache_bytes_per_token_mha:,} bytes "
            f"({info.kv_cache_bytes_per_token_mha / info.kv_cache_bytes_per_token_mla:.1f}x MLA)",
        ),
        ("sequence length", f"{info.seq_len:,} tokens"),
        ("attention FLOPs per token", f"{info.attention_flops_per_token / GIGA:,.1f} GFLOP (train, causal)"),
        (
            "train FLOPs per token",
            f"{info.train_flops_per_token / GIGA:,.1f} GFLOP "
            f"({info.train_flops_per_token_without_mtp / GIGA:,.1f} without MTP)",
        ),
    ]
    if info.gpu_hours is not None:
        rows.append(
            (
                "GPU-hours",
                f"{info.gpu_hours / MEGA:,.3f} M  ({info.tokens:.3g} tokens, {info.peak_tflops:g} TFLOP/s, "
                f"MFU {info.mfu:g})",
            )
        )
    width = max(len(label) for label, _ in rows)
    lines = [f"raymoe info: {name}", "-" * (width + 40)]
    lines += [f"{label:<{width}}  {value}" for label, value in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------- --plan


def run_plan(args: argparse.Namespace, cfg: ModelConfig) -> int:
    """Print the serve or train plan of ``cfg`` (a table, or one JSON object with ``--json``)."""
    if args.plan == "train":
        plan = train_plan(
            cfg,
            nodes=args.nodes,
            gpus_per_node=args.gpus_per_node,
            interconnect_gbps=args.interconnect_gbps,
            device_memory=args.device_memory,
            reserve=args.reserve,
            pp=args.pp,
            ep=args.ep,
            micro_batch=args.micro_batch,
            micro_batches=args.micro_batches,
            seq_len=args.seq_len,
            recompute=args.recompute,
            overlap=args.overlap,
            moment_dtype=args.moment_dtype,
            peak_tflops=args.peak_tflops,
            mfu=args.mfu,
        )
        text = format_train_plan
    else:
        plan = serve_plan(
            cfg,
            devices=args.devices,
            device_memory=args.device_memory,
            host_memory=args.host_memory,
            expert_budget=args.expert_budget,
            warm_dtype=args.warm_dtype,
            group_size=args.group_size,
            cold=args.cold,
            cold_dtype=args.cold_dtype,
            reserve=args.reserve,
            kv_tokens=args.kv_tokens,
        )
        text = format_serve_plan
    if args.json:
        print(json.dumps({"config": args.config, "plan": args.plan, **plan.to_dict()}))
    else:
        print(text(args.config, plan))
    return 0


def _size(n: int | float) -> str:
    """Bytes in the largest binary unit below them, with the exact count: ``31.88 GiB (34,235,326,464 B)``."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:,.2f} {unit} ({n:,} B)"
    return f"{n:,} B"


def _short(n: int | float) -> str:
    """:func:`_size` without the exact count."""
    return _size(n).split(" (")[0]


def _rows(rows: list[tuple[str, str]]) -> list[str]:
    """Two columns; a row without a value is a heading and does not set the width."""
    width = max(len(label) for label, value in rows if value)
    return [f"{label:<{width}}  {value}" if value else label for label, value in rows]


def format_serve_plan(name: str, p: ServePlan) -> str:
    """The serve plan as a readable table: per device, then the machine's totals, then the assumptions."""
    t, sizes = p.tiers, p.expert_bytes
    budget = "auto" if p.expert_budget_auto else "--expert-budget"
    uneven = len(set(p.experts_per_layer)) > 1
    device = "device 0, of the most experts" if uneven else f"each of {p.devices}"
    warm = "fp8 e4m3, float32 scale per 128x128 block" if p.warm_dtype == "fp8" else (
        f"{p.warm_dtype}, bf16 scale per {p.group_size} weights of a row")  # fmt: skip
    if p.cold == "offload":
        cold = "in host memory in bf16; staging on the device: num_experts_per_tok bf16 experts, when any is cold"
    else:
        cold = f"on the device in {p.cold_dtype}" + ("" if p.cold_dtype == "fp8" else f", group {p.group_size}")
    rows = [
        (f"per device ({device}; {p.experts_per_layer[0]} experts per MoE layer)", ""),
        ("  device memory", _size(p.device_memory)),
        ("  reserve", f"{_size(p.reserve)}  activations, runtime"),
        ("  usable", _size(p.usable)),
        ("  non-expert weights", f"{_size(p.non_expert_bytes)}  bf16, replicated"),
    ]
    rows += [(f"    {part.replace('_', ' ')}", _size(b)) for part, b in p.non_expert.items()]
    rows += [
        ("  routed experts", f"{_size(p.expert_budget)}  {budget}: "
         f"{p.expert_budget / p.routed_experts_bf16:.1%} of their {_short(p.routed_experts_bf16)} in bf16"),
        ("    hot", f"{_size(t.hot_bytes)}  {t.hot:,} x {sizes['hot']['total']:,} B"),
        ("    warm", f"{_size(t.warm_bytes)}  {t.warm:,} x {sizes['warm']['total']:,} B"),
        ("    cold (on the device)", f"{_size(t.cold_device_bytes)}  {t.cold:,} experts"),
        ("  latent (MLA) KV cache", f"{_size(p.kv_cache_bytes)}  {p.kv_tokens:,} tokens x {p.kv_bytes_per_token:,} B"),
        ("  unused", f"{_size(p.free_bytes)}  budget and cache remainders"),
        (f"machine ({p.devices} devices)", ""),
        ("  routed experts", f"{p.total_hot:,} hot + {p.total_warm:,} warm + {p.total_cold:,} cold = "
         f"{p.total_hot + p.total_warm + p.total_cold:,} ({_short(p.total_routed_experts_bf16)} in bf16)"),
        ("  host memory", _size(p.host_memory)),
        ("  cold experts in host memory", _size(p.host_cold_bytes)),
        ("  latent-cache tokens", f"{p.total_kv_tokens:,} ({p.kv_tokens:,} per device)"),
    ]  # fmt: skip
    rule = "-" * 96
    lines = [f"raymoe info {name} --plan serve", rule, *_rows(rows), rule]
    lines += [
        "tiers: hot in bf16",
        f"  warm in {warm}",
        f"  cold {cold}",
        "assumptions: main model only (MTP modules not placed); expert parallel: each MoE layer's routed experts",
        "  split over the devices in contiguous blocks; all else replicated on every device (data-parallel",
        "  attention: each device caches its own sequences' latents, all layers); memory, reserve and budget are",
        "  per device, host memory is the machine's; tiers are counts (which experts: the expert statistics at",
        "  serve time); fill: every expert warm if the budget allows, then as many hot as fit; else warm, rest cold.",
    ]
    return "\n".join(lines)


def format_train_plan(name: str, p: TrainPlan) -> str:
    """The train plan as a readable table: layout, bytes per GPU, all-to-all, step time and tokens/s."""
    stage_total = sum(p.stage_bytes.values())
    shard_total = sum(p.shard_bytes.values())
    prec = p.precision
    moments = "fp32" if prec["moment_bytes"] == 4 else "bf16"
    start, end = p.stage_layers
    where = ["embedding"] if p.stage_index == 0 else []
    where += ["head, final norm, MTP"] if p.stage_index == p.pp - 1 else []
    stage_what = f"stage {p.stage_index}: layers {start}-{end - 1}" + (f" + {', '.join(where)}" if where else "")
    step = "max(compute, all-to-all)" if p.overlap else "compute + all-to-all (not overlapped)"
    rows = [
        (f"layout ({p.nodes} nodes x {p.gpus_per_node} GPUs = {p.gpus})", ""),
        ("  dp x pp, ep", f"{p.dp} x {p.pp}{' (fewest stages that fit)' if p.pp_auto else ''}, {p.ep} expert shards"),
        (
            "  batch per step",
            f"{p.tokens_per_step:,} tokens = dp {p.dp} x {p.micro_batches} micro-batches x "
            f"{p.micro_batch} x {p.seq_len:,} tokens",
        ),
        (f"per GPU (largest stage + largest shard){', recompute' if p.recompute else ''}", ""),
        ("  device memory, usable", f"{_short(p.device_memory)}, {_short(p.usable)} (less --reserve)"),
        (f"  attention stage ({stage_what})", f"{_size(stage_total)}  {p.stage_params:,} params"),
    ]
    rows += [(f"    {k}", _size(v)) for k, v in p.stage_bytes.items()]
    rows += [(f"  expert shard ({p.shard_experts_per_layer} per MoE layer)", f"{_size(shard_total)}  "
              f"{p.shard_params:,} params")]  # fmt: skip
    rows += [(f"    {k}", _size(v)) for k, v in p.shard_bytes.items()]
    rows += [
        ("  total", f"{_size(p.gpu_bytes)}  {p.gpu_bytes / p.usable:.0%} of usable"),
        ("all-to-all", ""),
        ("  per token, all MoE layers", f"{p.a2a_bytes_per_token:,} B (dispatch + combine, fwd + bwd"
         f"{' + recomputed fwd' if p.recompute else ''})"),
        ("  per step, leaving their GPU", f"{_size(p.a2a_bytes_per_step)}  {p.a2a_leaving_fraction:.4f} of all"),
        ("  per GPU, per step", f"{_size(p.a2a_bytes_per_gpu)}  {p.a2a_s * 1e3:,.1f} ms at "
         f"{p.interconnect_gbps:g} Gb/s"),
        ("throughput", ""),
        ("  model FLOPs per token", f"{p.flops_per_token / 1e9:,.1f} GFLOP (MTP included)"),
        ("  compute per step", f"{p.compute_s * 1e3:,.1f} ms at MFU {p.mfu:g} of {p.peak_tflops:g} TFLOP/s"
         f"{' (x4/3: recompute)' if p.recompute else ''}"),
        ("  step", f"{p.step_s * 1e3:,.1f} ms = {step}"),
        ("  tokens/s", f"{p.tokens_per_s:,.0f}  ({p.tokens_per_s / p.gpus:,.0f} per GPU, MFU with all-to-all "
         f"{p.effective_mfu:.3f})"),
    ]  # fmt: skip
    a = p.activation_bytes_per_token
    rule = "-" * 96
    lines = [f"raymoe info {name} --plan train", rule, *_rows(rows), rule]
    lines += [
        f"precision: bf16 weights ({prec['weight_bytes']} B) and gradients ({prec['grad_bytes']} B), fp32 master "
        f"({prec['master_bytes']} B), AdamW moments 2 x {moments} = {prec['per_param']} B a parameter",
        f"activations kept per token (bf16, no recompute): dense block {a['dense_block']:,} B, MoE block "
        f"{a['moe_block_on_stage']:,} B on the stage",
        f"  + {a['moe_block_routed']:,} B on the shards (top-k x (D + 3I)); fp32 logits {a['logits_per_head']:,} B "
        "per head on the last stage",
        "assumptions: raymoe's actor graph, one attention stage per GPU and one expert shard on ep of them; all",
        "  micro-batches forward, then backward (all in flight); balanced routing; a choice leaves its GPU unless",
        "  its expert is in that GPU's shard; all of it at --interconnect-gbps (NVLink not modelled); pipeline",
        "  sends, the dp gradient all-reduce and the bubble are not counted (the bubble is inside --mfu).",
    ]
    return "\n".join(lines)
