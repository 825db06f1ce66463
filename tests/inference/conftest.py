"""Fixtures of the serving tests: a tiny model with an MTP module, and a checkpoint of it with a tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from raymoe.platform.config import load_config
from raymoe.platform.generate import prepare_for_inference
from raymoe.platform.model.transformer import DeepseekV3

BPE_VOCAB = 300  # <= the tiny model's 512
CORPUS = ["def f(x):\n    return x + 1\n", "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n"]


def tiny_model(seed: int = 0, std: float | None = None) -> DeepseekV3:
    """The ``tiny`` preset (one MTP module, group-limited routing), float32, eval mode."""
    cfg = load_config("tiny").model
    if std is not None:
        import dataclasses

        cfg = dataclasses.replace(cfg, initializer_range=std)
    model = DeepseekV3(cfg)
    model.init_weights(seed)
    return prepare_for_inference(model, torch.float32)


def train_tokenizer(path: Path) -> Path:
    """A byte-level BPE trained on a few lines of Python, saved as ``path``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<bos>", "<eos>"],
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS * 20, trainer=trainer)
    tokenizer.save(str(path))
    return path


@pytest.fixture(scope="session")
def served_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Hugging Face checkpoint of the tiny model (with its MTP module) and a tokenizer.json."""
    from raymoe.platform.checkpoint.hf_save import save_hf_checkpoint

    root = tmp_path_factory.mktemp("served")
    tokenizer = train_tokenizer(root / "tokenizer.json")
    return save_hf_checkpoint(tiny_model(), root / "ckpt", extra_files=[tokenizer])
