"""Fused Triton kernels for row-wise IBNorm (rms and layer groupings), forward and backward.

Forward: one program per row.  The row stays on chip; it writes y and eight fp32 statistics
per row (mean, rstd, μ_c, mean c, 0, var c, var z, k = σ_z/σ_c) that the backward reuses,
so the backward runs no forward reductions.  mean z (0: z is centred) and var z (v/(v + ε)) are
known from the row's own statistics, so the forward reduces x twice (layer; once for rms) and c
twice (once for rms), with a per-channel λ's nonzero count riding along in a c reduction.

Backward, two strategies (``rownorm_op.backward_config`` picks):
* one block (rows up to 8192 columns): SM-count persistent programs, each walking a fixed strided
  set of rows with the row in registers; per row the chain rule's two reductions, then dx.  dγ,
  dβ and dλ are accumulated in registers, only when autograd needs them (constexpr switches),
  and written to one fp32 partial buffer (programs × K × N);
* split (wider rows; 8192 when dλ is wanted): a row-sums pass (one program per row,
  fixed-size column chunks; the second reduction of the chain rule expanded algebraically into
  sums of the first) writes each row's constants; a column-tiles pass then computes dx and the
  column accumulators of its tile over a block of rows, with no reductions at all.
Either way the host sums the partial buffer in a fixed order: deterministic, no atomics.

Numerics (docs/math.md):
* every transcendental is evaluated in a form that cannot overflow for any |z| (tanh through
  e = exp(−2λ|z|) ∈ (0, 1]); log only sees log2 of 1 + λ|z| ≤ 1 + λ√H, power log2 of 1 + |z|;
* λ = 0 gives c = z bit for bit (power: a select; tanh and log: their series branch at u = 0)
  and σ_z/σ_c uses round-to-nearest sqrt and division, so k is exactly 1 whenever c == z: step 4
  is the identity at λ = 0 on any GPU;
* series and closed forms meet at fixed arguments; the series are short near-minimax polynomials
  (benchmarks/kernel_polynomials.py) with their constant terms exact;
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
_LAM_FLOOR = tl.constexpr(1e-30)  # a λ below it is 0 (see _lam_scalars)


@triton.jit
def _div(a, b):
    if _FAST_DIV:
        return libdevice.fast_dividef(a, b)
    else:
        return a / b


@triton.jit
def _mufu(x, ASM: tl.constexpr, EXP: tl.constexpr):
    """One hardware special-function op (compiled), or torch-exact log2/exp2 (interpreter)."""
    if _FAST_DIV:
        return tl.inline_asm_elementwise(ASM, "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1)
    elif EXP:
        return tl.exp2(x)
    else:
        return tl.log2(x)


@triton.jit
def _log2(x):
    # tl.log2 compiles to a ~30-instruction accurate log; the hardware lg2.approx (one MUFU op,
    # absolute error < 2^-22 on [0.5, 2]) is what the bandwidth budget allows.  Arguments here are
    # 1 + λ|z| ≥ 1 or 1 + |z| ≥ 1, where the closed forms use it (series cover small arguments), so
    # the .ftz form loses nothing and saves the compare and select that guard subnormal inputs.
    return _mufu(x, "lg2.approx.ftz.f32 $0, $1;", False)


@triton.jit
def _exp2(x):
    # ex2.approx with flush-to-zero: arguments here give 1 ≤ 2^x (power) or 2^x ∈ (0, 1] where a
    # result below 2^-126 is as good as 0 (tanh's e = exp(−2u): t = 1 either way).
    return _mufu(x, "ex2.approx.ftz.f32 $0, $1;", True)


@triton.jit
def _copysign(mag, z):
    """|mag| with z's sign for mag ≥ 0: one bitwise op (LOP3) instead of a compare and a select."""
    sign = z.to(tl.uint32, bitcast=True) & tl.full((), 0x80000000, tl.uint32)
    return (mag.to(tl.uint32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def _lam_scalars(lam, OP: tl.constexpr):
    """Per-λ quantities (scalar for a scalar λ): is-zero (λ ≤ 0), the λ the op uses (power: p) and
    its reciprocal.  The straight-through gradient of max(λ, 0) is the host's.

    A λ below _LAM_FLOOR = 1e-30 is 0 (its effect on any float32 value is nil: λ|z| < 1e-30·256).
    tanh and log need no λ = 0 select: they use max(λ, 1e-30), and u = λ|z| ≤ 1e-30·√H takes their
    series branches, which then give c = z and s' = 1 exactly (u² underflows; 1 − u/2 rounds to 1)
    and log's λ = 0 limit of ∂s/∂λ; tanh's (0) is set on the summed dλ (``_tanh_dlam_limit``)."""
    is_zero = lam < _LAM_FLOOR
    if OP == 2:
        lam = tl.maximum(lam, 0.0)
        p = _div(1.0, 1.0 + lam)
        return is_zero, p, 1.0 + lam
    else:
        lam = tl.maximum(lam, _LAM_FLOOR)
        return is_zero, lam, _div(1.0, lam)


@triton.jit
def _log1p_ratio(u):
    """log1p(u)/u on 0 ≤ u < 0.1, exactly 1 at u = 0 (relative error 1.9e-7 in float32, below the
    7e-7 of the lg2.approx closed form beside it).  This and the other short polynomials here are
    near-minimax fits with the constant term pinned, printed with their errors by
    ``python benchmarks/kernel_polynomials.py``."""
    return 1.0 + u * (-0.49996882677078247 + u * (0.3314078450202942 + u * -0.21554484963417053))


@triton.jit
def _tanh_parts(z, lam):
    """(c, t = tanh(λ|z|)): through e = exp(−2u) ∈ (0, 1], u = λ|z|, no overflow for any u.  One
    reciprocal, of (1 + e)·λ, gives c = (1 − e)/((1 + e)·λ) directly (no 1/λ per element); t = ±λc
    also on the series branch (accurate to u⁷ there; only t² is used).  λ = 0: u = 0 takes the
    series, c = z (λ ≥ 1e-30 here: no 0/0 even where discarded)."""
    u = lam * tl.abs(z)
    e = _exp2(u * (-2.0 * _LOG2E))
    ca = _div(1.0 - e, e * lam + lam)
    u2 = u * u
    c = tl.where(u < _TANH_SMALL, z * (1.0 + u2 * (-1.0 / 3.0 + u2 * (2.0 / 15.0))), _copysign(ca, z))
    return c, lam * c


@triton.jit
def _log_parts(z, lam, inv):
    """(c, 1 + u, u = λ|z|)."""
    u = lam * tl.abs(z)
    w = 1.0 + u
    c = tl.where(u < _LOG_SMALL, z * _log1p_ratio(u), _copysign(_log2(w), z) * (_LN2 * inv))  # ln2·inv: loop-invariant for a program's λ
    return c, w, u


@triton.jit
def _power_parts(z, is_zero, p, inv):
    """(c, w = (1 + |z|)^p).  ((1+a)^p − 1)/p: the absolute error of w − 1 is an ulp of 1 for every a."""
    w = _exp2(p * _log2(1.0 + tl.abs(z)))
    c = tl.where(is_zero, z, _copysign(w - 1.0, z) * inv)
    return c, w


@triton.jit
def _compress_value(z, is_zero, lam_s, inv, OP: tl.constexpr):
    """c = s_λ(z).  For power ``lam_s`` is p and ``inv`` is 1/p; otherwise λ and 1/λ."""
    if OP == 0:
        c, t = _tanh_parts(z, lam_s)
    elif OP == 1:
        c, w, u = _log_parts(z, lam_s, inv)
    else:
        c, w = _power_parts(z, is_zero, lam_s, inv)
    return c


@triton.jit
def _compress_grad(z, is_zero, lam_s, inv, OP: tl.constexpr):
    """c and ∂s/∂z, with the exact λ = 0 limits."""
    if OP == 0:
        c, t = _tanh_parts(z, lam_s)
        ds = 1.0 - t * t
    elif OP == 1:
        c, w, u = _log_parts(z, lam_s, inv)
        ds = _div(1.0, w)
    else:
        c, w = _power_parts(z, is_zero, lam_s, inv)
        ds = tl.where(is_zero, 1.0, _div(w, 1.0 + tl.abs(z)))
    return c, ds


@triton.jit
def _compress_dlam(z, c, ds, is_zero, lam_s, inv, OP: tl.constexpr):
    """∂s/∂λ from z, c = s(z) and s'(z), with the λ = 0 limit (tanh's exactly 0 once summed).

    Computed after the row reductions from values that are live anyway, so it holds no registers
    across them.  The closed forms (z·s' − c)/λ cancel for small u = λ|z|: series there (at λ = 0,
    u = 0: 0 for tanh, −z|z|/2 for log, their λ = 0 limits).
    """
    a = tl.abs(z)
    if OP == 0:
        u = lam_s * a
        u2 = u * u
        # z·|z|·F'(u), F(u) = tanh(u)/u; F'(u)/u on u < 0.3 as a polynomial in u² (rel. error 1.6e-7)
        dF = u * (-2.0 / 3.0 + u2 * (0.5333223342895508 + u2 * (-0.32306551933288574 + u2 * 0.16046753525733948)))
        dl = tl.where(u < _TANH_DLAM_SMALL, z * a * dF, (z * ds - c) * inv)  # λ = 0: O(1e-30); see _tanh_dlam_limit
    elif OP == 1:
        u = lam_s * a
        # F'(u), F(u) = log1p(u)/u, on u < 0.25 (rel. error 2.0e-7; F'(0) = −1/2 exactly)
        dF = -0.5 + u * (0.6666557788848877 + u * (-0.7493781447410583 + u * (0.7881887555122375 + u * (
            -0.7319060564041138 + u * 0.42902225255966187))))
        dl = tl.where(u < _LOG_DLAM_SMALL, z * a * dF, (z * ds - c) * inv)
    else:
        # ∂s/∂λ = −sign(z)·((v − 1)e^v + 1), v = p·log1p(|z|), e^v = s'·(1 + |z|): O(v²), so small
        # |z| needs log1p to full relative precision and a series in v.
        w = ds * (1.0 + a)
        L = tl.where(a < 0.1, a * _log1p_ratio(a), _log2(1.0 + a) * _LN2)
        v = lam_s * L
        # At λ = 0 (p = 1, s' = 1 by select) v = L and w = 1 + |z|, so this is the λ = 0 limit
        # (1 + |z|)·L − |z| with no branch of its own.
        # ((v − 1)e^v + 1)/v² on v < 0.25 (rel. error 5.7e-7; the closed form past it: ~3e-6)
        g_small = v * v * (0.5 + v * (0.33335423469543457 + v * (0.12448818236589432 + v * 0.036840517073869705)))
        dl = -_copysign(tl.where(v < 0.25, g_small, w * v - (w - 1.0)), z)
    return dl


@triton.jit
def _tanh_dlam_limit(dl_acc, is_zero, OP: tl.constexpr):
    """tanh's ∂s/∂λ at λ = 0 is 0 (s = z − λ²z³/3 + …); with λ floored at 1e-30 the series leaves
    O(1e-30) terms, so the summed dλ of a zero (< 1e-30) λ is set to 0 once per program, not per
    element."""
    if OP == 0:
        dl_acc = tl.where(is_zero, 0.0, dl_acc)
    return dl_acc


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
    tl.store(s + 4, 0.0)  # mean z: 0 by construction (kept so the layout stays 32 bytes)
    tl.store(s + 5, vc)
    tl.store(s + 6, vz)
    tl.store(s + 7, k)


@triton.jit
def _row_scalars(STATS, row, delta, inv_n, CENTERED: tl.constexpr):
    """mean, rstd, μ_c, mean c, v_z, k and ∂k/∂v_c, ∂k/∂v_z (zero where the floor δ is active) × 1/N.
    mean z is 0 by construction (the forward's z is centred exactly in real arithmetic)."""
    s = STATS + row * 8
    mean = tl.load(s + 0)
    rstd = tl.load(s + 1)
    vc = tl.load(s + 5)
    vz = tl.load(s + 6)
    k = tl.load(s + 7)
    kc = tl.where(vc > delta, -k / vc, 0.0) * inv_n
    kz = tl.where(vz > delta, k / vz, 0.0) * inv_n
    if CENTERED:
        return mean, rstd, tl.load(s + 2), tl.load(s + 3), vz, k, kc, kz
    else:
        return mean, rstd, 0.0, 0.0, vz, k, kc, kz


@triton.jit
def _row_values(x, g, w, is_zero, lam_s, inv, mask, mean, rstd,
                CENTERED: tl.constexpr, OP: tl.constexpr, EVEN: tl.constexpr):
    """Recomputes z (0 where masked), c = s_λ(z) (uncentred), ∂s/∂z and γ·dy from x."""
    if CENTERED:
        z = (x - mean) * rstd  # not x·rstd − mean·rstd: that loses ulp(mean·rstd) on rows with a large mean
        if not EVEN:
            z = tl.where(mask, z, 0.0)
    else:
        z = x * rstd
    c, ds = _compress_grad(z, is_zero, lam_s, inv, OP)
    return z, c, ds, g * w


@triton.jit
def _centred(c, ds, cbar, mask, CENTERED: tl.constexpr, EVEN: tl.constexpr):
    """c − mean c and ∂s/∂z, 0 where masked: centred c keeps every row sum free of cancellation
    against mean(c), which is far from 0 when one channel dominates."""
    if CENTERED:
        c = c - cbar
        if not EVEN:
            c = tl.where(mask, c, 0.0)
            ds = tl.where(mask, ds, 0.0)
    return c, ds


@triton.jit
def _row_products(z, c, ds, gh, CENTERED: tl.constexpr):
    """The per-element terms of the row sums (c centred): eight (layer) or three (rms: slots 1, 3, 7)."""
    if CENTERED:
        gs = gh * ds
        cs = c * ds
        return gh, gh * c, gs, gs * z, ds, cs, ds * z, cs * z
    else:
        return gh * c, gh * ds * z, c * ds * z


@triton.jit
def _coefficients(s_g, s_gc, s_gs, s_gsz, s_s, s_cs, s_sz, s_csz, mu_c, cbar, vz, k, kc, kz, inv_n,
                  CENTERED: tl.constexpr):
    """Row scalars of the backward from the sums of ``_row_products`` (c centred).

    The chain rule needs mean(dz) and mean(dz·z) of a dz that itself depends on Σ gh·c; both are
    expanded into sums available in the same pass.  Returns (mg, α, β, mean dz, m1) such that
    dc = γdy·k − mg + α·(c − mean c), dz = mg + β·z + dc·s', dx = rstd·(dz − mean dz − z·m1).
    """
    n = 1.0 / inv_n
    if CENTERED:
        mg = k * s_g * inv_n  # gradient through μ_c, per element
        sk = s_gc + (cbar - mu_c) * s_g  # Σ gh·(c − μ_c)
        alpha = sk * kc
        beta = sk * kz
        mean_dz = (n * mg + k * s_gs - mg * s_s + alpha * s_cs) * inv_n
        m1 = (beta * n * vz + k * s_gsz - mg * s_sz + alpha * s_csz) * inv_n
    else:
        mg = 0.0
        alpha = s_gc * kc
        beta = s_gc * kz
        mean_dz = 0.0
        m1 = (beta * n * vz + k * s_gsz + alpha * s_csz) * inv_n
    return mg, alpha, beta, mean_dz, m1


@triton.jit
def _row_outputs(z, c, ds, gh, rstd, k, alpha, c0, e0, e1, chat0):
    """dx (fp32), ĉ = (c − μ_c)·k and dc from the uncentred c, with the row's constants folded
    (``_output_constants``) so each is two or three fused multiply-adds per element."""
    dc = gh * k + (alpha * c + c0)
    dx = (dc * ds) * rstd + (e1 * z + e0)
    return dx, c * k + chat0, dc


@triton.jit
def _output_constants(rstd, mu_c, cbar, k, mg, alpha, beta, mean_dz, m1):
    """(c0, e0, e1, ĉ0) of ``_row_outputs``: dc = γdy·k + α·c + c0, dx = rstd·dc·s' + e1·z + e0."""
    return -(mg + alpha * cbar), rstd * (mg - mean_dz), rstd * (beta - m1), -mu_c * k


@triton.jit
def _row_two_rounds(z, c, ds, gh, mask, rstd, mu_c, cbar, k, kc, kz, inv_n,
                    CENTERED: tl.constexpr, EVEN: tl.constexpr):
    """dx, ĉ and dc with the chain rule's two row reductions done as two rounds (values live; c centred)."""
    if CENTERED:
        s_g, s_gc = tl.reduce((gh, gh * c), 0, _add2)
        mg = k * s_g * inv_n
        sk = s_gc + (cbar - mu_c) * s_g  # Σ gh·(c − μ_c)
        dc = gh * k - mg + (sk * kc) * c
        dz = mg + (sk * kz) * z + dc * ds
        if not EVEN:
            dz = tl.where(mask, dz, 0.0)
        s_dz, s_dzz = tl.reduce((dz, dz * z), 0, _add2)
        dx = rstd * (dz - s_dz * inv_n - z * (s_dzz * inv_n))
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
    BLOCK: tl.constexpr, PREFETCH: tl.constexpr,
):
    """The one-block backward (rows up to 8192 columns): a row's values stay in registers across
    its two reductions.  PREFETCH: issue the loads of the program's next row before working on
    this one, so their latency overlaps this row's arithmetic (one program per SM has no other
    work to hide it)."""
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
        mean, rstd, mu_c, cbar, vz, k, kc, kz = _row_scalars(STATS, row, delta, inv_n, CENTERED)
        z, cu, ds, gh = _row_values(x, g, w, is_zero, lam_s, inv, mask, mean, rstd, CENTERED, OP, EVEN)
        c, ds = _centred(cu, ds, cbar, mask, CENTERED, EVEN)
        dx, chat, dc = _row_two_rounds(z, c, ds, gh, mask, rstd, mu_c, cbar, k, kc, kz, inv_n, CENTERED, EVEN)
        dw_acc, db_acc, dl_acc = _row_finish(DX + row * stride_dx + cols, mask, dx, g, chat, dc, z, cu, ds, is_zero,
                                             lam_s, inv, dw_acc, db_acc, dl_acc, OP, NEED_DX, NEED_DW, NEED_DB, NEED_DLAM)
    if NEED_DLAM:
        if LAM_PER_CHANNEL:
            is_zero, lam_s, inv = _lam_per_row(LAM, cols, mask, OP)
        dl_acc = _tanh_dlam_limit(dl_acc, is_zero, OP)
    _store_partials(PART, pid, cols, mask, dw_acc, db_acc, dl_acc, N, NEED_DW + NEED_DB + NEED_DLAM, NEED_DW, NEED_DB,
                    NEED_DLAM)


@triton.jit
def _row_finish(dx_ptrs, mask, dx, g, chat, dc, z, c, ds, is_zero, lam_s, inv, dw_acc, db_acc, dl_acc,
                OP: tl.constexpr, NEED_DX: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
                NEED_DLAM: tl.constexpr):
    """Writes a row's dx and adds its dγ, dβ, dλ terms (c uncentred: ∂s/∂λ wants s(z) itself)."""
    if NEED_DX:
        tl.store(dx_ptrs, dx.to(dx_ptrs.dtype.element_ty), mask=mask)
    if NEED_DW:
        dw_acc += g * chat
    if NEED_DB:
        db_acc += g
    if NEED_DLAM:
        dl_acc += dc * _compress_dlam(z, c, ds, is_zero, lam_s, inv, OP)
    return dw_acc, db_acc, dl_acc


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
def ibnorm_row_sums_kernel(
    X, DY, W, LAM, STATS, COEF,
    stride_x, stride_dy, delta, N: tl.constexpr,
    HAS_W: tl.constexpr, LAM_PER_CHANNEL: tl.constexpr, CENTERED: tl.constexpr, OP: tl.constexpr,
    CHUNK: tl.constexpr,
):
    """Split backward, pass 1 (wide rows): one program per row walks x and dy in CHUNK-column steps,
    keeps the products of ``_row_products`` as per-thread vectors, reduces them once, and writes
    all pass 2 needs of the row to COEF (8 fp32: mean, rstd, k, α, c0, e0, e1, ĉ0).  It holds no
    per-column state across rows, so no width spills."""
    EVEN: tl.constexpr = N % CHUNK == 0
    row = tl.program_id(0).to(tl.int64)
    inv_n = 1.0 / N
    mean, rstd, mu_c, cbar, vz, k, kc, kz = _row_scalars(STATS, row, delta, inv_n, CENTERED)
    if not LAM_PER_CHANNEL:  # a per-channel λ is loaded per chunk
        is_zero, lam_s, inv = _lam_scalars(tl.load(LAM), OP)
    cols0 = tl.arange(0, CHUNK)
    a0 = tl.zeros((CHUNK,), dtype=tl.float32)
    a1 = tl.zeros((CHUNK,), dtype=tl.float32)
    a2 = tl.zeros((CHUNK,), dtype=tl.float32)
    a3 = tl.zeros((CHUNK,), dtype=tl.float32)
    a4 = tl.zeros((CHUNK,), dtype=tl.float32)
    a5 = tl.zeros((CHUNK,), dtype=tl.float32)
    a6 = tl.zeros((CHUNK,), dtype=tl.float32)
    a7 = tl.zeros((CHUNK,), dtype=tl.float32)
    for start in tl.range(0, N, CHUNK):
        cols = start + cols0
        mask = cols < N
        if LAM_PER_CHANNEL:
            iz, ls, iv = _lam_per_row(LAM, cols, mask, OP)
        else:
            iz, ls, iv = is_zero, lam_s, inv
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) if HAS_W else 1.0
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        z, c, ds, gh = _row_values(x, g, w, iz, ls, iv, mask, mean, rstd, CENTERED, OP, EVEN)
        c, ds = _centred(c, ds, cbar, mask, CENTERED, EVEN)
        if CENTERED:
            p0, p1, p2, p3, p4, p5, p6, p7 = _row_products(z, c, ds, gh, CENTERED)
            a0, a1, a2, a3, a4, a5, a6, a7 = _add8(a0, a1, a2, a3, a4, a5, a6, a7, p0, p1, p2, p3, p4, p5, p6, p7)
        else:
            p1, p3, p7 = _row_products(z, c, ds, gh, CENTERED)
            a1, a3, a7 = _add3(a1, a3, a7, p1, p3, p7)
    if CENTERED:
        s0, s1, s2, s3, s4, s5, s6, s7 = tl.reduce((a0, a1, a2, a3, a4, a5, a6, a7), 0, _add8)
    else:
        s1, s3, s7 = tl.reduce((a1, a3, a7), 0, _add3)
        s0, s2, s4, s5, s6 = 0.0, 0.0, 0.0, 0.0, 0.0
    mg, alpha, beta, mean_dz, m1 = _coefficients(s0, s1, s2, s3, s4, s5, s6, s7, mu_c, cbar, vz, k, kc, kz, inv_n,
                                                 CENTERED)
    c0, e0, e1, chat0 = _output_constants(rstd, mu_c, cbar, k, mg, alpha, beta, mean_dz, m1)
    out = COEF + row * 8
    tl.store(out + 0, mean)
    tl.store(out + 1, rstd)
    tl.store(out + 2, k)
    tl.store(out + 3, alpha)
    tl.store(out + 4, c0)
    tl.store(out + 5, e0)
    tl.store(out + 6, e1)
    tl.store(out + 7, chat0)


