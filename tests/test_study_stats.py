"""The study statistics (ibnorm/study/stats.py) on synthetic data with a known answer."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from ibnorm.study import stats


def test_paired_t_matches_scipy_and_its_interval():
    rng = np.random.default_rng(0)
    a, b = rng.normal(1.0, 1.0, 12), rng.normal(0.5, 1.0, 12)
    t = stats.paired_test(a - b, level=0.9)
    assert t.test == "paired t" and t.n == 12
    assert t.p == pytest.approx(scipy_stats.ttest_rel(a, b).pvalue, rel=1e-10)
    se = np.std(a - b, ddof=1) / math.sqrt(12)
    half = scipy_stats.t.ppf(0.95, 11) * se
    assert t.interval == pytest.approx((np.mean(a - b) - half, np.mean(a - b) + half), rel=1e-10)


def test_degenerate_differences_get_the_exact_sign_flip_p_not_zero():
    # all paired differences equal and non-zero: the t statistic is undefined; the old report said p = 0
    t = stats.paired_test([0.25] * 5)
    assert t.test == "sign-flip (exact)" and t.p == pytest.approx(2 / 2 ** 5)
    assert stats.paired_test([0.0] * 4).p == 1.0
    assert stats.paired_test([1.0]).p is None and stats.paired_test([]).p is None


def test_sign_flip_p_by_enumeration():
    d = np.array([0.3, -0.1, 0.5, 0.2, 0.4])
    pats = [np.array(s) for s in itertools.product([1, -1], repeat=5)]
    expected = np.mean([abs((s * np.abs(d)).sum()) >= abs(d.sum()) - 1e-15 for s in pats])
    assert stats._sign_flip_p(d) == pytest.approx(expected)


def test_holm_by_hand():
    # sorted p: 0.01 (×4), 0.02 (×3), 0.03 (×2), 0.5 (×1), made monotone
    assert stats.holm([0.03, 0.01, 0.5, 0.02]) == pytest.approx([0.06, 0.04, 0.5, 0.06])
    adj = stats.holm([0.9, None, 0.6])
    assert adj[1] is None and adj[0] == pytest.approx(1.0) and adj[2] == pytest.approx(1.0)


def test_planted_difference_is_found_and_its_sign_gives_the_verdict():
    rng = np.random.default_rng(1)
    seeds = range(10)
    ref = {s: rng.normal(3.0, 0.1) for s in seeds}
    values = {"source": ref,
              "better_arm": {s: ref[s] - 0.2 + rng.normal(0, 0.02) for s in seeds},   # lower loss
              "worse_arm": {s: ref[s] + 0.2 + rng.normal(0, 0.02) for s in seeds},
              "same_arm": {s: ref[s] + rng.normal(0, 0.02) for s in seeds}}
    rows = {r["arm"]: r for r in stats.compare(values, "source", lower_is_better=True)}
    assert rows["better_arm"]["verdict"] == stats.BETTER and rows["worse_arm"]["verdict"] == stats.WORSE
    assert rows["same_arm"]["verdict"] == stats.NO_DIFFERENCE
    assert rows["better_arm"]["interval"][1] < 0 < rows["worse_arm"]["interval"][0]
    # higher-is-better metrics flip the verdict
    flipped = {r["arm"]: r for r in stats.compare(values, "source", lower_is_better=False)}
    assert flipped["better_arm"]["verdict"] == stats.WORSE


def test_false_positive_rate_is_near_nominal_with_no_difference():
    rng = np.random.default_rng(2)
    reps, n = 4000, 6
    rejections = sum(stats.paired_test(rng.normal(0, 1, n)).p < 0.05 for _ in range(reps))
    rate = rejections / reps
    # binomial sd at 0.05 over 4000 reps is 0.0034: ±4 sd
    assert 0.036 < rate < 0.064, rate


def test_holm_keeps_the_family_wise_error_rate_over_arms():
    rng = np.random.default_rng(3)
    reps, arms, seeds = 1500, 4, 8
    any_rejected = 0
    for _ in range(reps):
        values = {"ref": {s: 0.0 for s in range(seeds)}}
        values |= {f"a{k}": {s: rng.normal(0, 1) for s in range(seeds)} for k in range(arms)}
        rows = stats.compare(values, "ref", lower_is_better=True)
        any_rejected += any(r["verdict"] != stats.NO_DIFFERENCE for r in rows)
    fwer = any_rejected / reps
    # uncorrected, 4 independent tests would reject somewhere ~18.5% of the time
    assert fwer < 0.05 + 4 * math.sqrt(0.05 * 0.95 / reps), fwer


def test_bootstrap_over_documents_covers_the_true_mean_at_about_the_level():
    rng = np.random.default_rng(4)
    reps, hits = 300, 0
    for i in range(reps):
        d = rng.normal(0.1, 1.0, (1, 80))  # one seed, 80 documents, true mean difference 0.1
        lo, hi = stats.paired_bootstrap(d, level=0.9, reps=400, seed=i)
        hits += lo <= 0.1 <= hi
    # percentile bootstrap of a mean at n = 80 covers close to nominal; binomial sd over 300 reps ≈ 0.017
    assert 0.84 < hits / reps < 0.96, hits / reps


def test_bootstrap_with_seeds_includes_seed_variation():
    rng = np.random.default_rng(5)
    docs = rng.normal(0, 0.01, (1, 200))
    seed_offsets = np.array([[-1.0], [0.0], [1.0], [0.5], [-0.5]])
    narrow = stats.paired_bootstrap(np.repeat(docs, 5, 0), reps=500)
    wide = stats.paired_bootstrap(np.repeat(docs, 5, 0) + seed_offsets, reps=500)
    assert (wide[1] - wide[0]) > 20 * (narrow[1] - narrow[0])


def test_compare_uses_document_bootstrap_when_given():
    rng = np.random.default_rng(6)
    per_doc = {"ref": {s: rng.normal(2.0, 0.5, 30) for s in range(3)}}
    per_doc["arm"] = {s: per_doc["ref"][s] - 0.05 for s in range(3)}
    values = {a: {s: float(np.mean(v)) for s, v in d.items()} for a, d in per_doc.items()}
    row = stats.compare(values, "ref", True, per_document=per_doc)[0]
    assert row["interval_kind"].startswith("bootstrap") and row["interval"] == pytest.approx([-0.05, -0.05], abs=1e-9)
    assert row["test"] == "sign-flip (exact)" and row["p"] == pytest.approx(0.25)
    assert row["verdict"] == stats.NO_DIFFERENCE  # three seeds cannot reach 0.05 with an exact test
