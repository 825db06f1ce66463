"""``raymoe pretrain``: single-process pretraining on the built-in corpus (or a prepared one).

The data pipeline, tracking and the actor graph come in later; this entry point already trains
the real model with the real step and writes a Hugging Face-layout checkpoint with its tokenizer.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from raymoe.platform.config import RaymoeConfig, config_to_dict, load_config

logger = logging.getLogger(__name__)

DEMO_CORPUS_BYTES = 8_000_000  # ~8 MB of the stdlib: BPE training takes seconds, enough text for minutes of training


@dataclass
class PretrainResult:
    """Where the run left its outputs, and its last losses."""

    checkpoint: Path
    tokenizer: Path
    first_loss: float
    last_loss: float
    steps: int
    tokens_per_s: float


def prepare_builtin_corpus(out_dir: Path, vocab_size: int, max_bytes: int = DEMO_CORPUS_BYTES) -> tuple[Path, Path]:
    """Train a tokenizer on the stdlib source and tokenize it once; cached in ``out_dir``."""
    from safetensors.torch import save_file

    from raymoe.platform.data.corpus import SPECIAL_TOKENS, encode_documents, read_texts, stdlib_files, train_tokenizer

    tokenizer_path = out_dir / "tokenizer.json"
    ids_path = out_dir / "tokens.safetensors"
    meta_path = out_dir / "corpus.json"
    meta = {"vocab_size": vocab_size, "max_bytes": max_bytes, "source": "python-stdlib"}
    if tokenizer_path.exists() and ids_path.exists() and meta_path.exists():
        if json.loads(meta_path.read_text()) == meta:
            return tokenizer_path, ids_path
    files = stdlib_files(max_bytes)
    logger.info("training a %d-token byte-level BPE on %d stdlib files", vocab_size, len(files))
    tokenizer = train_tokenizer(read_texts(files), vocab_size, tokenizer_path)
    ids = encode_documents(tokenizer, list(read_texts(files)), eos_id=SPECIAL_TOKENS.index("<|eos|>"))
    save_file({"ids": ids}, str(ids_path))
    meta_path.write_text(json.dumps(meta))
    logger.info("corpus: %d tokens in %s", ids.numel(), ids_path)
    return tokenizer_path, ids_path


def run_pretrain(cfg: RaymoeConfig, output: Path, progress: bool = True) -> PretrainResult:
    """Train ``cfg`` in this process on the built-in corpus; save the final checkpoint under ``output``."""
    from safetensors.torch import load_file
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    from raymoe.platform.checkpoint import save_hf_checkpoint
    from raymoe.platform.data.corpus import PackedTokens
    from raymoe.platform.train.trainer import LocalTrainer

    output.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.train.seed)
    tokenizer_path, ids_path = prepare_builtin_corpus(output / "data", cfg.model.vocab_size)
    data = PackedTokens(load_file(str(ids_path))["ids"], cfg.train.seq_len, seed=cfg.train.seed)
    trainer = LocalTrainer(cfg)
    micro = cfg.parallel.micro_batches
    per_micro = cfg.train.batch_size // micro
    first = last = float("nan")
    tokens, seconds = 0, 0.0
    bar = tqdm(range(cfg.train.steps), desc="pretrain", disable=not progress, unit="step", dynamic_ncols=True)
    with logging_redirect_tqdm():  # log lines print above the progress bar
        for step in bar:
            m = trainer.train_step([data.batch(per_micro) for _ in range(micro)])
            first = m.loss if step == 0 else first
            last = m.loss
            if step > 0:  # the first step pays one-time costs
                tokens += m.tokens
                seconds += m.seconds
            bar.set_postfix(loss=f"{m.loss:.3f}", tok_s=f"{m.tokens_per_s:,.0f}", maxvio=f"{m.max_vio.mean():.2f}")
            if cfg.train.log_every and (step % cfg.train.log_every == 0 or step == cfg.train.steps - 1):
                logger.info(
                    "step %d loss %.4f main %.4f mtp %s lr %.2e maxvio %.3f bias [%.4f, %.4f] %.0f tok/s",
                    step, m.loss, m.main_loss, f"{m.mtp_loss:.4f}" if m.mtp_loss is not None else "-", m.lr,
                    float(m.max_vio.mean()), m.bias_min, m.bias_max, m.tokens_per_s,
                )  # fmt: skip
    checkpoint = output / "checkpoint"
    save_hf_checkpoint(trainer.model, checkpoint, extra_files=[tokenizer_path])
    (output / "config.json").write_text(json.dumps(config_to_dict(cfg), indent=2))
    return PretrainResult(
        checkpoint=checkpoint,
        tokenizer=tokenizer_path,
        first_loss=first,
        last_loss=last,
        steps=cfg.train.steps,
        tokens_per_s=tokens / seconds if seconds else 0.0,
    )


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pretrain", help="pretrain a model (single process on the built-in corpus)")
    p.add_argument("preset", nargs="?", default="small", help="preset name or YAML path (default: small)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=200 model.n_routed_experts=16")
    p.add_argument("--output", default="outputs/pretrain", help="output directory (default outputs/pretrain)")
    p.add_argument("--engine", default="local", choices=["local"], help="training engine (default local)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    cfg = load_config(args.preset, args.overrides)
    t0 = time.perf_counter()
    result = run_pretrain(cfg, Path(args.output), progress=not args.no_progress)
    print(
        f"trained {result.steps} steps in {time.perf_counter() - t0:.0f} s: loss {result.first_loss:.3f} -> "
        f"{result.last_loss:.3f}, {result.tokens_per_s:,.0f} tokens/s\ncheckpoint: {result.checkpoint}"
    )
    return 0
