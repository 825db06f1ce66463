"""``raymoe export``: a checkpoint (any trainer, any layout, any location) as a Hugging Face checkpoint.

raymoe export --checkpoint outputs/pretrain --out exported/      # the run's latest checkpoint
raymoe export --checkpoint s3://bucket/run/checkpoints/step_00000200 --out exported/ --dtype bf16

The result (``config.json``, safetensors in DeepSeek-V3's layout, ``tokenizer.json``) loads with
``raymoe generate --checkpoint exported/`` and with transformers' ``DeepseekV3ForCausalLM``.
"""

from __future__ import annotations

import argparse
import sys

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write a training checkpoint in the Hugging Face layout", description=__doc__)
    p.add_argument("--checkpoint", required=True, metavar="C",
                   help="a training checkpoint (path or URI) or a training output (its latest one)")  # fmt: skip
    p.add_argument(
        "--out", required=True, metavar="DIR", help="directory (or URI) to write (a local one is replaced atomically)"
    )
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="dtype of the weights (default fp32)")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    from raymoe.platform.checkpoint import CheckpointError, export_hf

    try:
        source = export_hf(args.checkpoint, args.out, dtype=DTYPES[args.dtype])
    except (CheckpointError, OSError) as exc:
        print(f"raymoe export: {exc}", file=sys.stderr)
        return 2
    print(f"exported {source} -> {args.out}")
    return 0
