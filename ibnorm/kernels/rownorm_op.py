"""The Triton row-norm kernels as torch custom ops with autograd.

``torch.ops.ibnorm.row_norm_fwd`` returns y and the per-row statistics the backward reuses;
``row_norm_op`` is the differentiable entry point.  Registered with ``torch.library`` so
``torch.compile`` treats each kernel as one opaque op (no graph break) and fake-tensor tracing
knows the output shapes.  The backward computes only the gradients autograd asks for.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
from torch import Tensor

from .triton_rownorm import (
    MAX_HIDDEN,
    N_STATS,
    OP_CODES,
    RESTANDARDIZE_FLOOR,
    ibnorm_row_bwd_halves_kernel,
    ibnorm_row_bwd_kernel,
    ibnorm_row_fwd_kernel,
)


def _block(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def forward_warps(block: int, centered: bool) -> int:
    """Warps per row program in the forward (from benchmarks/kernel_static.py on sm_90): 32
    elements per thread amortise the row reductions while registers still allow ≥ 16 warps per SM."""
    return min(max(block // 1024, 1), 32)


def backward_config(block: int, n_grads: int) -> tuple[int, bool, bool]:
    """(warps, RELOAD, HALVES) of the persistent backward, chosen with benchmarks/kernel_static.py on sm_90.

    Up to 8192 columns the row's values stay in registers (16 per thread).  Wider rows re-read x
    and dy after the row reduction (only the accumulators stay live) and are strip-mined in two
    halves (``ibnorm_row_bwd_halves_kernel``) so the temporaries of 32 elements per thread are
    never live at once.
    """
    if block <= 4096:
        return max(block // 512, 1), False, False
    if block <= 8192:
        return 16, False, False
    return (16 if block <= 16384 else 32), True, True


def _rows(x: Tensor, n: int) -> Tensor:
    x2 = x.reshape(-1, n)
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _programs(x: Tensor, m: int) -> int:
    # One persistent program per SM: the partial buffer stays small (programs × N fp32 per gradient).
    sms = _sm_count(x.device.index if x.device.index is not None else torch.cuda.current_device()) if x.is_cuda else 4
    return max(1, min(m, sms))


def _forward(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], lam: Tensor, op: str, eps: float,
             centered: bool) -> tuple[Tensor, Tensor]:
    n = x.shape[-1]
    x2 = _rows(x, n)
    m = x2.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    stats = torch.empty((m, N_STATS), dtype=torch.float32, device=x.device)
    if m == 0:
        return y.view(x.shape), stats
    block = _block(n)
    ibnorm_row_fwd_kernel[(m,)](
        x2, y, weight if weight is not None else x2, bias if bias is not None else x2, lam.contiguous(), stats,
        x2.stride(0), y.stride(0), eps, RESTANDARDIZE_FLOOR, N=n,
        HAS_W=weight is not None, HAS_B=bias is not None, LAM_PER_CHANNEL=lam.dim() > 0,
        CENTERED=centered, OP=OP_CODES[op], BLOCK=block, num_warps=forward_warps(block, centered),
    )
    return y.view(x.shape), stats


def _backward(dy: Tensor, x: Tensor, weight: Optional[Tensor], lam: Tensor, stats: Tensor, op: str, centered: bool,
              needs: list[bool]) -> list[Tensor]:
    """``needs`` = [dx, dγ, dβ, dλ]; gradients not needed come back as empty tensors."""
    n = x.shape[-1]
    x2, dy2 = _rows(x, n), _rows(dy, n)
    m = x2.shape[0]
    need_dx, need_dw, need_db, need_dl = (bool(v) for v in needs)
    need_dw = need_dw and weight is not None
    dx = torch.empty((m, n) if need_dx else (0,), dtype=x.dtype, device=x.device)
    k = need_dw + need_db + need_dl
    programs = _programs(x2, m)
    parts = torch.zeros((programs, max(k, 1), n), dtype=torch.float32, device=x.device)
    if m > 0 and (need_dx or k):
        block = _block(n)
        warps, reload, halves = backward_config(block, k)
        kernel, extra = (ibnorm_row_bwd_halves_kernel, {}) if halves else (ibnorm_row_bwd_kernel, {"RELOAD": reload})
        kernel[(programs,)](
            x2, dy2, dx, weight if weight is not None else x2, lam.contiguous(), stats, parts,
            x2.stride(0), dy2.stride(0), dx.stride(0) if need_dx else 0, m, RESTANDARDIZE_FLOOR, N=n,
            HAS_W=weight is not None, LAM_PER_CHANNEL=lam.dim() > 0, CENTERED=centered, OP=OP_CODES[op],
            NEED_DX=need_dx, NEED_DW=need_dw, NEED_DB=need_db, NEED_DLAM=need_dl,
            BLOCK=block, num_warps=warps, **extra,
        )
    # Fixed-order reduction over programs: deterministic.  Separate tensors (custom-op outputs may not alias).
    out, i = [dx.view(x.shape) if need_dx else dx], 0
    for flag in (need_dw, need_db, need_dl):
        out.append(parts[:, i].sum(0) if flag else x.new_empty(0, dtype=torch.float32))
        i += int(flag)
    return out


@torch.library.custom_op("ibnorm::row_norm_fwd", mutates_args=())
def row_norm_fwd_op(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], lam: Tensor, op: str, eps: float,
                    centered: bool) -> tuple[Tensor, Tensor]:
    y, stats = _forward(x, weight, bias, lam, op, eps, centered)
    return y, stats


@row_norm_fwd_op.register_fake
def _(x, weight, bias, lam, op, eps, centered):
    m = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return torch.empty_like(x), x.new_empty((m, N_STATS), dtype=torch.float32)


@torch.library.custom_op("ibnorm::row_norm_bwd", mutates_args=())
def row_norm_bwd_op(dy: Tensor, x: Tensor, weight: Optional[Tensor], lam: Tensor, stats: Tensor, op: str,
                    centered: bool, needs: list[bool]) -> list[Tensor]:
    return _backward(dy, x, weight, lam, stats, op, centered, needs)


@row_norm_bwd_op.register_fake
def _(dy, x, weight, lam, stats, op, centered, needs):
    n = x.shape[-1]
    f32 = dict(dtype=torch.float32)
    dx = torch.empty_like(x) if needs[0] else x.new_empty(0)
    has = [needs[1] and weight is not None, needs[2], needs[3]]
    return [dx] + [x.new_empty(n if flag else 0, **f32) for flag in has]


def _setup_context(ctx, inputs, output):
    x, weight, bias, lam, op, eps, centered = inputs
    ctx.save_for_backward(x, weight, lam, output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.has_bias, ctx.op, ctx.centered = bias is not None, op, centered


def _autograd_backward(ctx, dy, _dstats):
    x, weight, lam, stats = ctx.saved_tensors
    nx, nw, nb, nl = ctx.needs_input_grad[:4]
    dx, dw, db, dlam = row_norm_bwd_op(dy, x, weight, lam, stats, ctx.op, ctx.centered,
                                       [nx, nw, nb and ctx.has_bias, nl])
    dweight = dw.to(weight.dtype).view(weight.shape) if nw and weight is not None else None
    dbias = db.to(x.dtype if weight is None else weight.dtype) if nb and ctx.has_bias else None
    dl = None
    if nl:
        dl = dlam.to(lam.dtype) if lam.dim() > 0 else dlam.sum().to(lam.dtype)
    return dx if nx else None, dweight, dbias, dl, None, None, None


row_norm_fwd_op.register_autograd(_autograd_backward, setup_context=_setup_context)


def row_norm_op(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], lam: Tensor, op: str, eps: float,
                centered: bool) -> Tensor:
    """Differentiable fused row norm (the straight-through max(λ, 0) is applied in the kernels)."""
    return row_norm_fwd_op(x, weight, bias, lam, op, eps, centered)[0]


def supported(x: Tensor) -> bool:
    return x.shape[-1] <= MAX_HIDDEN
