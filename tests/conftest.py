"""Shared fixtures: deterministic torch, tiny configs, and tiny Hugging Face checkpoints."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from raymoe.platform.config import ModelConfig, load_config


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)


@pytest.fixture
def tiny_cfg() -> ModelConfig:
    """The ``tiny`` preset's model config (MTP on, group-limited routing on)."""
    return load_config("tiny").model


def tiny_variant(**changes: object) -> ModelConfig:
    """The tiny model config with some fields changed."""
    return dataclasses.replace(load_config("tiny").model, **changes)


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session (2 CPUs, no dashboard), always shut down at the end."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        yield ray
    finally:
        ray.shutdown()
