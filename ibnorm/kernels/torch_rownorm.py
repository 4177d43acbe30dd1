"""Row-wise IBNorm (rms, layer) with few torch ops: self-contained (torch only).

The reference (``ibnorm.functional``) is written for clarity and for exact λ-gradients: per
call it runs some fifty small elementwise ops (series branches, straight-through λ, the λ = 0
branch).  This form computes the same function with about a dozen ops:

* z and its variance from one reduction (``vector_norm``) and one pass (two when centred); the
  variance of z is v/(v + ε) analytically, so z is never reduced again;
* s_λ from its closed form with constants derived once per λ tensor and cached until λ changes:
  tanh through torch's (much faster) sigmoid when every positive λ ≥ 0.05, log1p for log,
  exp(p·log1p|z|) for power; λ = 0 channels come out as exactly z (``c + 1·z`` with c = 0);
* step 4 from one more reduction of c, with the reference's floors (√max(v, δ)), and the affine.

A layer whose λ is 0 everywhere skips steps 3–4 and runs the reference's own ops, so it equals
the reference — and the source norm — bit for bit.  λ gradients are not provided (a λ that
requires grad takes the reference, which has the exact derivative at λ = 0); gradients with
respect to x, γ and β flow through the torch ops as usual.

It imports nothing but torch because it is also shipped, unchanged, next to the modeling code of
every converted transformers model (``ibnorm/hf``), where ibnorm may not be installed.  Inside
ibnorm it is the CPU form where the fused C function does not serve (training, no compiler).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

# Floor under the variances of step 4, as ibnorm.functional (tested equal): guards constant and zero rows.
RESTANDARDIZE_FLOOR = 1e-12

# Below this λ the closed forms lose precision to underflow of λ·z; the reference's series serves.
_TINY_LAM = 1e-20
# tanh through the logistic function (torch's tanh is ~6× slower than its sigmoid on CPU, expm1 ~10×)
# has an absolute error ∝ 1/λ in s_λ(z) (cancellation in (2/λ)·σ(2λz) − 1/λ; measured over |z| ≤ 12:
# 3.9e-6 at λ = 0.05 on outputs of unit variance; float32 models, bf16 rounds at 4e-3): it serves
# the channels with λ ≥ this.  A layer with a few smaller λ (calibrated layers after a back-off:
# 0.2% of SmolLM2's channels) recomputes those channels with torch's tanh; a layer with many takes
# the "series" form: a polynomial where λ|z| is small, the logistic form elsewhere.
LOGISTIC_MIN_LAM = 0.05
# At most this fraction of a layer's channels is recomputed exactly; above it the series form serves.
_FIX_MAX_FRACTION = 0.25
OPS = ("tanh", "log", "power")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class LamConstants:
    """What s_λ needs, derived once from one λ tensor (scalar or per channel), in the compute dtype.

    λ = 0 channels get ``a = 0`` and ``b = 0`` (their compressed value is 0) and ``keep = 1``, so
    ``c + keep·z`` is exactly z there; other channels have ``keep = 0``.
    """

    all_zero: bool
    form: str = ""  # tanh: "logistic" | "series"; log; power
    scale: Tensor | None = None  # what multiplies z (or log1p|z| for power) inside the function
    a: Tensor | None = None  # outer multiplier
    b: Tensor | None = None  # outer offset
    keep: Tensor | None = None  # 1 on λ = 0 channels; None when there are none
    lam32: Tensor | None = None  # effective λ, flat contiguous float32 (for ibnorm's fused C function)
    lam: Tensor | None = None  # effective λ in the compute dtype ("series" form: u = λ|z|)
    fix: Tensor | None = None  # logistic form: channels (last dim) with 0 < λ < LOGISTIC_MIN_LAM
    fix_lam: Tensor | None = None  # their λ


# Keyed by the λ tensor itself (by identity, dropped when the tensor dies); the value records the
# tensor's version and storage so in-place updates (project_lambdas, set_lambda, .data =) invalidate it.
_CACHE: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _derive(lam: Tensor, op: str, ct: torch.dtype, logistic_min: float) -> LamConstants | None:
    eff = lam.detach().to(ct).clamp_min(0.0)
    is_zero = eff == 0
    if bool(is_zero.all()):
        return LamConstants(True)
    if bool(((eff > 0) & (eff < _TINY_LAM)).any()):
        return None
    safe = torch.where(is_zero, torch.ones_like(eff), eff)
    live = (~is_zero).to(ct)
    keep = is_zero.to(ct) if bool(is_zero.any()) else None
    lam32 = eff.to(torch.float32).reshape(-1).contiguous()
    if op == "tanh":
        # tanh(λz)/λ = σ(2λz)·(2/λ) − 1/λ
        logistic = (2.0 * safe, 2.0 * live / safe, -live / safe, keep, lam32)
        small = (eff > 0) & (eff < logistic_min)
        if not bool(small.any()):
            return LamConstants(False, "logistic", *logistic)
        if eff.dim() == 1 and float(small.to(torch.float32).mean()) <= _FIX_MAX_FRACTION:
            fix = small.nonzero().flatten()
            return LamConstants(False, "logistic", *logistic, fix=fix, fix_lam=eff[fix])
        # Some λ below the logistic form's range: the series z(1 − u²/3 + 2u⁴/15 − 17u⁶/315) where
        # u = λ|z| < 0.2 (λ = 0 channels are there: exactly z, so no ``keep``), the logistic form above,
        # where its absolute error 6e-8/λ is < 3e-7 of |c|.  (torch's expm1 and tanh are scalar loops
        # on CPU, 10× and 6× its sigmoid: the expm1 form made prefill 4-8% slower.)
        return LamConstants(False, "series", 2.0 * safe, 2.0 * live / safe, -live / safe, None, lam32, eff)
    if op == "log":
        return LamConstants(False, "log", safe, live / safe, None, keep, lam32)
    p = 1.0 / (1.0 + safe)  # power: (exp(p·log1p|z|) − 1)/p; no cancellation trouble since p ≥ 1/(1+λ)
    return LamConstants(False, "power", p, live / p, -live / p, keep, lam32)


def lam_constants(lam: Tensor, op: str, ct: torch.dtype, logistic_min: float = LOGISTIC_MIN_LAM) -> LamConstants | None:
    """Cached constants for ``lam``; None when this λ needs the reference (tiny positive λ)."""
    if lam.is_inference():  # no version counter to detect in-place changes: derive every time
        return _derive(lam, op, ct, logistic_min)
    key = (lam._version, lam.data_ptr(), lam.device, op, ct, logistic_min)
    hit = _CACHE.get(lam)
    if hit is not None and hit[0] == key:
        return hit[1]
    consts = _derive(lam, op, ct, logistic_min)
    _CACHE[lam] = (key, consts)
    return consts


def _no_grad_needed(*ts: Tensor) -> bool:
    return not torch.is_grad_enabled() or not any(t.requires_grad for t in ts)


def compress_fast(z: Tensor, k: LamConstants) -> Tensor:
    """s_λ(z) from the closed forms with the constants ``k``; λ = 0 channels are z exactly.

    Without autograd the steps run in place (fewer allocations and passes over memory).
    """
    ip = _no_grad_needed(z)
    if k.form == "logistic":
        s = z * k.scale
        s = s.sigmoid_() if ip else s.sigmoid()
        c = torch.addcmul(k.b, s, k.a)
        if k.fix is not None:  # the few channels with a small λ: torch's tanh, exact to an ulp
            exact = torch.tanh(z.index_select(-1, k.fix) * k.fix_lam) / k.fix_lam
            c = c.index_copy_(-1, k.fix, exact) if ip else c.index_copy(-1, k.fix, exact)
    elif k.form == "series":
        c = _tanh_series_or_logistic(z, k, ip)
    elif k.form == "log":
        t = z.abs().mul_(k.scale).log1p_().mul_(k.a) if ip else (z.abs() * k.scale).log1p() * k.a
        c = torch.copysign(t, z)
    else:  # power
        e = z.abs().log1p_().mul_(k.scale).exp_() if ip else ((z.abs().log1p()) * k.scale).exp()
        c = torch.copysign(torch.addcmul(k.b, e, k.a), z)
    if k.keep is not None:  # c is exactly 0 on λ = 0 channels: adding z there gives z bit for bit
        c = c.addcmul_(z, k.keep) if ip else torch.addcmul(c, z, k.keep)
    return c


_SERIES_MAX_U = 0.2


_STEP = 2.0**-100  # the blend weight below rises from 0 to 1 within this much of u² = 0.04


def _tanh_series_or_logistic(z: Tensor, k: LamConstants, ip: bool) -> Tensor:
    """tanh(λz)/λ: the series where u = λ|z| < 0.2, the logistic form elsewhere (λ = 0 gives z).

    The two are joined by a weight of exactly 1 or 0 (fractional only within 2⁻¹⁰⁰ of the seam,
    where both forms are accurate) and ``lerp``, which returns either end exactly: comparisons and
    ``torch.where`` are scalar loops on CPU (1 ms here, more than the rest of the layer).
    """
    u2 = z.square() * k.lam.square()
    weight = (_SERIES_MAX_U**2 - u2).clamp_(0.0, _STEP).mul_(1.0 / _STEP)
    if ip:  # no autograd: the polynomial in place
        series = u2.mul_(-17.0 / 315.0).add_(2.0 / 15.0)
        series = series.mul_(z).mul_(z).mul_(k.lam.square()).sub_(1.0 / 3.0)
        series = series.mul_(z).mul_(z).mul_(k.lam.square()).add_(1.0).mul_(z)
        logistic = (z * k.scale).sigmoid_().mul_(k.a).add_(k.b)
    else:
        series = z * (1.0 + u2 * (-1.0 / 3.0 + u2 * (2.0 / 15.0 - 17.0 / 315.0 * u2)))
        logistic = (z * k.scale).sigmoid() * k.a + k.b
    return torch.lerp(logistic, series, weight)


def _exact_lambda_zero(xf: Tensor, dims: tuple[int, ...], weight: Tensor | None, bias: Tensor | None, eps: float,
                       centered: bool) -> Tensor:
    # The reference's own ops at λ = 0 (where steps 3–4 are the identity), hence bit-equal to it.
    d = xf - xf.mean(dims, keepdim=True) if centered else xf
    y = d * torch.rsqrt(d.square().mean(dims, keepdim=True) + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


def row_norm(
    x: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None,
    bias: Tensor | None,
    lam: Tensor,
    op: str,
    eps: float,
    centered: bool,
    consts: LamConstants | None = None,
) -> Tensor | None:
    """Row-wise IBNorm as ``ibnorm.functional.ib_row_norm``; None when the reference must serve.

    ``consts`` are ``lam_constants(lam, op, compute_dtype(x.dtype))`` when the caller has them."""
    shape = tuple(normalized_shape)
    ct = compute_dtype(x.dtype)
    consts = lam_constants(lam, op, ct) if consts is None else consts
    if consts is None:
        return None
    dims = tuple(range(-len(shape), 0))
    xf = x.to(ct)
    w = weight.to(ct) if weight is not None else None
    b = bias.to(ct) if bias is not None else None
    if consts.all_zero:
        return _exact_lambda_zero(xf, dims, w, b, eps, centered).to(x.dtype)
    ip = _no_grad_needed(x, *(t for t in (weight, bias) if t is not None))
    z, var_z = _standardize(xf, dims, eps, centered, ip)
    c = compress_fast(z, consts)
    y = _restandardize(c, var_z, dims, centered, ip)  # ĉ · σ_z/σ_c, floors as the reference
    if w is not None:
        y = y.mul_(w) if ip else y * w
    if b is not None:
        y = y.add_(b) if ip else y + b
    return y.to(x.dtype)


def _row_var(d: Tensor, dims: tuple[int, ...]) -> Tensor:
    # One read of d.  (torch.var_mean is a scalar Welford loop on CPU, ~20× slower than this.)
    n = math.prod(d.shape[i] for i in dims)
    return torch.linalg.vector_norm(d, 2, dims, keepdim=True).square() / n


def _standardize(xf: Tensor, dims: tuple[int, ...], eps: float, centered: bool, ip: bool) -> tuple[Tensor, Tensor]:
    """z and its row variance, which is v/(v + ε) for the row's variance v: no pass over z needed."""
    d = xf - xf.mean(dims, keepdim=True) if centered else xf
    var = _row_var(d, dims)
    r = (var + eps).rsqrt()
    z = d.mul_(r) if (ip and centered) else d * r
    return z, var * r * r


def _restandardize(c: Tensor, var_z: Tensor, dims: tuple[int, ...], centered: bool, ip: bool) -> Tensor:
    if centered:
        c = c - c.mean(dims, keepdim=True)
    k = var_z.clamp_min(RESTANDARDIZE_FLOOR).sqrt() / _row_var(c, dims).clamp_min(RESTANDARDIZE_FLOOR).sqrt()
    return c.mul_(k) if (ip and centered) else c * k
