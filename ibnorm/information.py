"""Mutual-information estimators for the information-plane analysis (``ibnorm mi``) and the study.

``mutual_information(a, b)`` returns nats.  ``a`` is ``(n, d)`` continuous; ``b`` is ``(n, d')``
continuous or ``(n,)`` integer labels.  Estimators (see docs/information.md):

* ``ksg`` — Kraskov–Stögbauer–Grassberger k-NN estimator (algorithm 1, max-norm) for
  continuous–continuous pairs, and Ross's (2014) k-NN variant for continuous–discrete pairs.
  Consistent for Shannon MI.  Each side is first projected to at most ``max_dim`` dimensions
  (PCA) and whitened; whitening is an invertible affine map per side, so it does not change MI,
  and it removes the anisotropy that biases k-NN counts.  The projection is a function of the
  data, so the estimate is of I(PA; PB) ≤ I(A; B) (data processing): a lower bound.
* ``ksg-bc`` (the default) — ``ksg`` with its finite-sample bias extrapolated away: the estimate
  at n, n/2 and n/4 (averaged over disjoint subsamples) fitted to I(n) = I∞ − c·n^(−β).
* ``renyi`` — matrix-based Rényi α-entropy MI (Giraldo, Rao & Príncipe 2015) on Gaussian-kernel
  Gram matrices: an independent functional, for cross-checking orderings (not Shannon MI; its
  scale is not comparable with ``ksg``).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy.spatial import cKDTree
from scipy.special import digamma

ESTIMATORS = ("ksg-bc", "ksg", "renyi")
DEFAULT_ESTIMATOR = "ksg-bc"


def _as_array(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().double().numpy() if x.is_floating_point() else x.detach().cpu().numpy()
    return np.asarray(x)


def _is_labels(b: np.ndarray) -> bool:
    return b.ndim == 1 and np.issubdtype(b.dtype, np.integer)


def principal_axes(x: np.ndarray, max_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean, axes): the top ``max_dim`` principal axes of ``x`` (columns; ~zero-variance ones dropped)."""
    x = x.reshape(len(x), -1).astype(np.float64)
    mean = x.mean(0)
    xc = x - mean
    # principal axes from the d×d covariance (much cheaper than an SVD of the n×d data for n ≫ d);
    # components with ~zero variance carry no information and are dropped
    evals, evecs = np.linalg.eigh(xc.T @ xc / max(len(x), 1))
    order = np.argsort(evals)[::-1]
    evals, evecs = evals[order], evecs[:, order]
    keep = evals > evals[0] * 1e-14 if len(evals) and evals[0] > 0 else np.zeros(len(evals), bool)
    keep[max_dim:] = False
    return mean, evecs[:, keep]


def whiten(x: np.ndarray, max_dim: int, axes: np.ndarray | None = None) -> np.ndarray:
    """Centre, project on the top ``max_dim`` principal components (or on given ``axes``), scale each
    component to unit variance."""
    x = x.reshape(len(x), -1).astype(np.float64)
    if axes is None:
        _, axes = principal_axes(x, max_dim)
    z = (x - x.mean(0)) @ axes
    return z / np.maximum(z.std(0), 1e-300)


def _jitter(x: np.ndarray, seed: int) -> np.ndarray:
    # k-NN counts assume no ties; tiny noise (1e-10 of unit variance) breaks them without changing MI
    rng = np.random.default_rng(seed)
    return x + 1e-10 * rng.standard_normal(x.shape)


def ksg_cc(x: np.ndarray, y: np.ndarray, k: int = 3) -> float:
    """KSG algorithm 1 on already prepared (n, dx), (n, dy) arrays, in nats."""
    n = len(x)
    joint = np.hstack([x, y])
    eps = cKDTree(joint).query(joint, k=k + 1, p=np.inf)[0][:, -1]
    radius = np.nextafter(eps, 0)  # strictly closer than the k-th joint neighbour
    nx = cKDTree(x).query_ball_point(x, radius, p=np.inf, return_length=True) - 1
    ny = cKDTree(y).query_ball_point(y, radius, p=np.inf, return_length=True) - 1
    return float(digamma(k) + digamma(n) - np.mean(digamma(nx + 1) + digamma(ny + 1)))


def ksg_cd(x: np.ndarray, labels: np.ndarray, k: int = 3) -> float:
    """Ross (2014) k-NN MI between continuous ``x`` and discrete ``labels``, in nats.

    Labels with fewer than ``k + 1`` samples cannot give a k-th neighbour and are dropped.
    """
    values, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    keep = counts[inverse] > k
    x, inverse = x[keep], inverse[keep]
    n = len(x)
    if n == 0 or len(np.unique(inverse)) < 2:
        return 0.0
    radius = np.empty(n)
    label_counts = np.empty(n)
    for c in np.unique(inverse):
        mask = inverse == c
        d = cKDTree(x[mask]).query(x[mask], k=k + 1, p=np.inf)[0][:, -1]
        radius[mask] = np.nextafter(d, 0)
        label_counts[mask] = mask.sum()
    m_all = cKDTree(x).query_ball_point(x, radius, p=np.inf, return_length=True)
    return float(digamma(n) + digamma(k) - np.mean(digamma(label_counts)) - np.mean(digamma(m_all)))


def _ksg(a: np.ndarray, b: np.ndarray, k: int) -> float:
    return ksg_cd(a, b, k) if _is_labels(b) else ksg_cc(a, b, k)


