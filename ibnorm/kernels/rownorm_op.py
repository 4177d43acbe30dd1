"""The Triton row-norm kernels as a torch custom op with autograd (``torch.ops.ibnorm.row_norm``).

Registered with ``torch.library`` so ``torch.compile`` treats it as one opaque op
(no graph break) and fake-tensor tracing knows its output shapes.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
from torch import Tensor

from .triton_rownorm import MAX_HIDDEN, OP_CODES, RESTANDARDIZE_FLOOR, ibnorm_row_bwd_kernel, ibnorm_row_fwd_kernel


def _block(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def _warps(block: int) -> int:
    return min(max(block // 256, 1), 16)


def _rows(x: Tensor, n: int) -> Tensor:
    x2 = x.reshape(-1, n)
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _forward(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], lam: Tensor, op: str, eps: float, centered: bool):
    n = x.shape[-1]
    x2 = _rows(x, n)
    m = x2.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    mean = torch.empty(m, dtype=torch.float32, device=x.device)
    rstd = torch.empty(m, dtype=torch.float32, device=x.device)
    block = _block(n)
    lam_c = lam.contiguous()
    ibnorm_row_fwd_kernel[(m,)](
        x2, y, weight if weight is not None else x2, bias if bias is not None else x2, lam_c, mean, rstd,
        x2.stride(0), y.stride(0), n, eps, RESTANDARDIZE_FLOOR,
        HAS_W=weight is not None, HAS_B=bias is not None, LAM_PER_CHANNEL=lam.dim() > 0,
        CENTERED=centered, OP=OP_CODES[op], BLOCK=block, num_warps=_warps(block),
    )
    return y.view(x.shape), mean, rstd


def _backward(dy: Tensor, x: Tensor, weight: Optional[Tensor], lam: Tensor, op: str, eps: float, centered: bool):
    n = x.shape[-1]
    x2, dy2 = _rows(x, n), _rows(dy, n)
    m = x2.shape[0]
    dx = torch.empty((m, n), dtype=x.dtype, device=x.device)
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 4
    programs = max(1, min(m, sms * 4))
    rows_per_program = math.ceil(m / programs)
    programs = math.ceil(m / rows_per_program)
    parts = torch.empty((3, programs, n), dtype=torch.float32, device=x.device)
    block = _block(n)
    ibnorm_row_bwd_kernel[(programs,)](
        x2, dy2, dx, weight if weight is not None else x2, lam.contiguous(), parts[0], parts[1], parts[2],
        x2.stride(0), dy2.stride(0), dx.stride(0), m, n, eps, RESTANDARDIZE_FLOOR, rows_per_program,
        HAS_W=weight is not None, LAM_PER_CHANNEL=lam.dim() > 0, CENTERED=centered, OP=OP_CODES[op],
        BLOCK=block, num_warps=_warps(block),
    )
    # Fixed-order reduction over programs: deterministic.
    dw, db, dlam = (parts[i].sum(0) for i in range(3))
    return dx.view(x.shape), dw, db, dlam


@torch.library.custom_op("ibnorm::row_norm", mutates_args=())
def row_norm_op(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], lam: Tensor, op: str, eps: float, centered: bool) -> Tensor:
    return _forward(x, weight, bias, lam, op, eps, centered)[0]


@row_norm_op.register_fake
def _(x, weight, bias, lam, op, eps, centered):
    return torch.empty_like(x)


@torch.library.custom_op("ibnorm::row_norm_backward", mutates_args=())
def row_norm_backward_op(dy: Tensor, x: Tensor, weight: Optional[Tensor], lam: Tensor, op: str, eps: float, centered: bool) -> list[Tensor]:
    return list(_backward(dy, x, weight, lam, op, eps, centered))


@row_norm_backward_op.register_fake
def _(dy, x, weight, lam, op, eps, centered):
    n = x.shape[-1]
    f32 = dict(dtype=torch.float32, device=x.device)
    return [torch.empty_like(x), x.new_empty(n, **f32), x.new_empty(n, **f32), x.new_empty(n, **f32)]


def _setup_context(ctx, inputs, output):
    x, weight, bias, lam, op, eps, centered = inputs
    ctx.save_for_backward(x, weight, lam)
    ctx.has_bias, ctx.op, ctx.eps, ctx.centered = bias is not None, op, eps, centered


def _autograd_backward(ctx, dy):
    x, weight, lam = ctx.saved_tensors
    dx, dw, db, dlam = row_norm_backward_op(dy, x, weight, lam, ctx.op, ctx.eps, ctx.centered)
    dweight = dw.to(weight.dtype).view(weight.shape) if weight is not None else None
    dbias = db.to(x.dtype if weight is None else weight.dtype) if ctx.has_bias else None
    dl = dlam.to(lam.dtype) if lam.dim() > 0 else dlam.sum().to(lam.dtype)
    return dx, dweight, dbias, dl, None, None, None


row_norm_op.register_autograd(_autograd_backward, setup_context=_setup_context)


def supported(x: Tensor) -> bool:
    return x.shape[-1] <= MAX_HIDDEN
