"""``raymoe demo``: pretrain the ``small`` preset for a few minutes, then sample from it."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from raymoe.platform.config import load_config

DEMO_PROMPT = "def fibonacci(n):\n    "


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="train the small preset on the built-in corpus and print a sample")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=50")
    p.add_argument("--output", default="outputs/demo", help="output directory (default outputs/demo)")
    p.add_argument("--prompt", default=DEMO_PROMPT, help="prompt of the sample")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    from tokenizers import Tokenizer

    from raymoe.pipelines.pretrain import run_pretrain
    from raymoe.platform.checkpoint import load_hf_checkpoint
    from raymoe.platform.generate import generate

    cfg = load_config("small", args.overrides)
    output = Path(args.output)
    print(f"raymoe demo: pretraining the 'small' preset ({cfg.train.steps} steps, {cfg.train.dtype}) on the "
          f"Python standard library's source; outputs in {output}/")  # fmt: skip
    t0 = time.perf_counter()
    result = run_pretrain(cfg, output)
    print(
        f"trained {result.steps} steps in {time.perf_counter() - t0:.0f} s: loss {result.first_loss:.3f} -> "
        f"{result.last_loss:.3f} at {result.tokens_per_s:,.0f} tokens/s"
    )
    model = load_hf_checkpoint(result.checkpoint)
    tokenizer = Tokenizer.from_file(str(result.tokenizer))
    prompt_ids = tokenizer.encode(args.prompt).ids
    new_ids = generate(model, [prompt_ids], max_new_tokens=args.max_new_tokens, temperature=0.0)[0]
    print("\n--- sample (greedy) ---")
    print(args.prompt + tokenizer.decode(new_ids))
    print("--- end of sample ---\n")
    print(f"checkpoint (Hugging Face layout, with tokenizer.json): {result.checkpoint}")
    print(f"generate more: raymoe generate --checkpoint {result.checkpoint} --prompt 'import os'")
    return 0
