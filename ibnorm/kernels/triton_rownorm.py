"""Fused Triton kernels for row-wise IBNorm (rms and layer groupings), forward and backward.

Forward: one program per row.  The row stays on chip; it writes y and eight fp32 statistics
per row (mean, rstd, μ_c, mean c, mean z, var c, var z, k = σ_z/σ_c) that the backward reuses,
so the backward runs no forward reductions.  mean z (0 for layer) and var z (v/(v + ε)) are
known from the row's own statistics, so the forward reduces x twice (layer; once for rms) and c
twice (once for rms), with a per-channel λ's nonzero count riding along in a c reduction.

Backward: SM-count persistent programs, each walking a fixed strided set of rows.  Per row one
multi-operand reduction gives every sum the gradient needs (the second reduction of the chain
rule is expanded algebraically into sums of the first pass), then dx is written.  dγ, dβ and dλ
are accumulated in registers, only when autograd needs them (constexpr switches), and written
to one fp32 partial buffer (programs × K × N) that the host sums in a fixed order: deterministic,
no atomics.

Numerics (docs/math.md):
* every transcendental is evaluated in a form that cannot overflow for any |z| (tanh through
  e = exp(−2λ|z|) ∈ (0, 1]); log and power only see log2 of 1 + λ|z| ≤ 1 + λ√H;
* λ = 0 is a select (c = z bit for bit) and σ_z/σ_c uses round-to-nearest sqrt and division,
  so k is exactly 1 whenever c == z: step 4 is the identity at λ = 0 on any GPU;
* a scalar λ stays a scalar: its reciprocals are computed once per program.

The math is ``ibnorm.functional.ib_row_norm``'s; this file knows nothing of models.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl
from triton.language.extra import libdevice

OP_CODES = {"tanh": 0, "log": 1, "power": 2}
MAX_HIDDEN = 65536
RESTANDARDIZE_FLOOR = 1e-12
N_STATS = 8  # per-row fp32 statistics saved by the forward (see module docstring)
# The interpreter has no libdevice or inline PTX; compiled kernels use the 2-instruction approximate
# divide where the quotient only needs a few ulp (denominators here are in [1, 1 + λ√H]) and lg2.approx.
_FAST_DIV = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") != "1")
_LN2 = tl.constexpr(0.6931471805599453)
_LOG2E = tl.constexpr(1.4426950408889634)
# Series cut-offs (in u = λ|z|): below them the closed forms lose digits to cancellation.
_TANH_SMALL = tl.constexpr(0.1)
_TANH_DLAM_SMALL = tl.constexpr(0.3)
_LOG_SMALL = tl.constexpr(0.1)
_LOG_DLAM_SMALL = tl.constexpr(0.25)


@triton.jit
def _div(a, b):
    if _FAST_DIV:
        return libdevice.fast_dividef(a, b)
    else:
        return a / b


@triton.jit
def _log2(x):
    # tl.log2 compiles to a ~30-instruction accurate log; the hardware lg2.approx (one MUFU op,
    # absolute error < 2^-22 on [0.5, 2]) is what the bandwidth budget allows.  Arguments here are
    # 1 + λ|z| ≥ 1 or 1 + |z| ≥ 1, where the closed forms use it (series cover small arguments).
    if _FAST_DIV:
        return tl.inline_asm_elementwise("lg2.approx.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1)
    else:
        return tl.log2(x)


@triton.jit
def _copysign(mag, z):
    return tl.where(z < 0, -mag, mag)


@triton.jit
def _lam_scalars(lam, OP: tl.constexpr):
    """Per-λ quantities (scalar for a scalar λ): is-zero, a safe λ, and the op's reciprocals."""
    lam = tl.maximum(lam, 0.0)  # effective λ; the straight-through gradient is the host's
    is_zero = lam == 0.0
    lam_s = tl.where(is_zero, 1.0, lam)
    if OP == 2:
        p = _div(1.0, 1.0 + lam_s)
        return is_zero, p, 1.0 + lam_s
    else:
        return is_zero, lam_s, _div(1.0, lam_s)


