"""Which device a process computes on: ``auto`` (CUDA when this process sees a GPU, else the CPU), ``cpu``, ``cuda``.

Devices are resolved where the computation runs: an actor of the graph resolves ``parallel.device``
inside its own process, where Ray has set ``CUDA_VISIBLE_DEVICES`` to the GPUs it reserved for it
(``parallel.num_gpus_per_actor``; actors that reserve a fraction of one GPU share it).
"""

from __future__ import annotations

import os
import sys

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


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD_ENV = "RAYMOE_MALLOC_MMAP_THRESHOLD"
DEFAULT_MMAP_THRESHOLD = 0  # opt-in: faster large casts for more resident memory (measured below)


def tune_host_allocator() -> int:
    """With ``$RAYMOE_MALLOC_MMAP_THRESHOLD`` bytes set, keep host allocations up to that size in glibc's heap
    instead of a fresh ``mmap`` each (once per process; returns the threshold in force, 0 when untouched).

    By default glibc gives a large allocation its own mapping and unmaps it on free, so every
    step's bf16 weight copies, logits and their gradients are page-faulted in again. Measured with
    ``raymoe bench model --impls ours,grouped_mm --dtypes bf16`` (Xeon with AMX, 2 cores,
    2026-12-02, two runs each, both implementations under the same setting): with 1 GiB (1073741824)
    our bf16 step ran 2,241 and 2,244 tok/s against 2,027 and 2,070 without, at a peak of 2,738
    and 2,801 MiB against 2,632 and 2,608, above transformers' (2,623 and 2,671). So it is off
    unless asked for. Not glibc (musl, macOS): nothing is done."""
    global _tuned
    if _tuned is not None:
        return _tuned
    _tuned = 0
    try:
        threshold = int(os.environ.get(MMAP_THRESHOLD_ENV, DEFAULT_MMAP_THRESHOLD))
    except ValueError:
        raise ValueError(f"${MMAP_THRESHOLD_ENV} must be a number of bytes, got "
                         f"{os.environ[MMAP_THRESHOLD_ENV]!r}") from None  # fmt: skip
    if threshold >= 2**31:
        raise ValueError(f"${MMAP_THRESHOLD_ENV} must be below 2 GiB (a C int), got {threshold}")
    if threshold <= 0 or not sys.platform.startswith("linux"):
        return _tuned
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return _tuned
    # freed memory at the heap's top stays (up to twice the threshold) instead of going back at every free
    trim = min(2 * threshold, 2**31 - 1)  # mallopt takes a C int
    if libc.mallopt(_M_MMAP_THRESHOLD, threshold) and libc.mallopt(_M_TRIM_THRESHOLD, trim):
        _tuned = threshold
    return _tuned


_tuned: int | None = None
