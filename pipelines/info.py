"""``raymoe info``: parameter counts, KV cache, training FLOPs and GPU-hours of a model config.

    raymoe info deepseek-v3
    raymoe info deepseek-v3 --json --seq-len 4096 --tokens 14.8e12 --peak-tflops 989 --mfu 0.4
    raymoe info small model.n_routed_experts=16
    raymoe info path/to/checkpoint            # a Hugging Face DeepseekV3 config.json

The numbers come from :mod:`raymoe.platform.info` (the model is built on the meta device, so
even the 671B configuration takes about a second). At MFU 0.407 the ``deepseek-v3`` estimate
reproduces the report's 2.664M H800 GPU-hours for 14.8T tokens at 989 TFLOP/s.
"""

from __future__ import annotations

import argparse
import json

from raymoe.platform.info import (
    DEEPSEEK_V3_PRETRAIN_TOKENS,
    DEFAULT_SEQ_LEN,
    H800_BF16_PEAK_TFLOPS,
    ModelInfo,
    model_info,
    resolve_model_config,
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
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print the report of ``args.config``; exit code 0 (2 on a bad argument)."""
    if args.seq_len <= 0 or args.tokens <= 0 or args.peak_tflops <= 0 or not 0 < args.mfu <= 1:
        from raymoe.platform.config import ConfigError

        raise ConfigError("--seq-len, --tokens and --peak-tflops must be > 0 and --mfu in (0, 1]")
    cfg = resolve_model_config(args.config, args.overrides)
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
