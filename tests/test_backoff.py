"""The end-to-end back-off (issue 22): a trial-measured drift within budget, in few trials.

Synthetic drift curves d(f) = c·f^p (+ noise-free) give the analytic reference: the largest factor
within budget is (budget / c)^(1/p).  A tiny model with a small budget checks the real pipeline: the
drift the manifest reports is re-measured from the written model and its source."""

from __future__ import annotations

import math

import pytest
import torch

from ibnorm.pipeline.check import AIM, MAX_TRIALS, back_off


@pytest.mark.parametrize("c, p", [(0.05, 2.0), (0.3, 2.0), (10.0, 2.0), (0.05, 3.0), (0.05, 1.0), (2.0, 1.5), (1e4, 4.0),
                                  (0.011, 2.0)])
def test_back_off_meets_budget_in_few_trials(c, p):
    budget = 0.01
    calls = []

    def measure(f: float) -> float:
        calls.append(f)
        return c * f ** p

    factor, drift, trials = back_off(measure, measure(1.0), budget)
    calls.pop(0)
    assert drift <= budget and drift == c * factor ** p  # the guarantee: a measured drift within budget
    assert len(trials) == len(calls) <= 2  # quadratic exactly: one trial; another exponent: the second fits it
    best = (budget / c) ** (1 / p)  # the largest factor within budget
    assert factor <= best and factor >= 0.5 * best  # not backed off needlessly far
    if p == 2.0:
        assert len(trials) == 1 and math.isclose(factor, (AIM * budget / c) ** 0.5)


def test_back_off_ends_at_the_source_when_nothing_fits():
    """A drift that does not fall with λ (a broken model): λ = 0 ends it, within MAX_TRIALS."""
    factor, drift, trials = back_off(lambda f: 0.5 if f > 0 else 0.0, 0.5, 0.01)
    assert factor == 0.0 and drift == 0.0 and len(trials) == MAX_TRIALS


def test_back_off_bisects_an_irregular_curve():
    """Drift with a step (non-smooth): prediction misses, bisection finds a factor within budget."""
    curve = lambda f: 0.001 if f < 0.1 else 0.2 * f  # noqa: E731
    factor, drift, trials = back_off(curve, curve(1.0), 0.01)
    assert drift <= 0.01 and drift == curve(factor) and len(trials) <= MAX_TRIALS


def test_pipeline_back_off_within_budget(tmp_path):
    """A tiny LM with a budget the calibrated λ exceed: the manifest's drift is within budget after at most
    3 trials, and re-measuring it from the written model and its source gives the same value."""
    import ibnorm
    from ibnorm.data import read_texts, token_examples
    from ibnorm.io.sources import load_source
    from ibnorm.pipeline.families import CausalLM

    from models import tiny_lm_with_tokenizer

    src = tiny_lm_with_tokenizer(tmp_path / "src")
    out = tmp_path / "out"
    budget = 4e-4  # the calibrated λ (tolerance 0.3) drift about 1.6e-3 here
    opts = ibnorm.ConvertOptions(calib="builtin:pydoc:train", calib_samples=8, seq_len=64, budget=budget, tolerance=0.3)
    _, manifest = ibnorm.convert_checkpoint(str(src), out, opts)
    e2e = manifest["end_to_end"]
    assert e2e["backoff_factor"] < 1 and 1 <= len(e2e["trials"]) <= 3, e2e
    assert e2e["value"] <= budget and e2e["within_budget"]
    # independent: the written model against the source, on the check samples (the first 4 of 8)
    loaded = load_source(str(src))
    converted = ibnorm.load(out)
    ids = token_examples(loaded.tokenizer, read_texts("builtin:pydoc:train"), 64, 8)[:4]
    family = CausalLM()
    with torch.no_grad():
        drift = family.drift([family.outputs(loaded.model, ids)], [family.outputs(converted, ids)])
    assert drift <= budget * 1.01 and math.isclose(drift, e2e["value"], rel_tol=0.05, abs_tol=1e-6)
