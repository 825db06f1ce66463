"""Which implementation runs: the Triton kernel on CUDA tensors, the torch path elsewhere.

The switch: ``RAYMOE_KERNELS=auto|triton|torch`` in the environment, overridden inside
``with use_kernels("triton" | "torch" | "auto"):``. ``auto`` (the default) runs Triton when every
tensor of the call is on CUDA and triton is installed; ``triton`` forces the kernels (on CPU
tensors they run only in Triton's interpreter, with ``TRITON_INTERPRET=1`` set before triton is
imported, and otherwise raise a RuntimeError saying so); ``torch`` forces the references.

This module does not import triton: the kernel modules are imported at the first call of a
Triton entry point below, so a process that never runs a kernel never imports triton.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch

ENV_VAR = "RAYMOE_KERNELS"
MODES = ("auto", "triton", "torch")

_forced: ContextVar[str | None] = ContextVar("raymoe_kernels", default=None)


def _validate(mode: str, where: str) -> str:
    if mode not in MODES:
        raise ValueError(f"{where} must be one of {'|'.join(MODES)}, got {mode!r}")
    return mode


def kernel_mode() -> str:
    """The switch now: the innermost :func:`use_kernels`, else ``$RAYMOE_KERNELS``, else ``auto``."""
    forced = _forced.get()
    if forced is not None:
        return forced
    return _validate(os.environ.get(ENV_VAR, "auto").strip().lower() or "auto", ENV_VAR)


@contextmanager
def use_kernels(mode: str) -> Iterator[None]:
    """Force ``"triton"`` or ``"torch"`` (or back to ``"auto"``) inside the ``with`` block (this thread/task)."""
    token = _forced.set(_validate(mode, "use_kernels(mode)"))
    try:
        yield
    finally:
        _forced.reset(token)


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def use_triton(*tensors: torch.Tensor) -> bool:
    """Whether a call on ``tensors`` runs the Triton kernel under the current switch."""
    if torch.compiler.is_compiling():  # a compiled graph takes the torch paths (inductor fuses them); no graph break
        return False
    mode = kernel_mode()
    if mode == "torch":
        return False
    if mode == "triton":
        return True
    return all(t.is_cuda for t in tensors) and triton_installed()


# -- Triton entry points (callers check use_triton first; the torch paths stay theirs) ----------


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Triton :func:`raymoe.kernels.rmsnorm.rms_norm` (x made contiguous)."""
    from raymoe.kernels.rmsnorm import rms_norm as kernel

    return kernel(x.contiguous(), weight, eps)


def moe_permute(x: torch.Tensor, idx: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton :func:`raymoe.kernels.moe_permute.moe_permute`: (x_sorted, counts, order)."""
    from raymoe.kernels.moe_permute import moe_permute as kernel

    return kernel(x.contiguous(), idx, n_experts)


def moe_unpermute(
    y_sorted: torch.Tensor, order: torch.Tensor, weights: torch.Tensor, out_dtype: torch.dtype
) -> torch.Tensor:
    """Triton :func:`raymoe.kernels.moe_permute.moe_unpermute`."""
    from raymoe.kernels.moe_permute import moe_unpermute as kernel

    return kernel(y_sorted.contiguous(), order, weights, out_dtype)


def grouped_swiglu(x_sorted: torch.Tensor, counts: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """Triton :func:`raymoe.kernels.grouped_ffn.grouped_swiglu`."""
    from raymoe.kernels.grouped_ffn import grouped_swiglu as kernel

    return kernel(x_sorted.contiguous(), counts, w13, w2)


def mla_decode(
    q_lat: torch.Tensor,
    q_pe: torch.Tensor,
    cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    softmax_scale: float,
) -> torch.Tensor:
    """Absorbed-MLA decode over a paged latent cache, dispatched: the Triton kernel or its reference.

    q_lat [B, H, C], q_pe [B, H, R], cache [num_blocks, block_size, C + R], block_table [B, max_blocks]
    int32, seq_lens [B] int32 -> [B, H, C] in q's dtype; see :mod:`raymoe.kernels.mla_decode`."""
    from raymoe.kernels.mla_decode import mla_decode as kernel
    from raymoe.kernels.mla_decode import mla_decode_reference

    fn = kernel if use_triton(q_lat, q_pe, cache) else mla_decode_reference
    return fn(q_lat, q_pe, cache, block_table, seq_lens, softmax_scale)
