"""Functional IBNorm — the reference implementation every kernel is tested against.

Steps (docs/math.md): 1. centre (not for rms), 2. scale-normalize to z,
3. compress c = s_λ(z), 4. re-standardize c to the spread of z, 5. affine.
Statistics are computed in float32 (or float64 for float64 inputs) and the
result is returned in the input dtype.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .compression import compress

# Floor under the square roots of step 4: guards constant and zero groups.
RESTANDARDIZE_FLOOR = 1e-12


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32



def restandardize(z: Tensor, c: Tensor, dims: Sequence[int], centered: bool) -> Tensor:
    """Step 4 from batch statistics: ĉ = (c − μ_c) · σ_z / σ_c over ``dims``.

    μ_c is taken as mean(c − z): equal to mean(c) in exact arithmetic because z is
    already centred, and exactly 0 when c == z, so the step is the identity at λ = 0.
    For rms (``centered=False``) μ_c = 0 and mean squares replace variances.
    """
    dims = tuple(dims)
    if centered:
        mu_c = (c - z).mean(dims, keepdim=True)
        var_c = (c - c.mean(dims, keepdim=True)).square().mean(dims, keepdim=True)
        var_z = (z - z.mean(dims, keepdim=True)).square().mean(dims, keepdim=True)
        c = c - mu_c
    else:
        var_c = c.square().mean(dims, keepdim=True)
        var_z = z.square().mean(dims, keepdim=True)
    return c * spread_ratio(var_z, var_c)


def spread_ratio(var_z: Tensor, var_c: Tensor) -> Tensor:
    """σ_z / σ_c with the floor δ under both variances (step 4)."""
    return torch.sqrt(var_z.clamp_min(RESTANDARDIZE_FLOOR)) / torch.sqrt(var_c.clamp_min(RESTANDARDIZE_FLOOR))


def _normalized_dims(x: Tensor, normalized_shape: Sequence[int]) -> tuple[int, ...]:
    n = len(normalized_shape)
    if tuple(x.shape[x.dim() - n :]) != tuple(normalized_shape):
        raise ValueError(f"input of shape {tuple(x.shape)} does not end in normalized_shape {tuple(normalized_shape)}")
    return tuple(range(-n, 0))


def ib_row_norm(
    x: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None,
    bias: Tensor | None,
    lam: Tensor | float,
    op: str,
    eps: float,
    centered: bool,
) -> Tensor:
    """Row-wise IBNorm: ``centered=False`` is IBNormRMS, ``True`` is IBLayerNorm.

    ``lam`` is a scalar or has the normalized shape (one λ per channel).
    """
    dims = _normalized_dims(x, normalized_shape)
    ct = compute_dtype(x.dtype)
    xf = x.to(ct)
    d = xf - xf.mean(dims, keepdim=True) if centered else xf
    z = d * torch.rsqrt(d.square().mean(dims, keepdim=True) + eps)
    c = compress(z, torch.as_tensor(lam, dtype=ct, device=x.device), op)
    y = restandardize(z, c, dims, centered)
    if weight is not None:
        y = y * weight.to(ct)
    if bias is not None:
        y = y + bias.to(ct)
    return y.to(x.dtype)


def ib_rms_norm(
    x: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None = None,
    lam: Tensor | float = 0.0,
    op: str = "tanh",
    eps: float = 1e-6,
) -> Tensor:
    return ib_row_norm(x, normalized_shape, weight, None, lam, op, eps, centered=False)


def ib_layer_norm(
    x: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    lam: Tensor | float = 0.0,
    op: str = "tanh",
    eps: float = 1e-5,
) -> Tensor:
    return ib_row_norm(x, normalized_shape, weight, bias, lam, op, eps, centered=True)


def _channel_view(t: Tensor, ndim: int) -> Tensor:
    """(C,) → (1, C, 1, …) for an input of ``ndim`` dimensions."""
    return t.reshape((1, -1) + (1,) * (ndim - 2))


def ib_group_norm(
    x: Tensor,
    num_groups: int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    lam: Tensor | float = 0.0,
    op: str = "tanh",
    eps: float = 1e-5,
) -> Tensor:
    """GroupNorm grouping; ``lam`` is a scalar or one value per channel."""
    n, ch = x.shape[:2]
    if ch % num_groups:
        raise ValueError(f"{ch} channels cannot be split into {num_groups} groups")
    ct = compute_dtype(x.dtype)
    xf = x.to(ct)
    g = xf.reshape(n, num_groups, -1)
    d = g - g.mean(-1, keepdim=True)
    z = (d * torch.rsqrt(d.square().mean(-1, keepdim=True) + eps)).reshape(xf.shape)
    lam_t = torch.as_tensor(lam, dtype=ct, device=x.device)
    if lam_t.dim() == 1:
        lam_t = _channel_view(lam_t, x.dim())
    c = compress(z, lam_t, op)
    y = restandardize(z.reshape(n, num_groups, -1), c.reshape(n, num_groups, -1), (-1,), True).reshape(xf.shape)
    if weight is not None:
        y = y * _channel_view(weight.to(ct), x.dim())
    if bias is not None:
        y = y + _channel_view(bias.to(ct), x.dim())
    return y.to(x.dtype)


def ib_batch_norm(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    lam: Tensor | float = 0.0,
    op: str = "tanh",
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    running_c_mean: Tensor | None = None,
    running_c_var: Tensor | None = None,
    running_z_var: Tensor | None = None,
    num_batches_tracked: Tensor | None = None,
) -> Tensor:
    """BatchNorm grouping (per channel over batch and spatial dims).

    In training, batch statistics are used and, where running buffers are given,
    updated in place: BatchNorm's own ``running_mean``/``running_var`` (through
    ``F.batch_norm``, so they match torch exactly) and the step-4 estimates
    ``running_c_mean`` (of c − z), ``running_c_var`` and ``running_z_var``.
    In eval all five running estimates are used.  ``momentum=None`` means a
    cumulative average, as in BatchNorm; ``num_batches_tracked`` must then be the
    count *after* this batch (the module increments it first, like torch).
    """
    if x.dim() < 2:
        raise ValueError(f"batch grouping needs an input with a channel dimension, got shape {tuple(x.shape)}")
    ct = compute_dtype(x.dtype)
    xf = x.to(ct)
    nd = x.dim()
    dims = (0,) + tuple(range(2, nd))
    use_batch_stats = training or running_mean is None
    if use_batch_stats:
        # Steps 1–2 are exactly BatchNorm's normalization; let torch update its buffers.
        # Buffers may be bf16 after module.to(bf16): update fp32 copies, then write back.
        rm = None if running_mean is None or not training else running_mean.to(ct)
        rv = None if running_var is None or not training else running_var.to(ct)
        z = F.batch_norm(
            xf, rm, rv, None, None, training=True, momentum=_effective_momentum(momentum, num_batches_tracked), eps=eps
        )
        if rm is not None and rm is not running_mean:
            running_mean.copy_(rm)
            running_var.copy_(rv)
    else:
        mean = _channel_view(running_mean.to(ct), nd)
        var = _channel_view(running_var.to(ct), nd)
        z = (xf - mean) * torch.rsqrt(var + eps)
    lam_t = torch.as_tensor(lam, dtype=ct, device=x.device)
    if lam_t.dim() == 1:
        lam_t = _channel_view(lam_t, nd)
    c = compress(z, lam_t, op)

    have_running = running_c_mean is not None
    if use_batch_stats:
        y = restandardize(z, c, dims, centered=True)
        if have_running and training:
            with torch.no_grad():
                mom = _effective_momentum(momentum, num_batches_tracked)
                diff = c - z
                running_c_mean.lerp_((diff.mean(dims)).to(running_c_mean.dtype), mom)
                running_c_var.lerp_(c.var(dims, unbiased=False).to(running_c_var.dtype), mom)
                running_z_var.lerp_(z.var(dims, unbiased=False).to(running_z_var.dtype), mom)
    else:
        mu_c = _channel_view(running_c_mean.to(ct), nd)
        ratio = spread_ratio(_channel_view(running_z_var.to(ct), nd), _channel_view(running_c_var.to(ct), nd))
        y = (c - mu_c) * ratio
    if weight is not None:
        y = y * _channel_view(weight.to(ct), nd)
    if bias is not None:
        y = y + _channel_view(bias.to(ct), nd)
    return y.to(x.dtype)


def _effective_momentum(momentum: float | None, num_batches_tracked: Tensor | None) -> float:
    if momentum is not None:
        return momentum
    if num_batches_tracked is None:
        return 0.0
    return 1.0 / float(num_batches_tracked)
