"""``raymoe generate``: complete a prompt with a checkpoint, in this process.

    raymoe generate --checkpoint ckpt/ --prompt "def fib(n):" --max-new-tokens 64
    raymoe generate --checkpoint ckpt/ --prompt-ids 5,17,42 --json
    raymoe generate --checkpoint ckpt/ --prompt "import" --temperature 0.8 --top-p 0.95 --seed 0 --dtype bf16

The checkpoint is a Hugging Face-format directory (``config.json`` and safetensors); text
prompts are encoded with its ``tokenizer.json``. Generation stops at the model's EOS token
(``generation_config.json`` or ``config.json``) unless ``--ignore-eos``. Prints the prompt and
its completion, or with ``--json`` one object: ``prompt_ids``, ``generated_ids``, ``text`` (null
without a tokenizer) and ``tokens_per_s``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch

from raymoe.platform.config import ModelConfig, model_config_from_hf

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
TOKENIZER_FILE = "tokenizer.json"
DEFAULT_MAX_NEW_TOKENS = 32
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
EXIT_BAD_INPUT = 2


class GenerateInputError(ValueError):
    """A command-line input is wrong; the message says which and what to do."""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``generate`` subcommand."""
    parser = subparsers.add_parser(
        "generate", help="complete a prompt with a checkpoint (single process)", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        metavar="DIR",
        help="a Hugging Face checkpoint directory, a training checkpoint, or a training output (its latest checkpoint)",
    )
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", metavar="TEXT", help="prompt text (needs DIR/tokenizer.json)")
    prompt.add_argument("--prompt-ids", metavar="IDS", help="prompt token ids, comma-separated (e.g. 5,17,42)")
    parser.add_argument(
        "--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS, help=f"default {DEFAULT_MAX_NEW_TOKENS}"
    )
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0 = off)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="inference precision (default fp32)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--ignore-eos", action="store_true", help="always generate --max-new-tokens tokens")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Generate and print; exit code 0, or 2 with a message on stderr when an input is wrong."""
    try:
        result = _generate(args)
    except (ValueError, OSError) as exc:
        # GenerateInputError, ConfigError and CheckpointError are ValueErrors, as are generate()'s
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
    """Check the inputs (before loading any weights), load, generate; the result of ``--json``."""
    from raymoe.platform.checkpoint.sharded import is_sharded_checkpoint, latest_checkpoint_uri
    from raymoe.platform.generate import check_prompt, generate, prepare_for_inference

    ckpt = Path(args.checkpoint)
    if not ckpt.is_dir():
        raise GenerateInputError(f"--checkpoint {ckpt} is not a directory")
    if not (ckpt / CONFIG_FILE).is_file() and (latest := latest_checkpoint_uri(str(ckpt))) is not None:
        ckpt = Path(latest)  # a training output: its latest checkpoint
    if not (ckpt / CONFIG_FILE).is_file():
        raise GenerateInputError(f"--checkpoint {ckpt} has no {CONFIG_FILE}; is it a Hugging Face checkpoint?")
    cfg = model_config_from_hf(ckpt / CONFIG_FILE)
    tokenizer = _load_tokenizer(ckpt, required=args.prompt is not None)
    if args.prompt is not None:
        prompt_ids = tokenizer.encode(args.prompt).ids
        if not prompt_ids:
            raise GenerateInputError("--prompt encodes to no tokens; pass a non-empty prompt")
    else:
        prompt_ids = parse_prompt_ids(args.prompt_ids)
    _check_ids(prompt_ids, cfg)

    from raymoe.platform.checkpoint.hf import load_hf_checkpoint

    device = _device(args.device)
    # load in float32 and cast after, so that the routers keep their float32 weights
    if is_sharded_checkpoint(str(ckpt)):  # written by the actor graph
        from raymoe.platform.checkpoint.training import load_training_model

        model = load_training_model(str(ckpt))[0].to(device)
    else:
        model = load_hf_checkpoint(ckpt, dtype=torch.float32, device=device, strict_mtp=False)
    if DTYPES[args.dtype] != torch.float32:
        prepare_for_inference(model, DTYPES[args.dtype])
    check_prompt(model, torch.tensor([prompt_ids]), args.max_new_tokens)
    eos = None if args.ignore_eos else _eos_token_id(ckpt, cfg)

    start = time.perf_counter()
    generated = generate(
        model,
        [prompt_ids],
        args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        eos_token_id=eos,
    )[0]
    elapsed_s = time.perf_counter() - start
    tokens_per_s = len(generated) / elapsed_s if elapsed_s > 0 else 0.0
    logger.info("generated %d tokens in %.3f s (%.1f tokens/s)", len(generated), elapsed_s, tokens_per_s)
    text = tokenizer.decode(prompt_ids + generated) if tokenizer is not None else None
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


def _check_ids(ids: list[int], cfg: ModelConfig) -> None:
    bad = [t for t in ids if not 0 <= t < cfg.vocab_size]
    if bad:
        raise GenerateInputError(
            f"prompt token id {bad[0]} is outside the model's vocabulary (ids must be in 0..{cfg.vocab_size - 1})"
        )


def _load_tokenizer(ckpt: Path, required: bool):
    """The checkpoint's ``tokenizers.Tokenizer``, or None when it has none and none is required."""
    path = ckpt / TOKENIZER_FILE
    if not path.is_file():
        if required:
            raise GenerateInputError(f"checkpoint {ckpt} has no {TOKENIZER_FILE}; pass --prompt-ids")
        return None
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception on a malformed file
        raise GenerateInputError(f"cannot read tokenizer {path}: {exc}") from None


def _eos_token_id(ckpt: Path, cfg: ModelConfig) -> int | None:
    """EOS of ``generation_config.json`` if present (its first, when a list), else of config.json."""
    path = ckpt / GENERATION_CONFIG_FILE
    eos: Any = cfg.eos_token_id
    if path.is_file():
        try:
            eos = json.loads(path.read_text()).get("eos_token_id", eos)
        except (OSError, ValueError, AttributeError):
            logger.warning("ignoring unreadable %s", path)
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    return eos
