"""The short polynomials of the Triton kernels (ibnorm/kernels/triton_rownorm.py), refitted.

    python benchmarks/kernel_polynomials.py

Each is a near-minimax fit (Lawson-reweighted least squares on Chebyshev nodes, relative error)
with its constant term pinned to the exact value, so the λ = 0 limits stay exact.  Printed: the
float32 coefficients and the largest relative error of their float32 Horner evaluation on a fine
grid of the interval.  The kernels' literals are these; tests/test_kernels.py checks the kernels
across every seam against float64.
"""

from __future__ import annotations

import numpy as np

FITS = [
    # name, f, interval, degree, pinned constant, variable of the polynomial
    ("log1p(u)/u", lambda u: np.log1p(u) / u, (1e-6, 0.1), 3, 1.0, lambda u: u),
    ("F'(u), F = log1p(u)/u", lambda u: (u / (1 + u) - np.log1p(u)) / u**2, (1e-4, 0.25), 5, -0.5, lambda u: u),
    ("((v-1)e^v + 1)/v^2", lambda v: ((v - 1) * np.exp(v) + 1) / v**2, (1e-4, 0.25), 3, 0.5, lambda v: v),
    ("F'(u)/u, F = tanh(u)/u, in u^2", lambda u: (1 / np.cosh(u) ** 2 / u - np.tanh(u) / u**2) / u, (1e-3, 0.3), 3,
     -2.0 / 3.0, lambda u: u * u),
]


def fit(f, interval, degree, c0, var, nodes=4000):
    lo, hi = interval
    x = lo + (hi - lo) * (np.cos(np.pi * (np.arange(nodes) + 0.5) / nodes) + 1) / 2
    y, v = f(x), var(x)
    basis = np.vander(v, degree, increasing=True) * v[:, None]  # y ≈ c0 + v·(c1 + c2·v + …)
    weight, reweight = 1 / np.abs(y), np.ones_like(x)
    for _ in range(80):
        s = weight * np.sqrt(reweight)
        coef, *_ = np.linalg.lstsq(basis * s[:, None], (y - c0) * s, rcond=None)
        err = np.abs((basis @ coef + c0 - y) * weight)
        reweight *= err / err.max() + 1e-3
        reweight /= reweight.mean()
    coefs = [np.float32(c0)] + [np.float32(c) for c in coef]
    xs = np.linspace(lo, hi, 40001)
    vs = var(xs).astype(np.float32)
    acc = np.full(vs.shape, coefs[-1], np.float32)
    for c in coefs[-2::-1]:
        acc = (acc * vs + c).astype(np.float32)
    return [float(c) for c in coefs], float(np.max(np.abs(acc / f(xs) - 1)))


def main() -> None:
    print("| polynomial | interval | degree | float32 coefficients | max rel. error (float32) |")
    print("|---|---|---|---|---|")
    for name, f, interval, degree, c0, var in FITS:
        coefs, err = fit(f, interval, degree, c0, var)
        print(f"| {name} | [0, {interval[1]}] | {degree} | {', '.join(repr(c) for c in coefs)} | {err:.1e} |")


if __name__ == "__main__":
    main()
