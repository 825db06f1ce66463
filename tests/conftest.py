"""Shared fixtures: deterministic torch, tiny configs, and tiny Hugging Face checkpoints."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from s3_server import s3_prefix, s3_server  # noqa: F401  (fixtures)

from raymoe.platform.config import ModelConfig, load_config


def pytest_collection_modifyitems(config, items) -> None:  # noqa: ANN001
    """Tests marked ``gpu`` are skipped where torch sees no CUDA device, and say so."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: torch.cuda.is_available() is False here (make test-gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


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


def start_local_ray() -> None:
    """The session's local Ray: 2 CPUs, no dashboard (what ``ray_local`` starts, and restarts after a cluster)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)


@pytest.fixture(scope="session")
def ray_local(s3_server):  # noqa: ANN001, F811  (s3_server first: workers inherit its variables at ray.init)
    """One local Ray for the whole session (2 CPUs, no dashboard), always shut down at the end."""
    import ray

    start_local_ray()
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory, ray_local):  # noqa: ANN001, ANN201
    """A small prepared dataset of the stdlib corpus for the ``tiny`` preset (vocab 512, 32 tokens)."""
    from raymoe.platform.data.prepare import PrepareConfig, prepare_dataset

    out = tmp_path_factory.mktemp("data")
    prepare_dataset(out, PrepareConfig(vocab_size=512, seq_len=32, max_bytes=200_000, seed=0))
    return out


@torch.no_grad()
def greedy_by_recompute(model, prompts: list[list[int]], n: int) -> list[list[int]]:  # noqa: ANN001
    """Greedy decoding without a cache, one prompt at a time: the whole sequence through the training
    forward (naive attention, no cache) every step; the plain-torch twin of every decoding path."""
    out = []
    for prompt in prompts:
        seq = torch.tensor([prompt])
        for _ in range(n):
            seq = torch.cat((seq, model(seq)[:, -1].argmax(-1, keepdim=True)), dim=1)
        out.append(seq[0, len(prompt) :].tolist())
    return out
