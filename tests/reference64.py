"""An independent float64 IBNorm, written straight from docs/math.md for the tests.

Deliberately naive: plain formulas, loops over channels, no shared code with ``ibnorm``.
"""

from __future__ import annotations

import math

import torch

DELTA = 1e-12


def s(z: torch.Tensor, lam: float, op: str) -> torch.Tensor:
    if lam == 0:
        return z.clone()
    if op == "tanh":
        return torch.tanh(lam * z) / lam
    if op == "log":
        return torch.sign(z) * torch.log(1 + lam * z.abs()) / lam
    if op == "power":
        p = 1.0 / (1.0 + lam)
        return torch.sign(z) * ((1 + z.abs()) ** p - 1) / p
    raise ValueError(op)


def s_per_channel(z: torch.Tensor, lam, op: str, channel_dim: int) -> torch.Tensor:
    """Compress with λ per index of ``channel_dim`` (lam is a float or a 1-D sequence)."""
    lam = torch.as_tensor(lam, dtype=torch.float64)
    if lam.dim() == 0:
        return s(z, float(lam), op)
    out = torch.empty_like(z)
    for j in range(z.shape[channel_dim]):
        idx = [slice(None)] * z.dim()
        idx[channel_dim] = j
        out[tuple(idx)] = s(z[tuple(idx)], float(lam[j]), op)
    return out


def _restd(z, c, dims, centered):
    if centered:
        var_c = c.var(dims, unbiased=False, keepdim=True)
        var_z = z.var(dims, unbiased=False, keepdim=True)
        c = c - c.mean(dims, keepdim=True)
    else:
        var_c = (c * c).mean(dims, keepdim=True)
        var_z = (z * z).mean(dims, keepdim=True)
    return c * var_z.clamp_min(DELTA).sqrt() / var_c.clamp_min(DELTA).sqrt()


def row_norm(x, weight, bias, lam, op, eps, centered):
    """Normalizes the last dimension."""
    x = x.double()
    d = x - x.mean(-1, keepdim=True) if centered else x
    z = d / torch.sqrt((d * d).mean(-1, keepdim=True) + eps)
    c = s_per_channel(z, lam, op, channel_dim=z.dim() - 1)
    y = _restd(z, c, (-1,), centered)
    if weight is not None:
        y = y * weight.double()
    if bias is not None:
        y = y + bias.double()
    return y


def group_norm(x, groups, weight, bias, lam, op, eps):
    x = x.double()
    n, ch = x.shape[:2]
    g = x.reshape(n, groups, -1)
    d = g - g.mean(-1, keepdim=True)
    z = (d / torch.sqrt((d * d).mean(-1, keepdim=True) + eps)).reshape(x.shape)
    c = s_per_channel(z, lam, op, channel_dim=1)
    y = _restd(z.reshape(n, groups, -1), c.reshape(n, groups, -1), (-1,), True).reshape(x.shape)
    shape = (1, ch) + (1,) * (x.dim() - 2)
    if weight is not None:
        y = y * weight.double().reshape(shape)
    if bias is not None:
        y = y + bias.double().reshape(shape)
    return y


def batch_norm_train(x, weight, bias, lam, op, eps):
    x = x.double()
    dims = [0] + list(range(2, x.dim()))
    shape = (1, x.shape[1]) + (1,) * (x.dim() - 2)
    mean = x.mean(dims, keepdim=True)
    var = x.var(dims, unbiased=False, keepdim=True)
    z = (x - mean) / torch.sqrt(var + eps)
    c = s_per_channel(z, lam, op, channel_dim=1)
    y = _restd(z, c, dims, True)
    if weight is not None:
        y = y * weight.double().reshape(shape)
    if bias is not None:
        y = y + bias.double().reshape(shape)
    return y, z, c


def batch_norm_eval(x, rm, rv, rcm, rcv, rzv, weight, bias, lam, op, eps):
    x = x.double()
    shape = (1, x.shape[1]) + (1,) * (x.dim() - 2)
    z = (x - rm.double().reshape(shape)) / torch.sqrt(rv.double().reshape(shape) + eps)
    c = s_per_channel(z, lam, op, channel_dim=1)
    ratio = rzv.double().clamp_min(DELTA).sqrt() / rcv.double().clamp_min(DELTA).sqrt()
    y = (c - rcm.double().reshape(shape)) * ratio.reshape(shape)
    if weight is not None:
        y = y * weight.double().reshape(shape)
    if bias is not None:
        y = y + bias.double().reshape(shape)
    return y


def isclose(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
