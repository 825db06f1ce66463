"""Fixtures of the serving tests: a tiny model with an MTP module, and a checkpoint of it with a tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from raymoe.platform.config import load_config
from raymoe.platform.model.transformer import DeepseekV3, prepare_for_inference

from hf_reference import train_tokenizer


def tiny_model(seed: int = 0, std: float | None = None) -> DeepseekV3:
    """The ``tiny`` preset (one MTP module, group-limited routing), float32, eval mode."""
    cfg = load_config("tiny").model
    if std is not None:
        import dataclasses

        cfg = dataclasses.replace(cfg, initializer_range=std)
    model = DeepseekV3(cfg)
    model.init_weights(seed)
    return prepare_for_inference(model, torch.float32)


@pytest.fixture(scope="session")
def served_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Hugging Face checkpoint of the tiny model (with its MTP module) and a tokenizer.json."""
    from raymoe.platform.checkpoint.hf_save import save_hf_checkpoint

    root = tmp_path_factory.mktemp("served")
    tokenizer = train_tokenizer(root / "tokenizer.json")
    return save_hf_checkpoint(tiny_model(), root / "ckpt", extra_files=[tokenizer])