@triton.jit
def _compress_value(z, is_zero, lam_s, inv, OP: tl.constexpr):
    """c = s_λ(z).  For power ``lam_s`` is p and ``inv`` is 1/p; otherwise λ and 1/λ."""
    a = tl.abs(z)
    if OP == 0:
        u = lam_s * a
        e = tl.exp2(u * (-2.0 * _LOG2E))  # ∈ (0, 1]: no overflow for any u
        t = _div(1.0 - e, 1.0 + e)
        u2 = u * u
        c = tl.where(u < _TANH_SMALL, z * (1.0 + u2 * (-1.0 / 3.0 + u2 * (2.0 / 15.0))), _copysign(t, z) * inv)
    elif OP == 1:
        u = lam_s * a
        lg = _log2(1.0 + u) * _LN2
        c_small = z * (1.0 + u * (-0.5 + u * (1.0 / 3.0 + u * (-0.25 + u * (0.2 + u * (-1.0 / 6.0))))))
        c = tl.where(u < _LOG_SMALL, c_small, _copysign(lg, z) * inv)
    else:
        # ((1+a)^p − 1)/p: the absolute error of w − 1 is an ulp of 1 for every a.
        w = tl.exp2(lam_s * _log2(1.0 + a))
        c = _copysign(w - 1.0, z) * inv
    return tl.where(is_zero, z, c)


@triton.jit
def _compress_grad(z, is_zero, lam_s, inv, OP: tl.constexpr):
    """c and ∂s/∂z, with the exact λ = 0 limits."""
    a = tl.abs(z)
    if OP == 0:
        u = lam_s * a
        e = tl.exp2(u * (-2.0 * _LOG2E))
        t = _div(1.0 - e, 1.0 + e)
        u2 = u * u
        c = tl.where(u < _TANH_SMALL, z * (1.0 + u2 * (-1.0 / 3.0 + u2 * (2.0 / 15.0))), _copysign(t, z) * inv)
        ds = 1.0 - t * t
    elif OP == 1:
        u = lam_s * a
        lg = _log2(1.0 + u) * _LN2
        c_small = z * (1.0 + u * (-0.5 + u * (1.0 / 3.0 + u * (-0.25 + u * (0.2 + u * (-1.0 / 6.0))))))
        c = tl.where(u < _LOG_SMALL, c_small, _copysign(lg, z) * inv)
        ds = _div(1.0, 1.0 + u)
    else:
        w = tl.exp2(lam_s * _log2(1.0 + a))
        c = _copysign(w - 1.0, z) * inv
        ds = _div(w, 1.0 + a)
    c = tl.where(is_zero, z, c)
    ds = tl.where(is_zero, 1.0, ds)
    return c, ds


