"""Which device a process computes on: ``auto`` (CUDA when this process sees a GPU, else the CPU), ``cpu``, ``cuda``.

Devices are resolved where the computation runs: an actor of the graph resolves ``parallel.device``
inside its own process, where Ray has set ``CUDA_VISIBLE_DEVICES`` to the GPUs it reserved for it
(``parallel.num_gpus_per_actor``; actors that reserve a fraction of one GPU share it).
"""

from __future__ import annotations

import logging
import os
import sys

import torch

from raymoe.platform.config import TRAIN_DTYPES

DEVICES = ("auto", "cpu", "cuda")

logger = logging.getLogger(__name__)


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


def bf16_matmul_is_fast(device: torch.device | str) -> bool:
    """Whether bf16 matrix products on ``device`` run on kernels made for them.

    CUDA: the GPU supports bf16 (Ampere and later). CPU: oneDNN takes them
    (``torch.ops.mkldnn._is_mkldnn_bf16_supported``: AVX512 or AMX on x86, bf16 on Arm); without it torch falls
    back to a scalar kernel. On a 2-core AMD EPYC with AVX2 alone (2026-12-04) a 2048×256×704 product ran at
    0.003 TFLOP/s in bf16 against 0.18 in float32, sixty times slower; with AVX512-BF16 (2026-12-04) bf16 ran at
    0.38-0.43 against 0.18."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return True
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False


def train_dtype(name: str, device: torch.device | str) -> str:
    """``fp32`` or ``bf16``: what ``train.dtype=name`` computes in on ``device``.

    ``auto`` is bf16 mixed precision where bf16 products are fast (:func:`bf16_matmul_is_fast`), else float32.
    It is resolved where the computation runs, like ``parallel.device``: an actor on a GPU node trains in bf16
    while a driver on a CPU-only head would have chosen float32. An explicit ``bf16`` is kept where it is slow,
    with one warning in each process that names the device and the way out."""
    if name not in TRAIN_DTYPES:
        raise ValueError(f"train.dtype must be one of {', '.join(TRAIN_DTYPES)}, got {name!r}")
    device = torch.device(device)
    key = (name, device.type)
    if key not in _resolved:
        fast = bf16_matmul_is_fast(device)
        _resolved[key] = name if name != "auto" else ("bf16" if fast else "fp32")
        if name == "bf16" and not fast:
            logger.warning(
                "train.dtype=bf16 on %s: %s, so each bf16 matrix product runs in torch's fallback "
                "kernel, tens of times slower than float32; use train.dtype=auto (float32 here) or fp32",
                device.type, _slow_bf16_reason(device),
            )  # fmt: skip
    return _resolved[key]


SERVE_DTYPES = ("auto", "bfloat16", "float32")


def serve_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """The dtype of the served weights and cache for ``dtype=name`` on ``device``.

    ``auto`` is bfloat16 where bf16 products are fast (:func:`bf16_matmul_is_fast`), else float32: on a 2-core
    AVX2 EPYC (2026-12-04) ``raymoe generate`` decoded 135 tokens/s in float32 against 42 in bfloat16;
    float32 holds twice the weight memory. A CUDA device this process does not see (the graph's actors reserve
    GPUs the replica lacks) counts as fast: every GPU the platform targets (Ampere and later) has bf16 tensor
    cores."""
    if name not in SERVE_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(SERVE_DTYPES)}, got {name!r}")
    if name != "auto":
        return getattr(torch, name)
    device = torch.device(device)
    fast = True if device.type == "cuda" and not torch.cuda.is_available() else bf16_matmul_is_fast(device)
    return torch.bfloat16 if fast else torch.float32


def _slow_bf16_reason(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} does not support bf16"
    return f"this CPU ({torch.backends.cpu.get_cpu_capability()}) has no oneDNN bf16 matmul (it needs AVX512 or AMX)"


_resolved: dict[tuple[str, str], str] = {}


def host(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` in host memory (what crosses Ray's object store), or None."""
    return t.cpu() if t is not None else None


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD_ENV = "RAYMOE_MALLOC_MMAP_THRESHOLD"
DEFAULT_MMAP_THRESHOLD = 256 * 2**20  # allocations below this come from the heap (measured below)


def tune_host_allocator() -> int:
    """Keep host allocations up to ``$RAYMOE_MALLOC_MMAP_THRESHOLD`` bytes (default 256 MiB; 0: glibc's own
    thresholds) in glibc's heap instead of a fresh ``mmap`` each (once per process; returns the threshold in
    force, 0 when untouched).

    By default glibc gives an allocation above 32 MiB (less before its threshold adapts) its own mapping
    and unmaps it on free, so every step's bf16 weight copies and float32 weight gradients are
    page-faulted in again: on a 2-core Xeon with AMX (2026-12-02) a 32 MiB bf16 -> float32 cast took
    7.0 ms into fresh pages against 1.0 ms into reused ones, and a bench-preset bf16 step took 41-92 k
    minor faults. Measured on the bench preset's bf16 LocalTrainer step (median of 8, same machine and day, two
    processes each, after the fused loss and attention of issue 18): 0.806 / 0.873 s a step with glibc's
    thresholds, 0.758 / 0.742 s with 256 MiB (faults: 1 a step), 0.748 / 0.738 s with 1 GiB, peaks
    2,522 / 2,666, 2,620 / 2,477 and 2,515 / 2,510 MiB. Before the fused loss freed the whole-logits
    buffers the same setting cost 100-200 MiB of peak; now the peaks overlap, so it is on by default.
    Not glibc (musl, macOS): nothing is done."""
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
