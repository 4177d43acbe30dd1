"""Fused Triton kernels for row-wise IBNorm (rms and layer groupings), forward and backward.

Forward: one program per row; the row stays on chip, both statistics passes run there,
and only the row's mean and rstd (fp32) are saved.  Backward: each program walks a
contiguous range of rows, recomputes z, the compression and its derivatives from x,
writes dx, and keeps fp32 partial sums of dγ, dβ and dλ in registers; the partials are
summed afterwards in a fixed order (deterministic, no atomics).

The math is ``ibnorm.functional.ib_row_norm``'s (docs/math.md); this file knows nothing of models.
"""

from __future__ import annotations

import triton
import triton.language as tl

OP_CODES = {"tanh": 0, "log": 1, "power": 2}
MAX_HIDDEN = 65536
RESTANDARDIZE_FLOOR = 1e-12


@triton.jit
def _expm1(x):
    # Kahan's trick: accurate for small |x| without a libdevice call.
    w = tl.exp(x)
    safe = tl.where(w == 1.0, 1.0, tl.log(w))
    return tl.where(w == 1.0, x, (w - 1.0) * x / safe)


@triton.jit
def _log1p(x):
    w = 1.0 + x
    safe = tl.where(w == 1.0, 1.0, w - 1.0)
    return tl.where(w == 1.0, x, tl.log(w) * x / safe)


@triton.jit
def _compress(z, lam, OP: tl.constexpr):
    """Returns c = s_λ(z), ∂s/∂z and ∂s/∂λ, elementwise, with the λ = 0 limit taken explicitly."""
    a = tl.abs(z)
    sg = tl.where(z < 0, -1.0, 1.0)
    is_zero = lam == 0.0
    lam_s = tl.where(is_zero, 1.0, lam)
    if OP == 0:  # tanh(λz)/λ = z·F(u), u = λ|z|, F(u) = tanh(u)/u
        u = lam_s * a
        u2 = u * u
        small = u < 0.1
        e = _expm1(2.0 * tl.where(small, 1.0, u))
        t_big = e / (e + 2.0)
        F_big = t_big / tl.where(small, 1.0, u)
        F_small = 1.0 + u2 * (-1.0 / 3.0 + u2 * (2.0 / 15.0 + u2 * (-17.0 / 315.0 + u2 * (62.0 / 2835.0))))
        F = tl.where(small, F_small, F_big)
        t = u * F
        dF_small = u * (-2.0 / 3.0 + u2 * (8.0 / 15.0 + u2 * (-102.0 / 315.0 + u2 * (496.0 / 2835.0))))
        dF_big = (u * (1.0 - t * t) - t) / tl.where(small, 1.0, u2)
        dF = tl.where(small, dF_small, dF_big)
        c = z * F
        dc_dz = 1.0 - t * t
        dc_dlam = z * a * dF
        dlam0 = 0.0 * z
    elif OP == 1:  # sign(z)·log(1+λ|z|)/λ = z·F(u), F(u) = log1p(u)/u
        u = lam_s * a
        small = u < 0.05
        us = tl.where(small, 1.0, u)
        F_big = _log1p(us) / us
        F_small = 1.0 + u * (-0.5 + u * (1.0 / 3.0 + u * (-0.25 + u * (0.2 + u * (-1.0 / 6.0)))))
        F = tl.where(small, F_small, F_big)
        dF_big = (us / (1.0 + us) - _log1p(us)) / (us * us)
        dF_small = -0.5 + u * (2.0 / 3.0 + u * (-0.75 + u * (0.8 + u * (-5.0 / 6.0 + u * (6.0 / 7.0)))))
        dF = tl.where(small, dF_small, dF_big)
        c = z * F
        dc_dz = 1.0 / (1.0 + u)
        dc_dlam = z * a * dF
        dlam0 = -0.5 * z * a
    else:  # sign(z)·((1+|z|)^p − 1)/p, p = 1/(1+λ)
        p = 1.0 / (1.0 + lam_s)
        L = _log1p(a)
        small = a < 1e-4
        em = _expm1(p * L)
        F_big = em / (p * tl.where(small, 1.0, a))
        F_small = 1.0 + (p - 1.0) * a / 2.0 + (p - 1.0) * (p - 2.0) * a * a / 6.0
        F = tl.where(small, F_small, F_big)
        c = z * F
        dc_dz = tl.exp((p - 1.0) * L)
        dc_dlam = -sg * ((em + 1.0) * L * p - em)
        dlam0 = -sg * ((1.0 + a) * L - a)
    c = tl.where(is_zero, z, c)
    dc_dz = tl.where(is_zero, 1.0, dc_dz)
    dc_dlam = tl.where(is_zero, dlam0, dc_dlam)
    return c, dc_dz, dc_dlam


