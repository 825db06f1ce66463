"""What every launcher shares: argument checks that name the argument, and the check that a
kernel can run where its tensors are (compiled on CUDA, Triton's interpreter on the CPU).

Triton 3.9 reads ``TRITON_INTERPRET`` when ``@triton.jit`` runs (``triton/runtime/jit.py``), and
``triton.language``'s own helpers (``tl.zeros``, ``tl.max``, ``tl.sigmoid`` ...) are ``@jit``
functions decorated when ``triton`` is imported: so the flag must be set before the first
``import triton`` of the process; setting it later leaves compiled-only kernels ("Cannot call
@triton.jit'd outside of the scope of a kernel"). :func:`launchable` says so instead.
"""

from __future__ import annotations

import torch
import triton


def interpreting() -> bool:
    """Whether kernels run in Triton's interpreter: ``TRITON_INTERPRET=1`` was set when triton was imported."""
    return type(triton.language.zeros).__name__ == "InterpretedFunction"


def launchable(kernel, *tensors: torch.Tensor):  # noqa: ANN001, ANN201
    """``kernel``, after checking it can run on ``tensors``' device.

    Raises RuntimeError for CPU tensors unless triton was imported under ``TRITON_INTERPRET=1``
    (Triton has no CPU backend)."""
    devices = {t.device.type for t in tensors}
    if devices != {"cuda"} and not interpreting():
        late = " (it is set now, but was not when triton was imported)" if triton.knobs.runtime.interpret else ""
        raise RuntimeError(
            f"Triton kernel {kernel.__name__} got tensors on {sorted(devices)}: Triton compiles for CUDA only. "
            f"To interpret it on the CPU (tests), set TRITON_INTERPRET=1 before the first `import triton`{late}; "
            "or run the torch reference (RAYMOE_KERNELS=torch or use_kernels('torch'))"
        )
    return kernel


def upcast_bf16(*tensors: torch.Tensor) -> bool:
    """Whether kernels must convert bf16 tiles to float32 after loading: the interpreter's bf16
    arithmetic and ``tl.dot`` are wrong in Triton 3.9 (a 128³ bf16 product was off by 1.7e11)."""
    return interpreting() and any(t.dtype == torch.bfloat16 for t in tensors)


def dot_precision(*tensors: torch.Tensor) -> str:
    """``tl.dot``'s ``input_precision`` for float32 operands, as torch runs its own float32 matmuls:
    ``torch.get_float32_matmul_precision()`` "highest" (torch's default) gives "ieee", float32 products
    as exact as the torch paths'; "high" or "medium" allow TF32 ("tf32"). Triton's own default is TF32,
    whose 10-bit mantissa put float32 kernel outputs 1e-3 from torch's on an H200 (2026-12-04). Other
    dtypes run on the tensor cores whatever this says."""
    if any(t.dtype == torch.float32 for t in tensors) and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def check_tensor(
    name: str,
    t: object,
    *,
    ndim: int | None = None,
    dtypes: tuple[torch.dtype, ...] | None = None,
    contiguous: bool = True,
) -> torch.Tensor:
    """Raise ValueError naming ``name`` unless ``t`` is a tensor of that rank, dtype and layout."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise ValueError(f"{name} must be one of {[str(d) for d in dtypes]}, got {t.dtype}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (call .contiguous()), got strides {t.stride()}")
    return t


def check_same_device(**tensors: torch.Tensor) -> None:
    """Raise ValueError unless all tensors are on one device, naming them."""
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        raise ValueError(f"tensors must be on one device, got {devices}")


FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
