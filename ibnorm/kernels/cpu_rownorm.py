"""Row-wise IBNorm (rms, layer) with few torch ops: the fast path on CPU.

The reference (``ibnorm.functional``) is written for clarity and for exact λ-gradients: per
call it runs some fifty small elementwise ops (series branches, straight-through λ, the λ = 0
branch).  During CPU decoding the input is one token per sequence, so the norm's cost is the
number of ops, not the arithmetic.  This form computes the same function with about a dozen:

* statistics and z by torch's fused ``rms_norm`` / ``layer_norm`` (one op each);
* s_λ from its closed form with constants derived once per λ tensor (λ, 1/λ, p, 1/p, the λ = 0
  channels) and cached until λ changes;
* step 4 by a second fused norm of c, multiplied by σ_z (the floor δ enters as the fused norm's
  ε, i.e. √(v + δ) for √max(v, δ): identical unless a row's variance is within a few δ = 1e-12
  of zero, where both are bounded and the output is ~1e-6 · γ).

A layer whose λ is 0 everywhere skips steps 3–4 and runs the reference's own ops, so it equals
the reference — and the source norm — bit for bit.  λ gradients are not provided: a λ that
requires grad (fine-tuning λ) takes the reference, which has the exact derivative at λ = 0.
Gradients with respect to x, γ and β flow through the torch ops as usual.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from ..functional import RESTANDARDIZE_FLOOR, compute_dtype

# Below this λ the closed forms lose precision to underflow of λ·z; the reference's series serves.
_TINY_LAM = 1e-20
_OPS = ("tanh", "log", "power")


@dataclass(frozen=True)
class _LamConsts:
    """What s_λ needs, derived from one λ tensor (scalar or per channel), in the compute dtype."""

    all_zero: bool
    scale: Tensor | None  # tanh/log: λ; power: p = 1/(1+λ)   (λ = 0 channels: 1, masked below)
    inv: Tensor | None  # 1/scale
    zero_mask: Tensor | None  # channels with λ = 0, where c must be z exactly; None if there are none


# Keyed by the λ tensor itself (by identity, dropped when the tensor dies); the value records the
# tensor's version and storage so in-place updates (project_lambdas, set_lambda, .data =) invalidate it.
_CACHE: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _derive(lam: Tensor, op: str, ct: torch.dtype) -> _LamConsts | None:
    eff = lam.detach().to(ct).clamp_min(0.0)
    is_zero = eff == 0
    if bool(is_zero.all()):
        return _LamConsts(True, None, None, None)
    if bool(((eff > 0) & (eff < _TINY_LAM)).any()):
        return None
    safe = torch.where(is_zero, torch.ones_like(eff), eff)
    scale = 1.0 / (1.0 + safe) if op == "power" else safe
    mask = is_zero if bool(is_zero.any()) else None
    return _LamConsts(False, scale, 1.0 / scale, mask)


def lam_constants(lam: Tensor, op: str, ct: torch.dtype) -> _LamConsts | None:
    """Cached constants for ``lam``; None when this λ needs the reference (tiny positive λ)."""
    key = (lam._version, lam.data_ptr(), lam.device, op, ct)
    hit = _CACHE.get(lam)
    if hit is not None and hit[0] == key:
        return hit[1]
    consts = _derive(lam, op, ct)
    _CACHE[lam] = (key, consts)
    return consts


def supported(x: Tensor, lam: Tensor, op: str) -> bool:
    """Whether the fast form serves this call (otherwise the reference does)."""
    if op not in _OPS or not x.is_floating_point():
        return False
    # λ-gradients need the reference's exact derivative at λ = 0.
    return not (lam.requires_grad and torch.is_grad_enabled())


def compress_fast(z: Tensor, consts: _LamConsts, op: str) -> Tensor:
    """s_λ(z) for λ > 0 channels from the closed forms; λ = 0 channels are z exactly."""
    # In-place steps save allocations but would break autograd (tanh/log1p/expm1 save their values).
    ip = not (torch.is_grad_enabled() and z.requires_grad)
    if op == "tanh":
        t = z * consts.scale
        c = t.tanh_().mul_(consts.inv) if ip else t.tanh() * consts.inv
    else:
        a = z.abs()
        if op == "log":
            t = a.mul_(consts.scale).log1p_().mul_(consts.inv) if ip else (a * consts.scale).log1p() * consts.inv
        else:  # power: ((1+|z|)^p − 1)/p
            t = a.log1p_().mul_(consts.scale).expm1_().mul_(consts.inv) if ip else (a.log1p() * consts.scale).expm1() * consts.inv
        c = torch.copysign(t, z)
    if consts.zero_mask is not None:
        c = torch.where(consts.zero_mask, z, c)
    return c


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
) -> Tensor | None:
    """Row-wise IBNorm as ``ibnorm.functional.ib_row_norm``; None when the reference must serve."""
    shape = tuple(normalized_shape)
    ct = compute_dtype(x.dtype)
    consts = lam_constants(lam, op, ct)
    if consts is None:
        return None
    dims = tuple(range(-len(shape), 0))
    xf = x.to(ct)
    w = weight.to(ct) if weight is not None else None
    b = bias.to(ct) if bias is not None else None
    if consts.all_zero:
        return _exact_lambda_zero(xf, dims, w, b, eps, centered).to(x.dtype)
    if centered:
        z = F.layer_norm(xf, shape, None, None, eps)
        sz = z.var(dims, unbiased=False, keepdim=True)
    else:
        z = F.rms_norm(xf, shape, None, eps)
        sz = z.square().mean(dims, keepdim=True)
    sz = sz.clamp_min(RESTANDARDIZE_FLOOR).sqrt()
    c = compress_fast(z, consts, op)
    # ĉ·σ_z/σ_c: a fused norm of c (its ε plays the floor δ), times σ_z.
    y = F.layer_norm(c, shape, None, None, RESTANDARDIZE_FLOOR) if centered else F.rms_norm(c, shape, None, RESTANDARDIZE_FLOOR)
    y = y.mul_(sz) if not (torch.is_grad_enabled() and y.requires_grad) else y * sz
    if centered and b is not None and w is not None:
        y = torch.addcmul(b, y, w)
    else:
        y = _affine(y, w, b)
    return y.to(x.dtype)


def _affine(y: Tensor, w: Tensor | None, b: Tensor | None) -> Tensor:
    if w is not None:
        y = y * w
    if b is not None:
        y = y + b
    return y