@triton.jit
def _row_forward_math(x, lam, mask, N, eps, delta, CENTERED: tl.constexpr, OP: tl.constexpr):
    if CENTERED:
        mean = tl.sum(x, axis=0) / N
        d = tl.where(mask, x - mean, 0.0)
    else:
        mean = 0.0
        d = x
    rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=0) / N + eps)
    z = d * rstd
    c, dc_dz, dc_dlam = _compress(z, lam, OP)
    c = tl.where(mask, c, 0.0)
    if CENTERED:
        a = tl.sum(c - z, axis=0) / N
        cbar = tl.sum(c, axis=0) / N
        zbar = tl.sum(z, axis=0) / N
        cc = tl.where(mask, c - cbar, 0.0)
        zc = tl.where(mask, z - zbar, 0.0)
        ct = tl.where(mask, c - a, 0.0)
    else:
        cc = c
        zc = z
        ct = c
    vc = tl.sum(cc * cc, axis=0) / N
    vz = tl.sum(zc * zc, axis=0) / N
    k = tl.sqrt(tl.maximum(vz, delta)) / tl.sqrt(tl.maximum(vc, delta))
    return mean, rstd, z, c, dc_dz, dc_dlam, cc, zc, ct, vc, vz, k


@triton.jit
def ibnorm_row_fwd_kernel(
    X, Y, W, B, LAM, MEAN, RSTD,
    stride_x, stride_y, N, eps, delta,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, LAM_PER_CHANNEL: tl.constexpr,
    CENTERED: tl.constexpr, OP: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if LAM_PER_CHANNEL:
        lam = tl.load(LAM + cols, mask=mask, other=0.0).to(tl.float32)
    else:
        lam = tl.load(LAM).to(tl.float32) + 0.0 * x
    lam = tl.maximum(lam, 0.0)
    mean, rstd, z, c, dc_dz, dc_dlam, cc, zc, ct, vc, vz, k = _row_forward_math(x, lam, mask, N, eps, delta, CENTERED, OP)
    y = ct * k
    if HAS_W:
        y = y * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_B:
        y = y + tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)


@triton.jit
def ibnorm_row_bwd_kernel(
    X, DY, DX, W, LAM, DW_PART, DB_PART, DLAM_PART,
    stride_x, stride_dy, stride_dx, M, N, eps, delta, rows_per_program,
    HAS_W: tl.constexpr, LAM_PER_CHANNEL: tl.constexpr,
    CENTERED: tl.constexpr, OP: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    if HAS_W:
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    else:
        w = tl.where(mask, 1.0, 0.0)
    if LAM_PER_CHANNEL:
        lam = tl.load(LAM + cols, mask=mask, other=0.0).to(tl.float32)
    else:
        lam = tl.load(LAM).to(tl.float32) + 0.0 * w
    lam = tl.maximum(lam, 0.0)
    dw_acc = tl.zeros((BLOCK,), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK,), dtype=tl.float32)
    dlam_acc = tl.zeros((BLOCK,), dtype=tl.float32)
    row_start = pid * rows_per_program
    for i in range(0, rows_per_program):
        row = (row_start + i).to(tl.int64)
        if row < M:
            x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
            g = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
            mean, rstd, z, c, dc_dz, dc_dlam, cc, zc, ct, vc, vz, k = _row_forward_math(x, lam, mask, N, eps, delta, CENTERED, OP)
            chat = ct * k
            dw_acc += g * chat
            db_acc += g
            gh = g * w
            gt = gh * k
            sk = tl.sum(gh * ct, axis=0)
            dk_dvc = tl.where(vc > delta, -k / (2.0 * vc), 0.0)
            dk_dvz = tl.where(vz > delta, k / (2.0 * vz), 0.0)
            if CENTERED:
                mg = tl.sum(gt, axis=0) / N
                dc = gt - mg + sk * dk_dvc * 2.0 * cc / N
                dz = mg + sk * dk_dvz * 2.0 * zc / N
            else:
                dc = gt + sk * dk_dvc * 2.0 * c / N
                dz = sk * dk_dvz * 2.0 * z / N
            dc = tl.where(mask, dc, 0.0)
            dz = tl.where(mask, dz + dc * dc_dz, 0.0)
            dlam_acc += dc * dc_dlam
            dd = rstd * (dz - z * (tl.sum(dz * z, axis=0) / N))
            if CENTERED:
                dd = tl.where(mask, dd - tl.sum(dd, axis=0) / N, 0.0)
            tl.store(DX + row * stride_dx + cols, dd.to(DX.dtype.element_ty), mask=mask)
    part = pid.to(tl.int64) * N
    tl.store(DW_PART + part + cols, dw_acc, mask=mask)
    tl.store(DB_PART + part + cols, db_acc, mask=mask)
    tl.store(DLAM_PART + part + cols, dlam_acc, mask=mask)