def _ksg_bias_corrected(a: np.ndarray, b: np.ndarray, k: int, seed: int) -> float:
    """Extrapolate I(n) = I∞ − c·n^(−β) from n, n/2, n/4 (disjoint subsamples, averaged).

    Only a trend that stands out of the subsample noise is extrapolated (near independence
    the differences are noise, and extrapolating them would inflate it).
    """
    n = len(a)
    if n < 400:  # quarters of < 100 points: the extrapolation would fit noise
        return _ksg(a, b, k)
    perm = np.random.default_rng(seed).permutation(n)
    est = []
    for parts in (1, 2, 4):
        size = n // parts
        est.append([_ksg(a[perm[i * size:(i + 1) * size]], b[perm[i * size:(i + 1) * size]], k) for i in range(parts)])
    i1, i2, i4 = (float(np.mean(e)) for e in est)
    noise = float(np.std(est[2], ddof=1)) / 2  # standard error of the n/4 mean; the n and n/2 terms are less noisy
    d1, d2 = i1 - i2, i2 - i4
    if d1 <= 2 * noise or d2 <= d1 * 1.05:
        return i1  # no clear geometric bias trend
    correction = d1 / (d2 / d1 - 1.0)  # d2/d1 = 2^β
    # a slowly converging estimate (β → 0) extrapolates without limit; cap it at the observed trend ×4
    return float(i1 + min(correction, 4.0 * d1))


def renyi_mi(a: np.ndarray, b: np.ndarray, alpha: float = 1.01, max_n: int = 1000, seed: int = 0) -> float:
    """Matrix-based Rényi α-order MI (Giraldo et al. 2015), Gaussian kernels with median bandwidth."""
    n = len(a)
    if n > max_n:
        idx = np.random.default_rng(seed).choice(n, max_n, replace=False)
        a, b = a[idx], b[idx]
    ka = _gram(a)
    kb = (b[:, None] == b[None, :]).astype(np.float64) if _is_labels(b) else _gram(b)
    return float(_renyi_entropy(ka, alpha) + _renyi_entropy(kb, alpha) - _renyi_entropy(ka * kb, alpha))


def _gram(x: np.ndarray) -> np.ndarray:
    sq = (x * x).sum(1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * x @ x.T, 0.0)
    med = np.median(d2[np.triu_indices(len(x), 1)])
    return np.exp(-d2 / max(med, 1e-12))


def _renyi_entropy(k: np.ndarray, alpha: float) -> float:
    a = k / np.trace(k)
    ev = np.clip(np.linalg.eigvalsh(a), 0, None)
    return float(np.log(np.sum(ev ** alpha)) / (1 - alpha))


def prepare(a: Any, b: Any, max_dim: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Arrays ready for the estimators: both sides whitened to ≤ ``max_dim`` dims, ties broken."""
    a, b = _as_array(a), _as_array(b)
    if len(a) != len(b):
        raise ValueError(f"a and b must have the same number of rows ({len(a)} vs {len(b)})")
    if len(a) < 10:
        raise ValueError(f"need at least 10 samples, got {len(a)}")
    a = _jitter(whiten(a, max_dim), seed)
    if _is_labels(b):
        b = b.astype(np.int64)
    else:
        b = _jitter(whiten(b, max_dim), seed + 1)
    return a, b


def mutual_information(a: Any, b: Any, *, estimator: str | None = None, k: int = 3, max_dim: int = 8, seed: int = 0) -> float:
    """I(a; b) in nats.  ``a``: (n, d) floats; ``b``: (n, d') floats or (n,) integer labels.

    Each side is reduced to at most ``max_dim`` principal components (whitened): the value is
    then a lower bound on the full-dimensional MI.  ``estimator``: ``ksg-bc`` (default), ``ksg``
    or ``renyi``.
    """
    estimator = estimator or DEFAULT_ESTIMATOR
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; choose one of {', '.join(ESTIMATORS)}")
    a, b = prepare(a, b, max_dim, seed)
    if a.shape[1] == 0 or (b.ndim == 2 and b.shape[1] == 0):
        return 0.0  # a constant carries no information
    if estimator == "ksg":
        return _ksg(a, b, k)
    if estimator == "ksg-bc":
        return _ksg_bias_corrected(a, b, k, seed)
    return renyi_mi(a, b, seed=seed)


def gaussian_mi(cov: np.ndarray, dx: int) -> float:
    """Analytic MI of a jointly Gaussian vector with covariance ``cov`` split after ``dx`` dims."""
    sx, sy = cov[:dx, :dx], cov[dx:, dx:]
    return 0.5 * (np.linalg.slogdet(sx)[1] + np.linalg.slogdet(sy)[1] - np.linalg.slogdet(cov)[1])


def subsample_spread(fn, n: int, reps: int = 4, seed: int = 0) -> float:
    """Error bar of ``fn(idx)``: std over ``reps`` random half-samples, divided by √2.

    Half-samples without replacement (not a with-replacement bootstrap: duplicated rows are
    zero-distance neighbours, which k-NN estimators cannot handle); the variance of an estimate
    from n/2 points is about twice that from n, hence the √2.
    """
    rng = np.random.default_rng(seed)
    vals = [fn(np.sort(rng.choice(n, n // 2, replace=False))) for _ in range(reps)]
    return float(np.std(vals, ddof=1) / math.sqrt(2)) if reps > 1 else 0.0
