"""``raymoe experiment balance``: the paper's balance table (loss-free vs aux loss vs none)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from raymoe.platform.config import load_config

DEFAULT_STEPS = 250
DEFAULT_GAMMA = 0.005  # the paper's 0.001 is for runs of many thousand steps; measured here: 0.01 balances 60 steps


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("experiment", help="reproducible experiments")
    which = p.add_subparsers(dest="experiment", required=True, metavar="EXPERIMENT")
    b = which.add_parser("balance", help="loss-free balancing vs the auxiliary loss vs none (Wang et al., Table 1)")
    b.add_argument("preset", nargs="?", default="small", help="preset (default small)")
    b.add_argument("overrides", nargs="*", help="dotted overrides")
    b.add_argument("--data", help="prepared data (default: the stdlib corpus)")
    b.add_argument("--output", default="outputs/balance", help="output directory")
    b.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"steps per run (default {DEFAULT_STEPS})")
    b.add_argument("--gamma", type=float, default=DEFAULT_GAMMA, help=f"bias update speed (default {DEFAULT_GAMMA})")
    b.add_argument("--alpha", type=float, default=0.001, help="aux-loss weight of the baseline (default 0.001)")
    b.add_argument("--json", action="store_true", help="also print the rows as one JSON line")
    b.add_argument("--no-progress", action="store_true")
    b.set_defaults(func=_balance)


def _balance(args: argparse.Namespace) -> int:
    from raymoe.pipelines.pretrain import default_data_dir, ensure_default_data
    from raymoe.platform.train.experiment import balance_experiment, format_table

    cfg = load_config(args.preset, [f"train.steps={args.steps}", *args.overrides])
    data_dir = Path(args.data) if args.data else ensure_default_data(default_data_dir(cfg), cfg)
    t0 = time.perf_counter()
    rows = balance_experiment(
        cfg, data_dir, args.output, gamma=args.gamma, alpha=args.alpha, progress=not args.no_progress
    )
    print(f"\nbalance experiment: preset {args.preset}, {args.steps} steps per run, gamma {args.gamma}, "
          f"alpha {args.alpha}, {time.perf_counter() - t0:.0f} s\n")  # fmt: skip
    print(format_table(rows))
    if args.json:
        print(json.dumps([r.__dict__ for r in rows]))
    return 0