@triton.jit
def ibnorm_row_tiles_bwd_kernel(
    X, DY, DX, W, LAM, COEF, PART,
    stride_x, stride_dy, stride_dx, M, rows_per_program, N: tl.constexpr,
    HAS_W: tl.constexpr, LAM_PER_CHANNEL: tl.constexpr, CENTERED: tl.constexpr, OP: tl.constexpr,
    NEED_DX: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr, NEED_DLAM: tl.constexpr,
    TILE: tl.constexpr,
):
    """Split backward, pass 2: program (t, r) owns columns [t·TILE, (t+1)·TILE) of the rows in block r.
    With the row constants of pass 1 every element is independent: it writes dx and keeps dγ,
    dβ, dλ for its TILE columns only (a few registers at any width); no reductions, no barriers.
    γ and a per-channel λ's reciprocals are loaded once per program, not once per row."""
    EVEN: tl.constexpr = N % TILE == 0
    K: tl.constexpr = NEED_DW + NEED_DB + NEED_DLAM
    block_id = tl.program_id(1)
    cols = tl.program_id(0) * TILE + tl.arange(0, TILE)
    mask = cols < N
    if LAM_PER_CHANNEL:
        is_zero, lam_s, inv = _lam_per_row(LAM, cols, mask, OP)
    else:
        is_zero, lam_s, inv = _lam_scalars(tl.load(LAM), OP)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) if HAS_W else 1.0
    dw_acc = tl.zeros((TILE,), dtype=tl.float32)
    db_acc = tl.zeros((TILE,), dtype=tl.float32)
    dl_acc = tl.zeros((TILE,), dtype=tl.float32)
    first = block_id.to(tl.int64) * rows_per_program
    for i in tl.range(0, tl.minimum(rows_per_program, M - first)):
        row = first + i
        co = COEF + row * 8  # one 32-byte record: the loads may merge
        mean = tl.load(co + 0) if CENTERED else 0.0
        rstd, k, alpha = tl.load(co + 1), tl.load(co + 2), tl.load(co + 3)
        c0, e0, e1, chat0 = tl.load(co + 4), tl.load(co + 5), tl.load(co + 6), tl.load(co + 7)
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
        g = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
        z, c, ds, gh = _row_values(x, g, w, is_zero, lam_s, inv, mask, mean, rstd, CENTERED, OP, EVEN)
        dx, chat, dc = _row_outputs(z, c, ds, gh, rstd, k, alpha, c0, e0, e1, chat0)
        dw_acc, db_acc, dl_acc = _row_finish(DX + row * stride_dx + cols, mask, dx, g, chat, dc, z, c, ds, is_zero,
                                             lam_s, inv, dw_acc, db_acc, dl_acc, OP, NEED_DX, NEED_DW, NEED_DB, NEED_DLAM)
    dl_acc = _tanh_dlam_limit(dl_acc, is_zero, OP)
    _store_partials(PART, block_id, cols, mask, dw_acc, db_acc, dl_acc, N, K, NEED_DW, NEED_DB, NEED_DLAM)
