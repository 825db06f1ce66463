"""Triton kernels beside their torch references, and the dispatch that picks one.

One file per op, each with its ``@triton.jit`` kernel(s), a launcher that checks its arguments
and the plain-torch reference: :mod:`~raymoe.kernels.moe_permute` (token rows sorted by expert and
back), :mod:`~raymoe.kernels.grouped_ffn` (SwiGLU over all experts' groups, forward and backward),
:mod:`~raymoe.kernels.mla_decode` (absorbed-MLA decode over a paged latent cache),
:mod:`~raymoe.kernels.fp8` (DeepSeek-V3's FP8 block quantization and GEMM) and
:mod:`~raymoe.kernels.rmsnorm`. :mod:`~raymoe.kernels.dispatch` chooses between kernel and torch
(``RAYMOE_KERNELS=auto|triton|torch``, :func:`use_kernels`).

Importing this package or the dispatch does not import triton (the kernel modules do, when first
used). The serving engine's decode attention: ``from raymoe.kernels.dispatch import mla_decode``
(kernel on CUDA, reference elsewhere), or the two directly from ``raymoe.kernels.mla_decode``.
(Not re-exported here: importing the submodule ``raymoe.kernels.mla_decode`` rebinds that name on
the package.) Nothing here imports raymoe.platform, actors or pipelines.
"""

from raymoe.kernels.dispatch import ENV_VAR, MODES, kernel_mode, use_kernels, use_triton

__all__ = ["ENV_VAR", "MODES", "kernel_mode", "use_kernels", "use_triton"]
