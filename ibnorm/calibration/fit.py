"""Per-layer calibration: the largest per-channel λ within tolerance, then a least-squares affine refit.

The fidelity measure is the relative squared error of the layer's output against
the source layer's output, after refitting γ (and β where the norm has one) per
channel: err = Σ (y − γ'ĉ − β')² / Σ (y − ȳ)², with ȳ the per-channel mean.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..compression import compress
from ..kernels.torch_rownorm import LamConstants, compress_fast, lam_constants
from ..layers import IBNormBase, from_spec
from ..spec import NormSpec

LAMBDA_GRID = (0.0, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)
_BACKOFF = 0.8
_MAX_BACKOFF_STEPS = 15


@dataclass
class LayerFit:
    lam: Tensor  # per channel (float32)
    weight: Tensor | None
    bias: Tensor | None
    error: float  # relative squared output error after refit
    running: dict[str, Tensor] | None = None  # batch norms: running_c_mean / running_c_var / running_z_var


def _channels_last(t: Tensor, spec: NormSpec) -> Tensor:
    """(rows, channels) view of a layer input/output for per-channel statistics."""
    if spec.grouping in ("batch", "group") or spec.channel_dim == 1:
        return t.movedim(1, -1).reshape(-1, t.shape[1])
    return t.reshape(-1, math.prod(spec.shape))


def _unit_module(spec: NormSpec, op: str, lam: Tensor) -> IBNormBase:
    """The IBNorm layer with γ = 1, β = 0, in eval mode, on float32."""
    m = from_spec(spec, op=op, lam=lam).float().eval()
    with torch.no_grad():
        if m.weight is not None:
            m.weight.fill_(1.0)
        if m.bias is not None:
            m.bias.zero_()
    return m


# Elements of the (grid, rows, channels) block compressed at once by ``channel_errors``.
_GRID_BLOCK = 1 << 22
_GRID_LOGISTIC_MIN = 0.01


def channel_errors(z: Tensor, op: str, grid: tuple[float, ...], centered: bool) -> Tensor:
    """(len(grid), C): 1 − corr²(s_λ(z_j), z_j) per channel — the error of refitting z_j from c_j.

    All grid points at once: row blocks of z are compressed for every λ in one broadcast (the
    closed forms of the CPU path) and reduced to running sums Σc, Σc², Σcz, so the cost is a few
    passes over z per grid point instead of a full reference ``compress`` each, and memory stays
    at one (grid × block) slab whatever the number of rows.  λ = 0 is exactly 0 (c = z).
    """
    errors = torch.zeros(len(grid), z.shape[1], dtype=z.dtype)
    # tanh may take the fast logistic form down to a smaller λ than a layer's output may (cpu_rownorm):
    # its absolute error ~6e-8/λ on c moves 1 − corr² by ~(6e-8/λ)², far below any tolerance.
    small = [i for i, lam in enumerate(grid) if 0 < lam < _GRID_LOGISTIC_MIN]
    large = [i for i, lam in enumerate(grid) if lam >= _GRID_LOGISTIC_MIN]
    for idx in (small, large):
        if not idx:
            continue
        lams = torch.tensor([grid[i] for i in idx], dtype=z.dtype).reshape(-1, 1, 1)
        consts = lam_constants(lams, op, z.dtype, logistic_min=_GRID_LOGISTIC_MIN)
        if consts is None:  # tiny positive λ on the grid: the reference's series is needed
            errors[idx] = _channel_errors_reference(z, op, tuple(grid[i] for i in idx), centered)
        else:
            errors[idx] = _grid_errors(z, consts, len(idx), centered)
    return errors


def _grid_errors(z: Tensor, consts: LamConstants, g: int, centered: bool) -> Tensor:
    rows, ch = z.shape
    # Centred: sums of shifted values (z − z̄, c − s_λ(z̄)), so a channel with a large mean and a
    # small spread (massive activations) loses nothing to cancellation; covariances do not
    # depend on the shift.  Uncentred (rms) sums subtract nothing and need no shift.
    kz = z.mean(0)
    kc = compress_fast(kz.expand(g, 1, ch), consts)
    acc = torch.zeros(3, g, ch, dtype=torch.float64)  # Σc, Σc², Σcz; float64 across blocks
    step = max(1, _GRID_BLOCK // max(1, g * ch))
    with torch.no_grad():
        for r0 in range(0, rows, step):
            zr = z[r0 : r0 + step]
            c = compress_fast(zr.expand(g, -1, -1), consts)
            zb = zr
            if centered:
                c, zb = c.sub_(kc), zr - kz
            acc[0] += c.sum(1)
            acc[1] += c.square().sum(1)
            acc[2] += (c * zb).sum(1)
        zs = z - kz if centered else z
        sz, szz = zs.sum(0, dtype=torch.float64), zs.square().sum(0, dtype=torch.float64)
    sc, scc, scz = acc
    if centered:
        scz, scc, szz = scz - sc * sz / rows, scc - sc * sc / rows, szz - sz * sz / rows
    r2 = scz.square() / (scc.clamp_min(1e-30) * szz.clamp_min(1e-30))
    return (1.0 - r2).to(z.dtype)


def _channel_errors_reference(z: Tensor, op: str, grid: tuple[float, ...], centered: bool) -> Tensor:
    out = []
    zc = z - z.mean(0) if centered else z
    szz = (zc * zc).sum(0).clamp_min(1e-30)
    for lam in grid:
        c = compress(z, lam, op)
        cc = c - c.mean(0) if centered else c
        r2 = (cc * zc).sum(0).square() / ((cc * cc).sum(0).clamp_min(1e-30) * szz)
        out.append(1.0 - r2)
    return torch.stack(out)


# The grid is searched in two steps, split here: a channel leaves the search at its first failing
# point, so the larger λ are evaluated only for the channels still within tolerance.  (Each
# call of channel_errors has a fixed cost of a few passes over z: more steps cost more.)
_SEARCH_SPLIT = 0.25


def admissible_lambda(z: Tensor, op: str, grid: tuple[float, ...], centered: bool, tol: float) -> Tensor:
    """Per channel, the largest grid λ whose run from the grid's start stays within ``tol``.

    The same choice as ``_largest_within(channel_errors(z, …), grid, tol)`` (up to the float64
    summation order of the sums), at a fraction of the cost: errors grow with λ, so once a
    channel fails no larger λ can be chosen for it and its column is dropped from the next steps.
    """
    count = torch.zeros(z.shape[1], dtype=torch.long)  # leading admissible grid points so far
    alive = torch.arange(z.shape[1])
    split = sum(1 for lam in grid if lam <= _SEARCH_SPLIT)
    for part in (grid[:split], grid[split:]):
        if alive.numel() == 0 or not part:
            break
        cols = z if alive.numel() == z.shape[1] else z[:, alive]
        run = (channel_errors(cols, op, part, centered) <= tol).int().cumprod(0).sum(0)
        count[alive] += run
        alive = alive[run == len(part)]
    return torch.tensor(grid, dtype=torch.float32)[(count - 1).clamp_min(0)]


def _largest_within(errors: Tensor, grid: tuple[float, ...], tol: float) -> Tensor:
    ok = (errors <= tol).int()
    # The first grid point that fails ends the admissible run (errors grow with λ).
    run = ok.cumprod(0)
    idx = (run.sum(0) - 1).clamp_min(0)
    return torch.tensor(grid, dtype=torch.float32)[idx]


def _set_running(m: IBNormBase, z: Tensor, c: Tensor) -> dict[str, Tensor]:
    stats = {"running_c_mean": (c - z).mean(0), "running_c_var": c.var(0, unbiased=False), "running_z_var": z.var(0, unbiased=False)}
    with torch.no_grad():
        for k, v in stats.items():
            getattr(m, k).copy_(v)
    return stats


def _refit(y: Tensor, u: Tensor, with_bias: bool) -> tuple[Tensor, Tensor | None, float]:
    """Least squares per channel of y on u (with intercept if ``with_bias``); returns γ', β', error."""
    if with_bias:
        um, ym = u.mean(0), y.mean(0)
        uc, yc = u - um, y - ym
        gamma = (uc * yc).sum(0) / (uc * uc).sum(0).clamp_min(1e-30)
        beta = ym - gamma * um
        pred = u * gamma + beta
    else:
        gamma = (u * y).sum(0) / (u * u).sum(0).clamp_min(1e-30)
        beta = None
        pred = u * gamma
    sst = (y - y.mean(0)).square().sum().clamp_min(1e-30)
    return gamma, beta, float((y - pred).square().sum() / sst)


def _evaluate(spec: NormSpec, op: str, lam: Tensor, x: Tensor, y_cols: Tensor, refit: bool):
    m = _unit_module(spec, op, lam)
    running = None
    if spec.grouping == "batch" and m.running_mean is not None:
        z0 = _channels_last(_unit_module(spec, op, torch.zeros_like(lam))(x), spec)
        running = _set_running(m, z0, compress(z0, lam, op))
    with torch.no_grad():
        u = _channels_last(m(x), spec)
    if refit:
        gamma, beta, err = _refit(y_cols, u, with_bias=spec.bias is not None)
    else:
        w = spec.weight.float() if spec.weight is not None else torch.ones(u.shape[1])
        b = spec.bias.float() if spec.bias is not None else None
        pred = u * w.reshape(-1) + (b.reshape(-1) if b is not None else 0.0)
        err = float((y_cols - pred).square().sum() / (y_cols - y_cols.mean(0)).square().sum().clamp_min(1e-30))
        gamma, beta = None, None
    return gamma, beta, err, running


def fit_layer(
    spec: NormSpec,
    source: torch.nn.Module,
    x: Tensor,
    op: str,
    tolerance: float,
    fixed_lam: float | None = None,
    grid: tuple[float, ...] = LAMBDA_GRID,
) -> LayerFit:
    """Calibrate one layer on its captured inputs ``x``.

    With ``fixed_lam`` the λ is not searched and γ, β are kept (so λ = 0 reproduces
    the source exactly); batch norms still get their step-4 running statistics.
    """
    x = _widened(x)
    y_cols = _source_outputs(spec, source, x)
    shape = spec.shape  # λ has the norm's channel shape (normalized shape, or (C,))
    if fixed_lam is not None:
        lam = torch.full(shape, float(fixed_lam))
        _, _, err, running = _evaluate(spec, op, lam, x, y_cols, refit=False)
        return LayerFit(lam, None, None, err, running)
    z = _channels_last(_unit_module(spec, op, torch.zeros(shape))(x), spec)
    centered = spec.grouping != "rms"
    lam = admissible_lambda(z, op, grid, centered, tolerance).reshape(shape)
    for _ in range(_MAX_BACKOFF_STEPS):
        fit = _refit_at(spec, op, lam, x, y_cols)
        if fit.error <= tolerance or not lam.any():
            break
        lam = _snap(lam * _BACKOFF)
    return fit


def _refit_at(spec: NormSpec, op: str, lam: Tensor, x: Tensor, y_cols: Tensor) -> LayerFit:
    gamma, beta, err, running = _evaluate(spec, op, lam, x, y_cols, refit=True)
    return LayerFit(lam, _reshape_like(gamma, spec.weight), _reshape_like(beta, spec.bias), err, running)


def refit_for_lambda(spec: NormSpec, source: torch.nn.Module, x: Tensor, op: str, lam: Tensor,
                     targets: Tensor | None = None) -> LayerFit:
    """Refit γ, β (and batch-norm statistics) of a layer for a given λ; ``targets``: the source's
    outputs on ``x`` from ``source_outputs`` (kept by a caller that refits the same layer again)."""
    x = _widened(x)
    return _refit_at(spec, op, lam, x, source_outputs(spec, source, x) if targets is None else targets)


def source_outputs(spec: NormSpec, source: torch.nn.Module, x: Tensor) -> Tensor:
    """The source layer's outputs on ``x``, as the refit compares with them ((rows, channels), float32)."""
    return _source_outputs(spec, source, _widened(x))