@triton.jit
def _compress_dlam(z, c, ds, is_zero, lam_s, inv, OP: tl.constexpr):
    """∂s/∂λ from z, c = s(z) and s'(z), with the exact λ = 0 limit.

    Computed after the row reductions from values that are live anyway, so it holds no registers
    across them.  The closed forms (z·s' − c)/λ cancel for small u = λ|z|: series there.
    """
    a = tl.abs(z)
    if OP == 0:
        u = lam_s * a
        u2 = u * u
        # z·|z|·F'(u), F(u) = tanh(u)/u
        dF = u * (-2.0 / 3.0 + u2 * (8.0 / 15.0 + u2 * (-102.0 / 315.0 + u2 * (496.0 / 2835.0 + u2 * (-13820.0 / 155925.0)))))
        dl = tl.where(u < _TANH_DLAM_SMALL, z * a * dF, (z * ds - c) * inv)
        dl = tl.where(is_zero, 0.0, dl)
    elif OP == 1:
        u = lam_s * a
        # F'(u) = Σ_k (−1)^k k/(k+1) u^(k−1), k = 1…9
        dF = -0.5 + u * (2.0 / 3.0 + u * (-0.75 + u * (0.8 + u * (-5.0 / 6.0 + u * (6.0 / 7.0 + u * (
            -7.0 / 8.0 + u * (8.0 / 9.0 + u * (-0.9))))))))
        dl = tl.where(u < _LOG_DLAM_SMALL, z * a * dF, (z * ds - c) * inv)
        dl = tl.where(is_zero, -0.5 * z * a, dl)
    else:
        # ∂s/∂λ = −sign(z)·((v − 1)e^v + 1), v = p·log1p(|z|), e^v = s'·(1 + |z|): O(v²), so small
        # |z| needs log1p to full relative precision and a series in v.
        w = ds * (1.0 + a)
        L_small = a * (1.0 + a * (-0.5 + a * (1.0 / 3.0 + a * (-0.25 + a * (0.2 + a * (-1.0 / 6.0 + a / 7.0))))))
        L = tl.where(a < 0.1, L_small, _log2(1.0 + a) * _LN2)
        v = lam_s * L
        g_small = v * v * (0.5 + v * (1.0 / 3.0 + v * (0.125 + v * (1.0 / 30.0 + v * (1.0 / 144.0 + v / 840.0)))))
        dl = -_copysign(tl.where(v < 0.25, g_small, w * v - (w - 1.0)), z)
        dl0 = (1.0 + a) * L - a  # the λ = 0 limit, also O(a²)
        dl0 = tl.where(a < 0.1, a * a * (0.5 + a * (-1.0 / 6.0 + a * (1.0 / 12.0 + a * (-0.05 + a / 30.0)))), dl0)
        dl = tl.where(is_zero, -_copysign(dl0, z), dl)
    return dl


@triton.jit
def _add2(a0, a1, b0, b1):
    return a0 + b0, a1 + b1


@triton.jit
def _add4(a0, a1, a2, a3, b0, b1, b2, b3):
    return a0 + b0, a1 + b1, a2 + b2, a3 + b3


@triton.jit
def _add8(a0, a1, a2, a3, a4, a5, a6, a7, b0, b1, b2, b3, b4, b5, b6, b7):
    return a0 + b0, a1 + b1, a2 + b2, a3 + b3, a4 + b4, a5 + b5, a6 + b6, a7 + b7


@triton.jit
def _spread_ratio(vz, vc, delta):
    # Round-to-nearest sqrt and division: k is exactly 1 when vz == vc (λ = 0), on any GPU.
    return tl.div_rn(tl.sqrt_rn(tl.maximum(vz, delta)), tl.sqrt_rn(tl.maximum(vc, delta)))


