"""``raymoe calibrate``: count the tokens routed to each expert of a checkpoint over a sample of data.

    raymoe calibrate --checkpoint outputs/demo --data data/stdlib-4096-256
    raymoe calibrate --checkpoint C --data D --batches 32 --out stats/expert_loads.json

A forward without gradients on the local engine over ``--batches`` × ``--batch-size`` sequences of
the data's ``--split`` (a seeded sample), MTP modules included
(:func:`raymoe.platform.analysis.loads.calibrate`). It writes the loads as JSON (by default
``expert_loads.json`` beside a local checkpoint, where ``raymoe serve --expert-budget`` finds
them) and prints, per MoE layer, the hottest experts' shares and max/mean. The data must be
tokenized with the checkpoint's tokenizer (``raymoe prepare-data --tokenizer CKPT/tokenizer.json``).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the command line imports torch only when a command runs
    from raymoe.platform.analysis.loads import ExpertLoads
    from raymoe.platform.config import ModelConfig


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("calibrate", help="count each expert's load over a sample of data (for serving tiers)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--checkpoint", required=True, help="training output, checkpoint, HF checkpoint or models:/ URI")
    p.add_argument("--data", required=True, help="prepared data (raymoe prepare-data, the checkpoint's tokenizer)")
    p.add_argument("--batches", type=int, default=8, help="batches (default 8)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences a batch (default 8)")
    p.add_argument("--split", default="train", help="train (default) | validation")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="where the JSON goes (default: expert_loads.json beside a local checkpoint)")
    p.set_defaults(func=run)


def summary(loads: ExpertLoads, cfg: ModelConfig, top: int = 3) -> list[str]:
    """One line per MoE layer: the token rows it routed, the ``top`` hottest experts' shares, max/mean load."""
    from raymoe.platform.plots import layer_name

    freq = loads.frequency()
    lines = []
    for i, layer in enumerate(loads.layers):
        row = freq[i]
        best = row.argsort(descending=True)[:top].tolist()
        hot = ", ".join(f"{e} {100 * float(row[e]):.1f} %" for e in best)
        rows = round(float(loads.loads[i].sum()) / max(cfg.num_experts_per_tok, 1))
        mean = float(loads.loads[i].mean())
        ratio = float(loads.loads[i].max()) / mean if mean else float("nan")
        lines.append(f"  {layer_name(layer, cfg.num_hidden_layers):>8}: {rows:,} tokens; hottest {hot}; "
                     f"max/mean {ratio:.2f}")  # fmt: skip
    return lines


def run(args: argparse.Namespace) -> int:
    import torch

    from raymoe.pipelines.finetune import check_tokenizer
    from raymoe.platform import storage
    from raymoe.platform.analysis.loads import calibrate, loads_file
    from raymoe.platform.checkpoint.layout import CheckpointError, resolve
    from raymoe.platform.checkpoint.reader import open_checkpoint
    from raymoe.platform.data.shards import DataError

    try:
        reader = open_checkpoint(args.checkpoint)
        if reader.model_config.n_routed_experts <= 0:
            raise ValueError(f"checkpoint {reader.location} has no routed experts: there is no load to count")
        check_tokenizer(reader.location, args.data)
        out = args.out
        if out is None:
            if storage.is_uri(resolve(args.checkpoint).location):
                raise ValueError(f"--out is needed: the checkpoint {reader.location} is not a local directory")
            out = loads_file(args.checkpoint)
        t0 = time.perf_counter()
        loads = calibrate(args.checkpoint, args.data, args.batches, args.batch_size, args.split,
                          getattr(torch, args.dtype), args.seed)  # fmt: skip
        loads.save(out)
    except (CheckpointError, DataError, ValueError, OSError) as exc:  # LoadsError and ConfigError are ValueErrors
        print(f"raymoe calibrate: {exc}", file=sys.stderr)
        return 2
    print(f"raymoe calibrate: {loads.tokens:,} tokens ({loads.detail['sequences']} sequences of {args.data}) in "
          f"{time.perf_counter() - t0:.1f} s; wrote {out}")  # fmt: skip
    for line in summary(loads, reader.model_config):
        print(line)
    return 0