def _widened(x: Tensor) -> Tensor:
    """Captured inputs in float32 at least.  The errors being compared with the tolerance are
    1 − corr² ~ 1e-3: computed in bfloat16 they are mostly the format's rounding (measured on a
    4096-channel layer: mean λ 0.023 from bf16 arithmetic vs 0.127 from the same values in
    float32), so a bf16 checkpoint would get smaller λ than the same weights in float32."""
    return x.float() if x.is_floating_point() and x.element_size() < 4 else x


def _source_outputs(spec: NormSpec, source: torch.nn.Module, x: Tensor) -> Tensor:
    with torch.no_grad():
        return _channels_last(source(x.to(_dtype_of(source))).float(), spec)


def _snap(lam: Tensor) -> Tensor:
    return torch.where(lam < 0.01, torch.zeros_like(lam), lam)


def _reshape_like(t: Tensor | None, like: Tensor | None) -> Tensor | None:
    if t is None or like is None:
        return None
    return t.reshape(like.shape).to(like.dtype)


def _dtype_of(module: torch.nn.Module) -> torch.dtype:
    p = next(iter(module.parameters()), None)
    return torch.float32 if p is None or not p.is_floating_point() else p.dtype


# --- data-free --------------------------------------------------------------------------------

_GAUSS_N = 20001