@triton.jit
def ibnorm_row_fwd_kernel(
    X, Y, W, B, LAM, STATS,
    stride_x, stride_y, eps, delta, N: tl.constexpr,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, LAM_PER_CHANNEL: tl.constexpr,
    CENTERED: tl.constexpr, OP: tl.constexpr, BLOCK: tl.constexpr,
):
    EVEN: tl.constexpr = N == BLOCK
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if LAM_PER_CHANNEL:
        lam = tl.load(LAM + cols, mask=mask, other=0.0)
    else:
        lam = tl.load(LAM)
    is_zero, lam_s, inv = _lam_scalars(lam, OP)
    inv_n = 1.0 / N
    if CENTERED:
        mean = tl.sum(x, axis=0) * inv_n
        d = x - mean
        if not EVEN:
            d = tl.where(mask, d, 0.0)
    else:
        mean = 0.0
        d = x
    var = tl.sum(d * d, axis=0) * inv_n
    rstd = tl.rsqrt(var + eps)
    z = d * rstd
    c = _compress_value(z, is_zero, lam_s, inv, OP)  # 0 where masked: z = 0 there
    # λ = 0 is structural: μ_c and v_c are selected (0 and v_z) when every λ of the row is 0, so
    # k == 1 and y == z·γ (+β) bit for bit.  Arithmetic cannot promise it on a GPU: ptxas contracts
    # c − d·rstd into one FMA (c − z ≠ 0) and reductions may add in different orders.
    # z is d·rstd with d centred (layer) or not (rms), so mean(z) = 0 (layer) and var(z) = v/(v + ε)
    # exactly: the forward reduces only c, and saves these for the backward.  A per-channel λ's
    # count of nonzero channels rides along in the first reduction (one tree, not two).
    vz = var * rstd * rstd
    zbar = 0.0
    nonzero = tl.where(is_zero, 0.0, 1.0)
    if CENTERED:
        if LAM_PER_CHANNEL:
            sdiff, n_nonzero = tl.reduce((c - z, nonzero), 0, _add2)
            all_zero = n_nonzero == 0.0
        else:
            sdiff = tl.sum(c - z, axis=0)
            all_zero = is_zero
        mu_c = tl.where(all_zero, 0.0, sdiff * inv_n)  # mean(c − z): no cancellation of two means
        cbar = mu_c
        # Two-pass variance: mean(c) is far from 0 when one channel dominates (one-pass cancels).
        cc = c - cbar
        if not EVEN:
            cc = tl.where(mask, cc, 0.0)
        scc = tl.sum(cc * cc, axis=0)
    else:
        if LAM_PER_CHANNEL:
            scc, n_nonzero = tl.reduce((c * c, nonzero), 0, _add2)
            all_zero = n_nonzero == 0.0
        else:
            scc = tl.sum(c * c, axis=0)
            all_zero = is_zero
        cbar = 0.0
        mu_c = 0.0
    vc = tl.where(all_zero, vz, scc * inv_n)
    k = _spread_ratio(vz, vc, delta)
    y = c - mu_c if CENTERED else c
    if HAS_W:
        y = y * (k * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32))
    else:
        y = y * k
    if HAS_B:
        y = y + tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)
    s = STATS + row * 8
    tl.store(s + 0, mean)
    tl.store(s + 1, rstd)
    tl.store(s + 2, mu_c)
    tl.store(s + 3, cbar)
    tl.store(s + 4, zbar)
    tl.store(s + 5, vc)
    tl.store(s + 6, vz)
    tl.store(s + 7, k)


@triton.jit
def _row_scalars(STATS, row, delta, inv_n, CENTERED: tl.constexpr):
    s = STATS + row * 8
    mean = tl.load(s + 0)
    rstd = tl.load(s + 1)
    vc = tl.load(s + 5)
    vz = tl.load(s + 6)
    k = tl.load(s + 7)
    # ∂k/∂v_c and ∂k/∂v_z (zero where the floor δ is active), times 2/N.
    kc = tl.where(vc > delta, -k / vc, 0.0) * inv_n
    kz = tl.where(vz > delta, k / vz, 0.0) * inv_n
    if CENTERED:
        return mean, rstd, tl.load(s + 2), tl.load(s + 3), tl.load(s + 4), vz, k, kc, kz
    else:
        return mean, rstd, 0.0, 0.0, 0.0, vz, k, kc, kz


@triton.jit
def _row_values(x, g, w, is_zero, lam_s, inv, mask, mean, rstd, cbar, zbar,
                CENTERED: tl.constexpr, OP: tl.constexpr, EVEN: tl.constexpr):
    """Recomputes z (centred: z − mean z), c (centred: c − mean c), ∂s/∂z and γ·dy from x."""
    if CENTERED:
        d = x - mean
        if not EVEN:
            d = tl.where(mask, d, 0.0)
    else:
        d = x
    z = d * rstd
    c, ds = _compress_grad(z, is_zero, lam_s, inv, OP)
    if CENTERED:
        # Centred c and z keep every sum free of cancellation against mean(c).
        c = c - cbar
        z = z - zbar
        if not EVEN:
            c = tl.where(mask, c, 0.0)
            z = tl.where(mask, z, 0.0)
            ds = tl.where(mask, ds, 0.0)
    return z, c, ds, g * w


