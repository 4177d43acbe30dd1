"""The Triton row-norm kernels as torch custom ops with autograd.

``torch.ops.ibnorm.row_norm_fwd`` returns y and the per-row statistics the backward reuses;
``row_norm_op`` is the differentiable entry point.  Registered with ``torch.library`` so
``torch.compile`` treats each kernel as one opaque op (no graph break) and fake-tensor tracing
knows the output shapes.  The backward computes only the gradients autograd asks for.
"""

from __future__ import annotations

import dataclasses
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
    ibnorm_row_bwd_kernel,
    ibnorm_row_fwd_kernel,
    ibnorm_row_sums_kernel,
    ibnorm_row_tiles_bwd_kernel,
)


def _block(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


@dataclasses.dataclass(frozen=True)
class BackwardConfig:
    """Launch shape of the backward (chosen with benchmarks/kernel_static.py on sm_90 and
    benchmarks/gpu_diagnose.py on a GPU).  One-block persistent kernel: warps per program,
    software-pipelining stages of the row loop, persistent programs per SM, PREFETCH.  SPLIT: the
    two-pass backward instead (row sums, then column tiles); ``warps`` is the sums pass's."""

    warps: int
    split: bool
    stages: int = 3  # Triton's default for a launch
    programs_per_sm: int = 1
    prefetch: bool = False  # only the one-block kernel has it
    chunk: int = 512  # SPLIT: columns per step of the sums pass
    tile: int = 1024  # SPLIT: columns per program of the tiles pass
    tile_warps: int = 4
    tiles_per_sm: int = 4  # SPLIT: tile programs per SM (sets rows per program)


def forward_warps(block: int, centered: bool) -> int:
    """Warps per row program in the forward: 32 elements per thread amortise the row reductions
    while registers still allow ≥ 16 warps per SM (benchmarks/kernel_static.py on sm_90); on an
    H200 the centred kernel at 8192 columns was faster with 16 per thread (4 warps: 65 vs 71 µs)."""
    if centered and block == 8192:
        return 4
    return min(max(block // 1024, 1), 32)


def backward_config(block: int, centered: bool, need_dlam: bool, op: str = "tanh", itemsize: int = 2) -> BackwardConfig:
    """Up to 8192 columns (4096 when dλ is wanted) the one-block kernel keeps a row's values in
    registers.  Wider rows, and 8192 with dλ, take the SPLIT backward: accumulators for
    the whole width (dγ, dβ, dλ: K × H fp32 per program) cannot stay in registers past that (at
    16384, K = 3 is 192 KB of a 256 KB register file), so the row sums and the per-column work are
    two passes; the second reads x and dy again (10 instead of 6 bytes per bf16 element, a 60%
    ceiling) but never spills (benchmarks/results/kernel_static.md).  The split shapes (2-warp
    sums over 512-column chunks, 1024-column tiles on 4 warps, 4 tile programs per SM) are the
    static model's choice; not yet timed on a GPU (benchmarks/gpu_diagnose.py sweeps them).

    Measured on an H200 (benchmarks/results/gpu_h200/diagnose_sweep.md, GPU time by CUDA-graph
    replay, 4096 rows, bf16): a one-block program walks its rows one after another, so with one
    program per SM the SM idles while a row's loads are in flight.  Two co-resident programs per SM
    (4096 columns, rms 81 → 53 µs, layer 89 → 62 µs) or loading the next row early (PREFETCH: rms
    8192 columns 101 → 92 µs, with 2 per SM at 4096 → 48 µs) hide part of it.  Registers decide the
    rest: a second program fits only without dλ, PREFETCH only in the rms kernel (the layer kernel
    spills), and not for power or 4-byte inputs (16 B spills, kernel_static.py).  The strip-mined one-program kernel
    this split replaces took 231 µs (rms) and 326 µs (layer) at 16384 columns.
    """
    prefetch = not centered and not need_dlam and op != "power" and itemsize <= 2
    if block < 4096:
        return BackwardConfig(max(block // 512, 1), False)
    if block == 4096:
        if need_dlam:
            return BackwardConfig(8, False)
        return BackwardConfig(4 if centered or prefetch else 8, False, programs_per_sm=2, prefetch=prefetch)
    if block == 8192 and not need_dlam:
        return BackwardConfig(8 if prefetch else 16, False, prefetch=prefetch)
    return BackwardConfig(2, True)


def _rows(x: Tensor, n: int) -> Tensor:
    x2 = x.reshape(-1, n)
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _sms(x: Tensor) -> int:
    """SMs of x's GPU (4 off CUDA, where the interpreter runs the kernels)."""
    if not x.is_cuda:
        return 4
    return _sm_count(x.device.index if x.device.index is not None else torch.cuda.current_device())


def _programs(x: Tensor, m: int, per_sm: int) -> int:
    # A few persistent programs per SM: the partial buffer stays small (programs × N fp32 per gradient).
    return max(1, min(m, _sms(x) * per_sm))


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


def split_grid(m: int, n: int, tile: int, tiles_per_sm: int, sms: int) -> tuple[int, int, int]:
    """(column tiles, rows per tile program, row blocks) of the split backward's second pass over
    m rows: about ``tiles_per_sm`` tile programs per SM, every row block non-empty."""
    tiles = triton.cdiv(n, tile)
    if m == 0:
        return tiles, 1, 1
    rows = triton.cdiv(m, max(1, min(m, sms * tiles_per_sm) // tiles))
    return tiles, rows, triton.cdiv(m, rows)


def _backward(dy: Tensor, x: Tensor, weight: Optional[Tensor], lam: Tensor, stats: Tensor, op: str, centered: bool,
              needs: list[bool]) -> list[Optional[Tensor]]:
    """``needs`` = [dx, dγ, dβ, dλ]; gradients not needed come back as None.  dγ, dβ, dλ are fp32
    rows of one tensor (views)."""
    n = x.shape[-1]
    x2, dy2 = _rows(x, n), _rows(dy, n)
    m = x2.shape[0]
    need_dx, need_dw, need_db, need_dl = (bool(v) for v in needs)
    need_dw = need_dw and weight is not None
    dx = torch.empty((m, n), dtype=x.dtype, device=x.device) if need_dx else None
    k = need_dw + need_db + need_dl
    block = _block(n)
    cfg = backward_config(block, centered, need_dl, op, x.element_size())
    flags = dict(N=n, HAS_W=weight is not None, LAM_PER_CHANNEL=lam.dim() > 0, CENTERED=centered, OP=OP_CODES[op])
    needs = dict(NEED_DX=need_dx, NEED_DW=need_dw, NEED_DB=need_db, NEED_DLAM=need_dl)
    w, lam = weight if weight is not None else x2, lam.contiguous()
    args = (x2, dy2, dx if need_dx else x2, w, lam)
    strides = (x2.stride(0), dy2.stride(0), dx.stride(0) if need_dx else 0)
    tile = min(cfg.tile, block)
    tiles, rows_per_program, programs = (split_grid(m, n, tile, cfg.tiles_per_sm, _sms(x2)) if cfg.split
                                         else (0, 0, _programs(x2, m, cfg.programs_per_sm)))
    # Every program writes its whole slab (zeros when it has no rows), so only an empty batch needs zeros.
    parts = (torch.empty if m > 0 else torch.zeros)((programs, max(k, 1), n), dtype=torch.float32, device=x.device)
    if m > 0 and (need_dx or k) and cfg.split:
        coef = torch.empty((m, 8), dtype=torch.float32, device=x.device)
        ibnorm_row_sums_kernel[(m,)](x2, dy2, w, lam, stats, coef, strides[0], strides[1], RESTANDARDIZE_FLOOR,
                                     CHUNK=min(cfg.chunk, block), num_warps=cfg.warps, **flags)
        ibnorm_row_tiles_bwd_kernel[(tiles, programs)](
            *args, coef, parts, *strides, m, rows_per_program, TILE=tile, num_warps=cfg.tile_warps,
            num_stages=cfg.stages, **flags, **needs)
    elif m > 0 and (need_dx or k):
        ibnorm_row_bwd_kernel[(programs,)](
            *args, stats, parts, *strides, m, RESTANDARDIZE_FLOOR, BLOCK=block, PREFETCH=cfg.prefetch,
            num_warps=cfg.warps, num_stages=cfg.stages, **flags, **needs)
    sums = parts.sum(0) if k else None  # one fixed-order reduction over programs: deterministic
    out, i = [dx.view(x.shape) if need_dx else None], 0
    for flag in (need_dw, need_db, need_dl):
        out.append(sums[i] if flag else None)
        i += int(flag)
    return out


def _input_grads(grads: list[Optional[Tensor]], x: Tensor, weight: Optional[Tensor], lam: Tensor) -> tuple:
    """The kernel's (dx, dγ, dβ, dλ) in the inputs' dtypes and shapes (a scalar λ sums its row)."""
    dx, dw, db, dl = grads
    dweight = dw.to(weight.dtype).view(weight.shape) if dw is not None else None
    dbias = db.to(x.dtype if weight is None else weight.dtype) if db is not None else None
    if dl is not None:
        dl = dl.to(lam.dtype) if lam.dim() > 0 else dl.sum().to(lam.dtype)
    return dx, dweight, dbias, dl, None, None, None


class _RowNormFunction(torch.autograd.Function):
    """The eager path: a plain autograd.Function around the launches.  A ``torch.library`` custom
    op costs tens of µs of host time per call in eager mode (measured on an H200: backward 215 µs
    of CPU per call through it), more than the kernels themselves at LLM sizes; compiled graphs
    use the custom ops below instead."""

    @staticmethod
    def forward(ctx, x, weight, bias, lam, op, eps, centered):
        y, stats = _forward(x, weight, bias, lam, op, eps, centered)
        ctx.save_for_backward(x, weight, lam, stats)
        ctx.has_bias, ctx.op, ctx.centered = bias is not None, op, centered
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, weight, lam, stats = ctx.saved_tensors
        nx, nw, nb, nl = ctx.needs_input_grad[:4]
        grads = _backward(dy, x, weight, lam, stats, ctx.op, ctx.centered, [nx, nw, nb and ctx.has_bias, nl])
        return _input_grads(grads, x, weight, lam)


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
    # Custom-op outputs may not alias each other: the gradient rows of one tensor are copied, and
    # each gradient not wanted is an empty tensor of its own.
    grads = _backward(dy, x, weight, lam, stats, op, centered, needs)
    return [x.new_empty(0, dtype=torch.float32) if g is None else (g if i == 0 else g.clone()) for i, g in enumerate(grads)]


@row_norm_bwd_op.register_fake
def _(dy, x, weight, lam, stats, op, centered, needs):
    n = x.shape[-1]
    f32 = dict(dtype=torch.float32)
    dx = torch.empty_like(x) if needs[0] else x.new_empty(0, **f32)
    has = [needs[1] and weight is not None, needs[2], needs[3]]
    return [dx] + [x.new_empty(n if flag else 0, **f32) for flag in has]


def _setup_context(ctx, inputs, output):
    x, weight, bias, lam, op, eps, centered = inputs
    ctx.save_for_backward(x, weight, lam, output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.has_bias, ctx.op, ctx.centered = bias is not None, op, centered


def _autograd_backward(ctx, dy, _dstats):
    x, weight, lam, stats = ctx.saved_tensors
    needs = [ctx.needs_input_grad[0], ctx.needs_input_grad[1] and weight is not None,
             ctx.needs_input_grad[2] and ctx.has_bias, ctx.needs_input_grad[3]]
    grads = row_norm_bwd_op(dy, x, weight, lam, stats, ctx.op, ctx.centered, needs)
    return _input_grads([g if need else None for g, need in zip(grads, needs)], x, weight, lam)


row_norm_fwd_op.register_autograd(_autograd_backward, setup_context=_setup_context)


def row_norm_op(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], lam: Tensor, op: str, eps: float,
                centered: bool) -> Tensor:
    """Differentiable fused row norm (the straight-through max(λ, 0) is applied in the kernels)."""
    if torch.compiler.is_compiling():
        return row_norm_fwd_op(x, weight, bias, lam, op, eps, centered)[0]
    if not torch.is_grad_enabled():
        return _forward(x, weight, bias, lam, op, eps, centered)[0]
    return _RowNormFunction.apply(x, weight, bias, lam, op, eps, centered)


def supported(x: Tensor) -> bool:
    return x.shape[-1] <= MAX_HIDDEN
