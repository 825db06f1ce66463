"""``raymoe generate``: complete a prompt with a checkpoint, in this process, on the serving engine.

    raymoe generate --checkpoint outputs/demo --prompt "def fib(n):" --max-new-tokens 64
    raymoe generate --checkpoint ckpt/ --prompt-ids 5,17,42 --json
    raymoe generate --checkpoint s3://bucket/run --prompt "import" --temperature 0.8 --top-p 0.95 --seed 0

The checkpoint is a training output (its latest checkpoint), a training checkpoint or a Hugging
Face checkpoint, local or a URI; text prompts are encoded with its ``tokenizer.json``. Generation
runs the serving engine (paged latent cache, MTP speculative decoding when the checkpoint has MTP
modules) in this process and stops at the model's EOS token (``generation_config.json`` or the
model config) unless ``--ignore-eos``. Prints the prompt and its completion, or with ``--json`` one
object: ``prompt_ids``, ``generated_ids``, ``text`` (null without a tokenizer) and ``tokens_per_s``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from typing import Any

import torch

logger = logging.getLogger(__name__)

DEFAULT_MAX_NEW_TOKENS = 32
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
EXIT_BAD_INPUT = 2


class GenerateInputError(ValueError):
    """A command-line input is wrong; the message says which and what to do."""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``generate`` subcommand."""
    parser = subparsers.add_parser(
        "generate", help="complete a prompt with a checkpoint (in this process)", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        metavar="LOCATION",
        help="a training output (its latest checkpoint), a training or Hugging Face checkpoint; a path or URI",
    )
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", metavar="TEXT", help="prompt text (needs the checkpoint's tokenizer.json)")
    prompt.add_argument("--prompt-ids", metavar="IDS", help="prompt token ids, comma-separated (e.g. 5,17,42)")
    parser.add_argument(
        "--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS, help=f"default {DEFAULT_MAX_NEW_TOKENS}"
    )
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0 = off)")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = off)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="inference precision (default fp32)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--no-speculative", action="store_true", help="no MTP speculative decoding")
    parser.add_argument("--ignore-eos", action="store_true", help="always generate --max-new-tokens tokens")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Generate and print; exit code 0, or 2 with a one-line message on stderr when an input is wrong."""
    try:
        result = _generate(args)
    except (ValueError, OSError) as exc:
        # GenerateInputError, ConfigError, CheckpointError, RequestError and SamplingError are ValueErrors
        print(f"raymoe generate: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.json:
        print(json.dumps(result))
    elif result["text"] is not None:
        print(result["text"])
    else:
        print(" ".join(str(t) for t in result["prompt_ids"] + result["generated_ids"]))
    return 0


def _generate(args: argparse.Namespace) -> dict[str, Any]:
    """Check the inputs (before reading any weights), load, generate; the result of ``--json``."""
    from raymoe.platform.checkpoint.reader import load_model
    from raymoe.platform.inference.engine import generate
    from raymoe.platform.inference.loading import open_served

    served = open_served(args.checkpoint, tokenizer_required=args.prompt is not None)
    cfg = served.model_config
    if args.prompt is not None:
        prompt_ids = served.tokenizer.encode(args.prompt).ids
        if not prompt_ids:
            raise GenerateInputError("--prompt encodes to no tokens; pass a non-empty prompt")
    else:
        prompt_ids = parse_prompt_ids(args.prompt_ids)
    bad = [t for t in prompt_ids if not 0 <= t < cfg.vocab_size]
    if bad:
        raise GenerateInputError(
            f"prompt token id {bad[0]} is outside the model's vocabulary (ids must be in 0..{cfg.vocab_size - 1})"
        )
    total = len(prompt_ids) + args.max_new_tokens
    if total > cfg.max_position_embeddings:
        raise GenerateInputError(
            f"the prompt's {len(prompt_ids)} tokens + --max-new-tokens {args.max_new_tokens} = {total} exceed the "
            f"model's context of {cfg.max_position_embeddings} tokens; shorten the prompt or lower --max-new-tokens"
        )
    model = load_model(served.reader, dtype=DTYPES[args.dtype], device=_device(args.device))
    eos = None if args.ignore_eos else served.eos_token_id
    start = time.perf_counter()
    generated = generate(
        model, [prompt_ids], args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, seed=args.seed, eos_token_id=eos, speculative=not args.no_speculative,
    )[0]  # fmt: skip
    elapsed_s = time.perf_counter() - start
    tokens_per_s = len(generated) / elapsed_s if elapsed_s > 0 else 0.0
    logger.info("generated %d tokens in %.3f s (%.1f tokens/s)", len(generated), elapsed_s, tokens_per_s)
    text = served.tokenizer.decode(prompt_ids + generated) if served.tokenizer is not None else None
    return {"prompt_ids": prompt_ids, "generated_ids": generated, "text": text, "tokens_per_s": tokens_per_s}


def _device(name: str | None) -> torch.device:
    """The torch device of ``--device`` (default: cuda when available, else cpu)."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise GenerateInputError(f"--device {name!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GenerateInputError(f"--device {name}: CUDA is not available here; use --device cpu")
    return device


def parse_prompt_ids(text: str) -> list[int]:
    """``"5,17,42"`` -> [5, 17, 42]; GenerateInputError naming the first entry that is not an integer."""
    ids = []
    for part in text.split(","):
        try:
            ids.append(int(part.strip()))
        except ValueError:
            raise GenerateInputError(
                f"--prompt-ids: {part.strip()!r} is not an integer token id (expected e.g. 5,17,42)"
            ) from None
    return ids
