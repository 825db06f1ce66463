"""Fused RMSNorm: ``weight * rms_norm(x.float()).to(x.dtype)`` in one pass over each row.

The same arithmetic as :class:`raymoe.platform.model.layers.RMSNorm`: statistics in float32,
the normalized row rounded to x's dtype, then multiplied by the weight in the promoted dtype of
(weight, x) (a bf16 × bf16 product is exact in float32 and rounded once, as torch does). The
torch path runs five kernels (cast, square-mean, rsqrt-scale, cast, multiply); this is one
read and one write of the row. The backward recomputes the torch expression (it is not fused).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from raymoe.kernels._common import FLOAT_DTYPES, check_same_device, check_tensor, launchable

# Rows per program: enough to give a program ~2K elements when rows are short (decode's
# 512-wide kv_a_layernorm), one row when it is long (7168). Initial choice, not tuned on a GPU.
ELEMENTS_PER_PROGRAM = 2048
MAX_ROWS_PER_PROGRAM = 16


@triton.jit
def _rmsnorm_kernel(x_ptr, w_ptr, out_ptr, n_rows, D, eps, BR: tl.constexpr, BD: tl.constexpr):
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    cols = tl.arange(0, BD)
    mask = (rows < n_rows)[:, None] & (cols < D)[None, :]
    offsets = rows.to(tl.int64)[:, None] * D + cols[None, :]
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / D + eps)  # [BR]
    normed = (x * rstd[:, None]).to(x_ptr.dtype.element_ty).to(tl.float32)  # rounded to x's dtype
    w = tl.load(w_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
    tl.store(out_ptr + offsets, (normed * w[None, :]).to(out_ptr.dtype.element_ty), mask=mask)


def _rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    check_tensor("weight", weight, ndim=1, dtypes=FLOAT_DTYPES)
    check_same_device(x=x, weight=weight)
    D = x.shape[-1]
    if weight.shape[0] != D:
        raise ValueError(f"weight must have x's last dim {D} entries, got {weight.shape[0]}")
    out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    n_rows = x.numel() // D if D else 0
    if n_rows == 0:
        return out
    block_d = triton.next_power_of_2(D)
    block_rows = max(1, min(MAX_ROWS_PER_PROGRAM, ELEMENTS_PER_PROGRAM // block_d))
    grid = (triton.cdiv(n_rows, block_rows),)
    launchable(_rmsnorm_kernel, x)[grid](x, weight, out, n_rows, D, eps, BR=block_rows, BD=block_d)
    return out


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:  # noqa: ANN001
        ctx.save_for_backward(x, weight)
        ctx.eps = eps
        return _rms_norm_forward(x, weight, eps)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        x, weight = ctx.saved_tensors
        with torch.enable_grad():
            x_, w_ = x.detach().requires_grad_(), weight.detach().requires_grad_()
            grad_x, grad_w = torch.autograd.grad(rms_norm_reference(x_, w_, ctx.eps), (x_, w_), grad)
        return grad_x, grad_w, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Triton: x [..., D] (contiguous), weight [D] -> weight * rms_norm(x.float()).to(x.dtype); differentiable."""
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _RMSNorm.apply(x, weight, eps)
    return _rms_norm_forward(x, weight, eps)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Torch reference of :func:`rms_norm` (the model's RMSNorm.forward)."""
    return weight * torch.nn.functional.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)
