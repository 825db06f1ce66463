"""``raymoe pretrain``: pretraining on prepared data, tracked in MLflow, resumable.

raymoe prepare-data --out data/stdlib
raymoe pretrain small --data data/stdlib --output outputs/run1 train.steps=200 train.checkpoint_every=50
raymoe pretrain small --data data/stdlib --output outputs/run1 --resume
raymoe pretrain small parallel.dp=1 parallel.pp=2 parallel.ep=2     # the actor graph (the default trainer)
raymoe pretrain small --trainer train parallel.dp=2                   # data parallelism on Ray Train
python -m raymoe.pipelines.pretrain tiny --output /tmp/run            # the same, e.g. under `ray job submit`
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from raymoe.platform.config import ConfigError, RaymoeConfig, load_config

logger = logging.getLogger(__name__)


def ensure_default_data(data_dir: Path, cfg: RaymoeConfig, progress: bool = True) -> Path:
    """Prepare the built-in corpus (the stdlib's source) into ``data_dir`` unless it is there already."""
    from raymoe.actors.data import ray_data_map
    from raymoe.platform.data.prepare import PrepareConfig, prepare_dataset
    from raymoe.platform.data.shards import DataError, read_manifest

    try:
        manifest = read_manifest(data_dir)
        if manifest.seq_len == cfg.train.seq_len and manifest.vocab_size <= cfg.model.vocab_size:
            return data_dir
        logger.info("%s was prepared for other settings; preparing it again", data_dir)
    except DataError:
        pass
    prepare_dataset(
        data_dir,
        PrepareConfig(vocab_size=cfg.model.vocab_size, seq_len=cfg.train.seq_len, seed=cfg.train.seed),
        progress=progress,
        map_units=ray_data_map(),
    )
    return data_dir


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pretrain", help="pretrain a model on prepared data (see prepare-data)")
    p.add_argument("preset", nargs="?", default="small", help="preset name or YAML path (default: small)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=200 model.n_routed_experts=16")
    p.add_argument("--data", help="a directory (or URI) written by `raymoe prepare-data` (default: the stdlib "
                   "corpus, prepared into data/stdlib-<vocab>-<seq_len> on first use)")  # fmt: skip
    p.add_argument("--output", default="outputs/pretrain",
                   help="checkpoints go here, a path or URI (default outputs/pretrain)")  # fmt: skip
    from raymoe.actors.trainers import TRAINER_HELP, TRAINERS

    p.add_argument(
        "--trainer",
        default="graph",
        choices=list(TRAINERS),
        help="; ".join(f"{name}: {TRAINER_HELP[name]}" for name in TRAINERS),
    )
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output")
    p.add_argument("--run-name", help="MLflow run name")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_main)


def default_data_dir(cfg: RaymoeConfig) -> Path:
    return Path("data") / f"stdlib-{cfg.model.vocab_size}-{cfg.train.seq_len}"


def _main(args: argparse.Namespace) -> int:
    from raymoe.actors.ray_train import RayTrainError, train_with_ray_train
    from raymoe.actors.runtime import GraphError
    from raymoe.actors.trainers import build_trainer
    from raymoe.platform.checkpoint.layout import CheckpointError
    from raymoe.platform.data.shards import DataError
    from raymoe.platform.storage import StorageError
    from raymoe.platform.train.loop import pretrain

    cfg = load_config(args.preset, args.overrides)
    t0 = time.perf_counter()
    try:
        if args.data:
            data_dir = args.data  # a path or URI
        else:
            data_dir = ensure_default_data(default_data_dir(cfg), cfg, progress=not args.no_progress)
        run = {"resume": args.resume, "progress": not args.no_progress, "run_name": args.run_name}
        if args.trainer == "train":
            result = train_with_ray_train(cfg, data_dir, args.output, **run)
        else:
            build = lambda: build_trainer(cfg, args.trainer, str(args.output))  # noqa: E731 - once the data is checked
            result = pretrain(cfg, data_dir, args.output, trainer=build, **run)
    except (DataError, ConfigError, CheckpointError, StorageError) as exc:
        print(f"raymoe pretrain: {exc}", file=sys.stderr)
        return 2
    except GraphError as exc:
        print(f"raymoe pretrain: the actor graph failed: {exc}", file=sys.stderr)
        return 1
    except RayTrainError as exc:
        print(f"raymoe pretrain: {exc}", file=sys.stderr)
        return 1
    print(
        f"trained to step {result.steps} in {time.perf_counter() - t0:.0f} s: loss {result.first_loss:.3f} -> "
        f"{result.last_loss:.3f}, validation loss {result.val_loss:.3f}, MaxVio_global {result.max_vio_global:.3f}, "
        f"{result.tokens_per_s:,.0f} tokens/s\ncheckpoint: {result.checkpoint}\nMLflow run: {result.run_id}"
    )
    if result.tracking_warning:
        print(f"tracking: {result.tracking_warning}")
    return 0


if __name__ == "__main__":  # python -m raymoe.pipelines.pretrain ... (what `ray job submit` runs)
    from raymoe.pipelines.cli import main

    sys.exit(main(["pretrain", *sys.argv[1:]]))
