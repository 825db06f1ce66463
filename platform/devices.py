"""Which device a process computes on: ``auto`` (CUDA when this process sees a GPU, else the CPU), ``cpu``, ``cuda``.

Devices are resolved where the computation runs: an actor of the graph resolves ``parallel.device``
inside its own process, where Ray has set ``CUDA_VISIBLE_DEVICES`` to the GPUs it reserved for it
(``parallel.num_gpus_per_actor``; actors that reserve a fraction of one GPU share it).
"""

from __future__ import annotations

import os

import torch

DEVICES = ("auto", "cpu", "cuda")


def check_device_name(name: str, field: str) -> None:
    """ValueError naming ``field`` unless ``name`` is auto, cpu, cuda or cuda:N."""
    base, _, index = str(name).partition(":")
    if base not in DEVICES or (index and (base != "cuda" or not index.isdigit())):
        raise ValueError(f"{field} must be one of {', '.join(DEVICES)} (or cuda:N), got {name!r}")


def resolve_device(name: str, field: str = "parallel.device") -> torch.device:
    """The torch device ``name`` means in this process; ConfigError naming ``field`` when CUDA is asked
    for and this process sees none."""
    from raymoe.platform.config import ConfigError

    try:
        check_device_name(name, field)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"{field}={name}: this process sees no CUDA device (torch {torch.__version__}, "
            f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); "
            f"use {field}=cpu, or reserve GPUs for the actors (parallel.num_gpus_per_actor)"
        )
    return device


def host(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` in host memory (what crosses Ray's object store), or None."""
    return t.cpu() if t is not None else None
