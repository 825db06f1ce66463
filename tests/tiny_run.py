"""A tiny training run on disk: a few checkpoints of the ``tiny`` preset, each with a tokenizer.json."""

from __future__ import annotations

from pathlib import Path

import torch

from raymoe.platform.config import load_config
from raymoe.platform.train.loop import micro_batches
from raymoe.platform.train.trainer import LocalTrainer

from hf_reference import BPE_VOCAB, train_tokenizer


def write_tiny_run(root: Path, steps: int = 2, overrides: tuple[str, ...] = ()) -> Path:
    """Train ``tiny`` ``steps`` steps on random tokens (biases moving fast), a checkpoint after each; the run root."""
    cfg = load_config("tiny", ["train.bias_update_speed=0.05", *overrides])
    trainer = LocalTrainer(cfg)
    tokenizer = train_tokenizer(root / "tokenizer.json")
    gen = torch.Generator().manual_seed(0)
    run = root / "run"
    for _ in range(steps):
        x = torch.randint(0, BPE_VOCAB, (cfg.train.batch_size, cfg.train.seq_len + 1), generator=gen)
        trainer.train_step(micro_batches(x[:, :-1].contiguous(), x[:, 1:].contiguous(), 1))
        trainer.save_checkpoint(str(run), {"loader": {}}, [str(tokenizer)])
    return run