@triton.jit
def _row_sums(z, c, ds, gh, CENTERED: tl.constexpr):
    """The eight (layer) or three (rms, in slots 1, 3, 7) row sums of ONE multi-operand reduction."""
    if CENTERED:
        return tl.reduce((gh, gh * c, gh * ds, gh * ds * z, ds, c * ds, ds * z, c * ds * z), 0, _add8)
    else:
        s_gc, s_gsz, s_csz = tl.reduce((gh * c, gh * ds * z, c * ds * z), 0, _add3)
        return 0.0, s_gc, 0.0, s_gsz, 0.0, 0.0, 0.0, s_csz


@triton.jit
def _coefficients(s_g, s_gc, s_gs, s_gsz, s_s, s_cs, s_sz, s_csz, mu_c, cbar, zbar, vz, k, kc, kz, inv_n,
                  CENTERED: tl.constexpr):
    """Row scalars of the backward from the sums of ``_row_sums``.

    The chain rule needs mean(dz) and mean(dz·z) of a dz that itself depends on Σ gh·c; both are
    expanded into sums available in the same pass.  Returns (mg, α, β, mean dz, m1) such that
    dc = γdy·k − mg + α·c, dz = mg + β·z + dc·s', dx = rstd·(dz − mean dz − z·m1) (z, c centred).
    """
    n = 1.0 / inv_n
    if CENTERED:
        mg = k * s_g * inv_n  # gradient through μ_c, per element
        sk = s_gc + (cbar - mu_c) * s_g  # Σ gh·(c − μ_c)
        alpha = sk * kc
        beta = sk * kz
        mean_dz = (n * mg + k * s_gs - mg * s_s + alpha * s_cs) * inv_n
        m1 = (beta * n * vz + k * s_gsz - mg * s_sz + alpha * s_csz) * inv_n + zbar * mean_dz
    else:
        mg = 0.0
        alpha = s_gc * kc
        beta = s_gc * kz
        mean_dz = 0.0
        m1 = (beta * n * vz + k * s_gsz + alpha * s_csz) * inv_n
    return mg, alpha, beta, mean_dz, m1


@triton.jit
def _row_coefficients(z, c, ds, gh, mu_c, cbar, zbar, vz, k, kc, kz, inv_n, CENTERED: tl.constexpr):
    s_g, s_gc, s_gs, s_gsz, s_s, s_cs, s_sz, s_csz = _row_sums(z, c, ds, gh, CENTERED)
    return _coefficients(s_g, s_gc, s_gs, s_gsz, s_s, s_cs, s_sz, s_csz, mu_c, cbar, zbar, vz, k, kc, kz, inv_n,
                         CENTERED)


@triton.jit
def _row_outputs(z, c, ds, gh, rstd, mu_c, cbar, k, mg, alpha, beta, mean_dz, m1, CENTERED: tl.constexpr):
    """dx (fp32), ĉ = (c − μ_c)·k and dc."""
    dc = gh * k - mg + alpha * c
    dz = mg + beta * z + dc * ds
    dx = rstd * (dz - mean_dz - z * m1)
    if CENTERED:
        chat = (c + (cbar - mu_c)) * k
    else:
        chat = c * k
    return dx, chat, dc


@triton.jit
def _row_two_rounds(z, c, ds, gh, mask, rstd, mu_c, cbar, zbar, k, kc, kz, inv_n,
                    CENTERED: tl.constexpr, EVEN: tl.constexpr):
    """dx, ĉ and dc with the chain rule's two row reductions done as two rounds (values live)."""
    if CENTERED:
        s_g, s_gc = tl.reduce((gh, gh * c), 0, _add2)
        mg = k * s_g * inv_n
        sk = s_gc + (cbar - mu_c) * s_g  # Σ gh·(c − μ_c)
        dc = gh * k - mg + (sk * kc) * c
        dz = mg + (sk * kz) * z + dc * ds
        if not EVEN:
            dz = tl.where(mask, dz, 0.0)
        s_dz, s_dzz = tl.reduce((dz, dz * z), 0, _add2)
        mean_dz = s_dz * inv_n
        dx = rstd * (dz - mean_dz - z * (s_dzz * inv_n + zbar * mean_dz))
        chat = (c + (cbar - mu_c)) * k
    else:
        sk = tl.sum(gh * c, axis=0)
        dc = gh * k + (sk * kc) * c
        dz = (sk * kz) * z + dc * ds
        dx = rstd * (dz - z * (tl.sum(dz * z, axis=0) * inv_n))
        chat = c * k
    return dx, chat, dc


