"""``raymoe prepare-data``: tokenize a corpus into Parquet shards for pretraining, in parallel on Ray.

    raymoe prepare-data --out data/stdlib                       # the Python standard library, a new BPE
    raymoe prepare-data --out data/mine --corpus notes/ web.jsonl --vocab-size 8192
    raymoe prepare-data --out data/hf --corpus rows.parquet --text-column content --tokenizer ckpt/tokenizer.json
    raymoe prepare-data --out s3://bucket/data/stdlib           # straight to an S3-compatible store

Writes DIR/tokenizer.json, DIR/{train,validation}-NNNNN.parquet and, last, DIR/manifest.json (see
``raymoe.platform.data.shards``). DIR is a local directory or a pyarrow filesystem URI (``s3://``,
``gs://``, ``file://``; S3 is configured by the AWS_* variables or the URI's query, see
``raymoe.platform.storage``); the corpus is read from local files. Ray: the running cluster when
RAY_ADDRESS is set, else a local one started for the command. A wrong input (a missing file, a bad
JSONL line, a missing Parquet column, text that is not UTF-8, an empty corpus) exits with code 2
and a message naming the file and line; so does an output that cannot be written (a missing bucket).
"""

from __future__ import annotations

import argparse
import sys
import time

from raymoe.actors.data import ray_data_map
from raymoe.platform.data.prepare import (
    DEFAULT_SEQ_LEN,
    DEFAULT_SHARD_SEQUENCES,
    DEFAULT_VAL_FRACTION,
    DEFAULT_VOCAB_SIZE,
    PrepareConfig,
    prepare_dataset,
)
from raymoe.platform.data.shards import DataError

EXIT_BAD_INPUT = 2


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``prepare-data`` subcommand."""
    p = subparsers.add_parser(
        "prepare-data", help="tokenize a corpus into Parquet shards (Ray Data)", description=__doc__.split("\n\n")[0]
    )
    p.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="output directory or URI, e.g. s3://bucket/data (its previous shards are replaced)",
    )
    p.add_argument(
        "--corpus",
        nargs="+",
        metavar="PATH",
        help="text/.jsonl/.parquet files or directories (default: the Python standard library's .py files)",
    )
    p.add_argument("--text-field", default="text", help="JSON field of a .jsonl line holding the text (default text)")
    p.add_argument("--text-column", default="text", help="Parquet column holding the text (default text)")
    p.add_argument("--tokenizer", metavar="FILE", help="use this tokenizer.json instead of training a BPE")
    p.add_argument("--eos-token", help="end-of-document token of --tokenizer (default: found by name)")
    p.add_argument(
        "--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE, help=f"BPE size (default {DEFAULT_VOCAB_SIZE})"
    )
    p.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN, help=f"sequence length (default {DEFAULT_SEQ_LEN})")
    p.add_argument(
        "--val-fraction",
        type=float,
        default=DEFAULT_VAL_FRACTION,
        help=f"fraction of sequences held out (default {DEFAULT_VAL_FRACTION})",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the train/validation split (default 0)")
    p.add_argument(
        "--max-bytes",
        type=int,
        help="take the corpus up to N bytes (whole files, JSONL line ranges, Parquet row groups)",
    )
    p.add_argument(
        "--shard-sequences",
        type=int,
        default=DEFAULT_SHARD_SEQUENCES,
        help=f"sequences per shard (default {DEFAULT_SHARD_SEQUENCES})",
    )
    p.add_argument("--num-cpus", type=int, help="CPUs of a local Ray started for this command (default: all)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> PrepareConfig:
    """The :class:`PrepareConfig` of parsed ``prepare-data`` arguments."""
    return PrepareConfig(
        corpus=args.corpus,
        text_field=args.text_field,
        text_column=args.text_column,
        tokenizer=args.tokenizer,
        eos_token=args.eos_token,
        vocab_size=args.vocab_size,
        seq_len=args.seq_len,
        val_fraction=args.val_fraction,
        seed=args.seed,
        max_bytes=args.max_bytes,
        shard_sequences=args.shard_sequences,
    )


def run(args: argparse.Namespace) -> int:
    """Prepare the data and print a summary; exit code 0, or 2 with the message on stderr for a wrong input."""
    t0 = time.perf_counter()
    try:
        manifest = prepare_dataset(
            args.out, config_from_args(args), progress=not args.no_progress, map_units=ray_data_map(args.num_cpus)
        )
    except (DataError, OSError) as exc:  # a wrong input, or an output directory (or bucket) that cannot be written
        print(f"raymoe prepare-data: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    splits = ", ".join(f"{name} {s.sequences:,} ({len(s.shards)} shards)" for name, s in manifest.splits.items())
    print(
        f"prepared {manifest.documents:,} documents, {manifest.tokens:,} tokens in {time.perf_counter() - t0:.1f} s: "
        f"{manifest.sequences:,} sequences of {manifest.seq_len + 1} ids ({splits}); vocab {manifest.vocab_size}\n"
        f"data: {args.out}"
    )
    return 0