def _gaussian_quantiles() -> Tensor:
    """Deterministic N(0, 1) sample: the quantiles (i + ½)/n."""
    p = (torch.arange(_GAUSS_N, dtype=torch.float64) + 0.5) / _GAUSS_N
    return (torch.special.ndtri(p)).float()


def fit_layer_data_free(spec: NormSpec, op: str, tolerance: float, fixed_lam: float | None = None,
                        grid: tuple[float, ...] = LAMBDA_GRID) -> LayerFit:
    """Calibrate without data, assuming the standardized deviations z are N(0, 1) in every channel.

    One λ for all channels (outlier channels cannot be seen without data); γ, β kept.
    Batch norms get step-4 running statistics from the same assumption.
    """
    shape = spec.shape
    z = _gaussian_quantiles()[:, None]
    if fixed_lam is None:
        errs = channel_errors(z, op, grid, centered=True)
        lam_value = float(_largest_within(errs, grid, tolerance)[0])
    else:
        lam_value = float(fixed_lam)
    c = compress(z, lam_value, op)
    err = float(channel_errors(z, op, (lam_value,), centered=True)[0, 0])
    running = None
    if spec.grouping == "batch" and spec.track_running_stats:
        running = {
            "running_c_mean": torch.zeros(shape),
            "running_c_var": torch.full(shape, float(c.var(unbiased=False))),
            "running_z_var": torch.full(shape, float(z.var(unbiased=False))),
        }
    return LayerFit(torch.full(shape, lam_value), None, None, err, running)