@triton.jit
def _add3(a0, a1, a2, b0, b1, b2):
    return a0 + b0, a1 + b1, a2 + b2


@triton.jit
def _lam_per_row(LAM, cols, mask, OP: tl.constexpr):
    # Per-channel λ is re-read each row (an L1/L2 hit) rather than held in registers.
    return _lam_scalars(tl.load(LAM + cols, mask=mask, other=0.0), OP)


@triton.jit
def ibnorm_row_bwd_kernel(
    X, DY, DX, W, LAM, STATS, PART,
    stride_x, stride_dy, stride_dx, M, delta, N: tl.constexpr,
    HAS_W: tl.constexpr, LAM_PER_CHANNEL: tl.constexpr, CENTERED: tl.constexpr, OP: tl.constexpr,
    NEED_DX: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr, NEED_DLAM: tl.constexpr,
    BLOCK: tl.constexpr, RELOAD: tl.constexpr, PREFETCH: tl.constexpr,
):
    """RELOAD: after the row reduction, re-read x and dy (L1/L2 hits) and recompute instead of
    keeping every per-element value live across it; wide rows need it to stay out of local memory.
    PREFETCH: issue the loads of the program's next row before working on this one, so their
    latency overlaps this row's arithmetic (one program per SM has no other work to hide it)."""
    EVEN: tl.constexpr = N == BLOCK
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    if not LAM_PER_CHANNEL:
        is_zero, lam_s, inv = _lam_scalars(tl.load(LAM), OP)
    inv_n = 1.0 / N
    dw_acc = tl.zeros((BLOCK,), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK,), dtype=tl.float32)
    dl_acc = tl.zeros((BLOCK,), dtype=tl.float32)
    first = pid.to(tl.int64)
    if PREFETCH:
        x_next = tl.load(X + first * stride_x + cols, mask=mask & (first < M), other=0.0)
        g_next = tl.load(DY + first * stride_dy + cols, mask=mask & (first < M), other=0.0)
    for i in tl.range(0, tl.cdiv(M - pid, nprog)):
        row = first + i * nprog
        if LAM_PER_CHANNEL:
            is_zero, lam_s, inv = _lam_per_row(LAM, cols, mask, OP)
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) if HAS_W else 1.0
        if PREFETCH:
            x = x_next.to(tl.float32)
            g = g_next.to(tl.float32)
            nxt = row + nprog
            x_next = tl.load(X + nxt * stride_x + cols, mask=mask & (nxt < M), other=0.0)
            g_next = tl.load(DY + nxt * stride_dy + cols, mask=mask & (nxt < M), other=0.0)
        else:
            x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
            g = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        mean, rstd, mu_c, cbar, zbar, vz, k, kc, kz = _row_scalars(STATS, row, delta, inv_n, CENTERED)
        z, c, ds, gh = _row_values(x, g, w, is_zero, lam_s, inv, mask, mean, rstd, cbar, zbar, CENTERED, OP, EVEN)
        if RELOAD:
            mg, alpha, beta, mean_dz, m1 = _row_coefficients(z, c, ds, gh, mu_c, cbar, zbar, vz, k, kc, kz, inv_n,
                                                             CENTERED)
            x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
            g = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
            z, c, ds, gh = _row_values(x, g, w, is_zero, lam_s, inv, mask, mean, rstd, cbar, zbar, CENTERED, OP, EVEN)
            dx, chat, dc = _row_outputs(z, c, ds, gh, rstd, mu_c, cbar, k, mg, alpha, beta, mean_dz, m1, CENTERED)
        else:
            dx, chat, dc = _row_two_rounds(z, c, ds, gh, mask, rstd, mu_c, cbar, zbar, k, kc, kz, inv_n, CENTERED, EVEN)
        if NEED_DX:
            tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
        if NEED_DW:
            dw_acc += g * chat
        if NEED_DB:
            db_acc += g
        if NEED_DLAM:
            if CENTERED:  # ∂s/∂λ wants the uncentred z and c
                z = z + zbar
                c = c + cbar
            dl_acc += dc * _compress_dlam(z, c, ds, is_zero, lam_s, inv, OP)
    _store_partials(PART, pid, cols, mask, dw_acc, db_acc, dl_acc, N, NEED_DW + NEED_DB + NEED_DLAM, NEED_DW, NEED_DB,
                    NEED_DLAM)


