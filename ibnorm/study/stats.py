"""The statistics of every study (from scratch and from a pretrained checkpoint), in one place.

A comparison of an arm with the reference (the baseline normalizer, or the source model's own norms) is
paired: the same seed gives both the same initial weights (or the same checkpoint) and the same data order,
so the seed-level differences carry the test. What each function computes:

- :func:`paired_test`: mean and std of the per-seed differences, a two-sided paired t-test and its
  t-interval. When every difference is the same the t statistic is undefined (zero variance); then the exact
  sign-flip permutation test is used (p = 2^(1−n) when all differences share a sign, 1 when all are 0), never
  a p of 0.
- :func:`paired_bootstrap`: a percentile interval for the mean difference, resampling held-out documents
  (or images), and seeds too when there are several, so it reflects both sources of variation.
- :func:`holm`: Holm's step-down adjustment over every comparison a table reports.
- :func:`compare`: the above for a set of arms against one reference, with a verdict per arm: ``better``,
  ``worse`` or ``no detectable difference`` at the stated family-wise level.

What it cannot show: a "no detectable difference" verdict is not evidence of equality (the interval says how
large a difference the data still allow), and seeds test only the variation the seeds control (initial
weights, data order), not other datasets or recipes.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

import numpy as np

BETTER, WORSE, NO_DIFFERENCE, TOO_FEW = "better", "worse", "no detectable difference", "too few paired seeds"


@dataclass(frozen=True)
class PairedTest:
    n: int
    delta: float  # mean of (arm − reference)
    delta_std: float | None  # std of the differences (ddof 1); None with one pair
    p: float | None  # two-sided; None with fewer than 2 pairs
    interval: tuple[float, float] | None  # t-interval of the mean difference at `level`
    test: str  # "paired t" | "sign-flip (exact)" | "none"


def paired_test(diffs: Sequence[float], level: float = 0.95) -> PairedTest:
    """Two-sided paired t-test of ``mean(diffs) == 0``; exact sign-flip test when the variance is 0."""
    d = np.asarray(diffs, dtype=np.float64)
    n = int(d.size)
    if n == 0:
        return PairedTest(0, math.nan, None, None, None, "none")
    mean = float(d.mean())
    if n < 2:
        return PairedTest(1, mean, None, None, None, "none")
    std = float(d.std(ddof=1))
    if std == 0.0 or std <= 1e-12 * abs(mean):
        return PairedTest(n, mean, 0.0, _sign_flip_p(d), (mean, mean), "sign-flip (exact)")
    from scipy.stats import t as student_t

    se = std / math.sqrt(n)
    stat = mean / se
    p = float(2.0 * student_t.sf(abs(stat), n - 1))
    half = float(student_t.ppf(0.5 + level / 2.0, n - 1)) * se
    return PairedTest(n, mean, std, p, (mean - half, mean + half), "paired t")


def _sign_flip_p(d: np.ndarray) -> float:
    """Exact two-sided sign-flip p-value of the mean (all 2^n sign patterns, n ≤ 20)."""
    n = d.size
    if n > 20:
        raise ValueError("the exact sign-flip test enumerates 2^n patterns; n must be ≤ 20")
    observed = abs(d.sum())
    if observed == 0.0:
        return 1.0
    signs = 1 - 2 * ((np.arange(2 ** n)[:, None] >> np.arange(n)) & 1)
    sums = np.abs(signs @ np.abs(d))
    return float(np.mean(sums >= observed * (1 - 1e-12)))


def paired_bootstrap(diffs: np.ndarray, level: float = 0.95, reps: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile interval of the mean of a (seeds × documents) matrix of paired differences.

    Documents are resampled with replacement; seeds too when there are more than one (a two-level
    bootstrap), so the interval includes the seed-to-seed variation as well as the documents'.
    """
    m = np.atleast_2d(np.asarray(diffs, dtype=np.float64))
    if m.size == 0:
        raise ValueError("no differences to bootstrap")
    rng = np.random.default_rng(seed)
    n_seeds, n_docs = m.shape
    means = np.empty(reps)
    for i in range(reps):
        rows = rng.integers(0, n_seeds, n_seeds) if n_seeds > 1 else np.zeros(1, dtype=np.int64)
        cols = rng.integers(0, n_docs, n_docs)
        means[i] = m[np.ix_(rows, cols)].mean()
    lo, hi = np.quantile(means, [0.5 - level / 2.0, 0.5 + level / 2.0])
    return float(lo), float(hi)


def holm(pvalues: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down adjusted p-values (None stays None and does not count as a test)."""
    idx = [i for i, p in enumerate(pvalues) if p is not None]
    order = sorted(idx, key=lambda i: pvalues[i])
    m = len(order)
    adjusted: list[float | None] = [None] * len(pvalues)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * float(pvalues[i])))
        adjusted[i] = running
    return adjusted


def verdict(delta: float, p_adjusted: float | None, lower_is_better: bool, alpha: float = 0.05) -> str:
    if p_adjusted is None:
        return TOO_FEW
    if not p_adjusted < alpha or delta == 0:
        return NO_DIFFERENCE
    return BETTER if (delta < 0) == lower_is_better else WORSE


def compare(values: Mapping[str, Mapping[int, float]], reference: str, lower_is_better: bool, alpha: float = 0.05,
            per_document: Mapping[str, Mapping[int, Sequence[float]]] | None = None, reps: int = 2000,
            seed: int = 0) -> list[dict]:
    """Every arm of ``values`` (arm → seed → metric) against ``reference``, Holm-corrected across the arms.

    ``per_document`` (arm → seed → per-document metric, the same documents for every arm) adds the
    bootstrap interval over documents; without it the interval is the seed-level t-interval.
    """
    ref = values[reference]
    rows = []
    for arm, by_seed in values.items():
        if arm == reference:
            continue
        seeds = sorted(s for s in by_seed if s in ref and by_seed[s] is not None and ref[s] is not None)
        test = paired_test([by_seed[s] - ref[s] for s in seeds], level=1.0 - alpha)
        row = {"arm": arm, "reference": reference, **asdict(test), "interval_kind": "t over seeds"}
        if per_document is not None and seeds and arm in per_document:
            docs = np.array([np.subtract(per_document[arm][s], per_document[reference][s]) for s in seeds])
            row["interval"] = paired_bootstrap(docs, level=1.0 - alpha, reps=reps, seed=seed)
            row["interval_kind"] = "bootstrap over seeds and documents"
        rows.append(row)
    for row, p_adj in zip(rows, holm([r["p"] for r in rows])):
        row["p_holm"] = p_adj
        row["verdict"] = verdict(row["delta"], p_adj, lower_is_better, alpha)
        row["level"] = 1.0 - alpha
        if row["interval"] is not None:
            row["interval"] = [float(row["interval"][0]), float(row["interval"][1])]
    return rows
