"""The ``raymoe`` command: one subcommand per pipeline module.

Each module named in ``SUBCOMMANDS`` defines ``register(subparsers)``, which adds its parser and
sets ``func`` (called with the parsed arguments; its return value is the exit code).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

# oneDNN keeps a primitive (with its packed weights) per GEMM shape, up to 1024 of them; the MoE
# expert GEMMs change shape every step, so on the bench preset that cache added ~260 MB to the
# bf16 training peak (3,070 MiB; 2,808 with 256). Smaller caches thrash in decode (bf16 batch-1
# decode: 71.6 tok/s with 16, 82.6 with 64, 89.6 with 256, 90.1 with 1024). Set before torch
# creates any primitive; a value the user set wins.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "256")

SUBCOMMANDS = (
    "info", "prepare-data", "generate", "pretrain", "finetune", "resize", "export", "serve", "demo", "experiment",
    "analyze", "calibrate", "bench", "ui",
)  # fmt: skip


def build_parser(names: tuple[str, ...] = SUBCOMMANDS) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="raymoe", description="Pretrain and serve DeepSeek-V3-architecture MoE models on Ray."
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in names:
        importlib.import_module(f"raymoe.pipelines.{name.replace('-', '_')}").register(sub)
    return parser


def _named_command(argv: list[str]) -> str | None:
    """The subcommand ARGV names, if any: only its module is imported (``serve`` pulls in Ray Serve and FastAPI,
    which ``raymoe bench`` or ``info`` never need; a GPU image without them still runs those)."""
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--log-level":
            i += 2
        elif arg.startswith("-"):
            return None  # --help, --log-level=X or a typo: the full parser answers
        else:
            return arg if arg in SUBCOMMANDS else None
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    name = _named_command(argv)
    parser = build_parser((name,) if name else SUBCOMMANDS)
    # dotted overrides may also follow options (`raymoe pretrain tiny --output o train.steps=5`)
    args, extra = parser.parse_known_args(argv)
    if extra:
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from raymoe.platform.config import ConfigError

    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"raymoe {args.command}: configuration error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