@triton.jit
def _half_sums(X, DY, W, LAM, row, stride_x, stride_dy, cols, mask, is_zero, lam_s, inv, mean, rstd, cbar, zbar,
               HAS_W: tl.constexpr, LAM_PER_CHANNEL: tl.constexpr, CENTERED: tl.constexpr, OP: tl.constexpr,
               EVEN: tl.constexpr):
    if LAM_PER_CHANNEL:
        is_zero, lam_s, inv = _lam_per_row(LAM, cols, mask, OP)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) if HAS_W else 1.0
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
    z, c, ds, gh = _row_values(x, g, w, is_zero, lam_s, inv, mask, mean, rstd, cbar, zbar, CENTERED, OP, EVEN)
    return _row_sums(z, c, ds, gh, CENTERED)


@triton.jit
def _half_outputs(X, DY, DX, W, LAM, row, stride_x, stride_dy, stride_dx, cols, mask, is_zero, lam_s, inv,
                  mean, rstd, mu_c, cbar, zbar, k, mg, alpha, beta, mean_dz, m1,
                  HAS_W: tl.constexpr, LAM_PER_CHANNEL: tl.constexpr, CENTERED: tl.constexpr, OP: tl.constexpr,
                  EVEN: tl.constexpr, NEED_DX: tl.constexpr, NEED_DLAM: tl.constexpr):
    """Re-reads one half of the row, writes its dx, returns its dγ, dβ, dλ contributions."""
    if LAM_PER_CHANNEL:
        is_zero, lam_s, inv = _lam_per_row(LAM, cols, mask, OP)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) if HAS_W else 1.0
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
    g = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
    z, c, ds, gh = _row_values(x, g, w, is_zero, lam_s, inv, mask, mean, rstd, cbar, zbar, CENTERED, OP, EVEN)
    dx, chat, dc = _row_outputs(z, c, ds, gh, rstd, mu_c, cbar, k, mg, alpha, beta, mean_dz, m1, CENTERED)
    if NEED_DX:
        tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
    dl = 0.0
    if NEED_DLAM:
        if CENTERED:
            z = z + zbar
            c = c + cbar
        dl = dc * _compress_dlam(z, c, ds, is_zero, lam_s, inv, OP)
    return g * chat, g, dl


@triton.jit
def _store_partials(PART, pid, cols, mask, dw, db, dl, N: tl.constexpr, K: tl.constexpr, NEED_DW: tl.constexpr,
                    NEED_DB: tl.constexpr, NEED_DLAM: tl.constexpr):
    part = PART + pid.to(tl.int64) * K * N + cols
    if NEED_DW:
        tl.store(part, dw, mask=mask)
        part += N
    if NEED_DB:
        tl.store(part, db, mask=mask)
        part += N
    if NEED_DLAM:
        tl.store(part, dl, mask=mask)


