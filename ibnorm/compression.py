"""Bounded compression operations s_λ(z) — the reference math.

Every op is odd, monotone, has slope 1 at z = 0 and tends to the identity as λ → 0.
Each is written as ``s(z) = z · r(|z|)`` with a ratio ``r`` that is evaluated by a
series near 0, so the value and the gradients are finite at z = 0.  λ = 0 is a
separate branch, ``z + λ · ∂s/∂λ|_{λ=0}``: its value is *exactly* z (so a
converted layer equals its source norm bit for bit up to step 4), and its
gradient with respect to λ is the exact derivative at 0, so a learnable λ that
starts at 0 can move (for ``log`` and ``power``; ``tanh`` is flat in λ at 0).

The formulas are this project's instantiation of IBNorm-T/-L/-S (see docs/math.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

# Below this argument the ratios use a truncated series (error < 1e-12 in float64).
_SERIES_CUTOFF = 1e-4


def _where_small(u: Tensor, series: Tensor, exact: Callable[[Tensor], Tensor]) -> Tensor:
    small = u < _SERIES_CUTOFF
    u_safe = torch.where(small, torch.ones_like(u), u)  # keeps the unused branch NaN-free
    return torch.where(small, series, exact(u_safe))


def _tanh_ratio(lam: Tensor, a: Tensor) -> Tensor:
    """tanh(λa) / (λa)."""
    u = lam * a
    return _where_small(u, 1.0 - u * u / 3.0, lambda v: torch.tanh(v) / v)


def _log_ratio(lam: Tensor, a: Tensor) -> Tensor:
    """log(1 + λa) / (λa)."""
    u = lam * a
    return _where_small(u, 1.0 - u / 2.0 + u * u / 3.0, lambda v: torch.log1p(v) / v)


def _power_ratio(lam: Tensor, a: Tensor) -> Tensor:
    """((1 + a)^p − 1) / (p·a) with p = 1 / (1 + λ)."""
    p = 1.0 / (1.0 + lam)
    series = 1.0 + (p - 1.0) * a / 2.0 + (p - 1.0) * (p - 2.0) * a * a / 6.0
    return _where_small(a, series, lambda v: torch.expm1(p * torch.log1p(v)) / (p * v))


# ∂s/∂λ at λ = 0, as a function of z.
def _tanh_dlam0(z: Tensor) -> Tensor:
    return torch.zeros_like(z)


def _log_dlam0(z: Tensor) -> Tensor:
    return -0.5 * z * z.abs()


def _power_dlam0(z: Tensor) -> Tensor:
    a = z.abs()
    # d/dλ [((1+a)^p − 1)/p] at p = 1, times dp/dλ = −1.
    return -torch.sign(z) * ((1.0 + a) * torch.log1p(a) - a)


@dataclass(frozen=True)
class CompressionOp:
    name: str
    paper_name: str
    formula: str
    ratio: Callable[[Tensor, Tensor], Tensor]
    dlam_at_zero: Callable[[Tensor], Tensor]


COMPRESSION_OPS: dict[str, CompressionOp] = {
    op.name: op
    for op in (
        CompressionOp("tanh", "IBNorm-T", "tanh(λz)/λ", _tanh_ratio, _tanh_dlam0),
        CompressionOp("log", "IBNorm-L", "sign(z)·log(1+λ|z|)/λ", _log_ratio, _log_dlam0),
        CompressionOp(
            "power", "IBNorm-S", "sign(z)·((1+|z|)^p − 1)/p, p = 1/(1+λ)", _power_ratio, _power_dlam0
        ),
    )
}


def get_op(op: str) -> CompressionOp:
    try:
        return COMPRESSION_OPS[op]
    except KeyError:
        raise ValueError(f"unknown compression op {op!r}; choose one of {', '.join(COMPRESSION_OPS)}") from None


def compress(z: Tensor, lam: Tensor | float, op: str = "tanh") -> Tensor:
    """Apply s_λ elementwise; ``lam`` broadcasts against ``z`` (scalar or per channel)."""
    spec = get_op(op)
    lam = torch.as_tensor(lam, dtype=z.dtype, device=z.device)
    # Effective λ = max(λ, 0) with a straight-through gradient: torch's clamp has zero
    # gradient at exactly 0, which would pin a learnable λ that starts there.
    lam = lam + (lam.clamp_min(0.0) - lam).detach()
    is_zero = lam == 0
    lam_safe = torch.where(is_zero, torch.ones_like(lam), lam)
    general = z * spec.ratio(lam_safe, z.abs())
    at_zero = z + lam * spec.dlam_at_zero(z)
    return torch.where(is_zero, at_zero, general)