@triton.jit
def ibnorm_row_bwd_halves_kernel(
    X, DY, DX, W, LAM, STATS, PART,
    stride_x, stride_dy, stride_dx, M, delta, N: tl.constexpr,
    HAS_W: tl.constexpr, LAM_PER_CHANNEL: tl.constexpr, CENTERED: tl.constexpr, OP: tl.constexpr,
    NEED_DX: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr, NEED_DLAM: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """The RELOAD backward for wide rows, strip-mined into two halves of BLOCK/2 columns.

    Triton lowers each tensor operation over all of a thread's elements before the next, so the
    temporaries of a whole wide row are live at once; two halves halve them, while the
    accumulators (one pair per gradient) stay in registers.  Same math as ibnorm_row_bwd_kernel.
    """
    HB: tl.constexpr = BLOCK // 2
    EVEN: tl.constexpr = N == BLOCK
    K: tl.constexpr = NEED_DW + NEED_DB + NEED_DLAM
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    c0 = tl.arange(0, HB)
    c1 = c0 + HB
    m0 = c0 < N
    m1_ = c1 < N
    is_zero, lam_s, inv = _lam_scalars(tl.load(LAM), OP)  # overridden per half for per-channel λ
    inv_n = 1.0 / N
    dw0 = tl.zeros((HB,), dtype=tl.float32)
    dw1 = tl.zeros((HB,), dtype=tl.float32)
    db0 = tl.zeros((HB,), dtype=tl.float32)
    db1 = tl.zeros((HB,), dtype=tl.float32)
    dl0 = tl.zeros((HB,), dtype=tl.float32)
    dl1 = tl.zeros((HB,), dtype=tl.float32)
    first = pid.to(tl.int64)
    for i in tl.range(0, tl.cdiv(M - pid, nprog)):
        row = first + i * nprog
        mean, rstd, mu_c, cbar, zbar, vz, k, kc, kz = _row_scalars(STATS, row, delta, inv_n, CENTERED)
        a0, a1, a2, a3, a4, a5, a6, a7 = _half_sums(X, DY, W, LAM, row, stride_x, stride_dy, c0, m0, is_zero, lam_s,
                                                    inv, mean, rstd, cbar, zbar, HAS_W, LAM_PER_CHANNEL, CENTERED, OP, EVEN)
        b0, b1, b2, b3, b4, b5, b6, b7 = _half_sums(X, DY, W, LAM, row, stride_x, stride_dy, c1, m1_, is_zero, lam_s,
                                                    inv, mean, rstd, cbar, zbar, HAS_W, LAM_PER_CHANNEL, CENTERED, OP, EVEN)
        mg, alpha, beta, mean_dz, m1 = _coefficients(a0 + b0, a1 + b1, a2 + b2, a3 + b3, a4 + b4, a5 + b5, a6 + b6,
                                                     a7 + b7, mu_c, cbar, zbar, vz, k, kc, kz, inv_n, CENTERED)
        w_c, b_c, l_c = _half_outputs(X, DY, DX, W, LAM, row, stride_x, stride_dy, stride_dx, c0, m0, is_zero, lam_s,
                                      inv, mean, rstd, mu_c, cbar, zbar, k, mg, alpha, beta, mean_dz, m1, HAS_W,
                                      LAM_PER_CHANNEL, CENTERED, OP, EVEN, NEED_DX, NEED_DLAM)
        dw0 += w_c
        db0 += b_c
        dl0 += l_c
        w_c, b_c, l_c = _half_outputs(X, DY, DX, W, LAM, row, stride_x, stride_dy, stride_dx, c1, m1_, is_zero, lam_s,
                                      inv, mean, rstd, mu_c, cbar, zbar, k, mg, alpha, beta, mean_dz, m1, HAS_W,
                                      LAM_PER_CHANNEL, CENTERED, OP, EVEN, NEED_DX, NEED_DLAM)
        dw1 += w_c
        db1 += b_c
        dl1 += l_c
    _store_partials(PART, pid, c0, m0, dw0, db0, dl0, N, K, NEED_DW, NEED_DB, NEED_DLAM)
    _store_partials(PART, pid, c1, m1_, dw1, db1, dl1, N, K, NEED_DW, NEED_DB, NEED_DLAM)
