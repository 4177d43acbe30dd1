"""Stage 3: the end-to-end check — compare the whole converted model with its source, and back λ
off until the drift is within budget.

The reference outputs come from calibration (the source's hidden states were carried through the
blocks beside the converted ones), so the check works the same in memory and streamed: a back-off
trial refits every norm for the scaled λ and runs only the check batches through the blocks again.

The back-off scales every λ by one factor f.  Near λ = 0 the drift grows about quadratically in f
(λ = 0 is the source exactly, and the first-order change is largely absorbed by the refit of γ, β),
so f is predicted from the drift measured at f = 1 and confirmed by one trial; a miss refines the
exponent from the two measurements, then bisects.  The result is accepted only when a trial has
measured it within budget (f = 0, the source itself, ends the search).
"""

from __future__ import annotations

import math
import time
from typing import Callable

from torch import Tensor

from ..calibration import LayerFit, refit_for_lambda
from ..validate import check_finite
from .calibrate import Calibrated, Fitted, build, install
from .layout import catch_block_inputs, run_block, run_tail
from .options import ConvertOptions, Progress
from .plan import Plan

# Aim at this share of the budget: the prediction is approximate, and a confirming trial that
# misses costs a second one.
AIM = 0.85
# Trials before falling back to λ = 0 (the source): prediction, refined prediction, then bisection.
MAX_TRIALS = 5


def forward_check(plan: Plan, cal: Calibrated, opts: ConvertOptions) -> list[Tensor]:
    """The converted model's check outputs with the norms built from ``cal.fits``."""
    model, family, store, blocks = plan.model, plan.family, plan.store, plan.blocks
    built = {name: build(f, opts) for name, f in cal.fits.items()}
    if blocks is None:
        install(model, built, store)
        return [family.outputs(model, b) for b in cal.check_batches]
    install(model, {n: m for n, m in built.items() if blocks.index_of(n) is None}, store)
    store.prepare(blocks)
    calls = catch_block_inputs(blocks, lambda b: family.run(model, b), cal.check_batches)
    store.release_outside()
    for i in range(len(blocks)):
        block = store.block(blocks, i)
        install(model, {n: m for n, m in built.items() if blocks.index_of(n) == i}, store)
        calls = [(run_block(blocks, block, c), c[1], c[2]) for c in calls]
        store.release(blocks, i, block)
    store.prepare(blocks)
    return run_tail(blocks, lambda b: family.outputs(model, b), cal.check_batches, [c[0] for c in calls])


def _scaled(f: Fitted, calibrated: LayerFit, factor: float, op: str) -> LayerFit:
    lam = calibrated.lam * factor
    if f.inputs is None:  # never called on the data: nothing to refit
        return LayerFit(lam, calibrated.weight, calibrated.bias, calibrated.error, calibrated.running)
    return refit_for_lambda(f.site.spec, f.site.module, f.inputs(), op, lam, f.targets() if f.targets else None)


def predict_factor(measured: list[tuple[float, float]], budget: float) -> float:
    """The λ scale at which the drift should be AIM × budget, from the trials so far ((factor, drift),
    the first at factor 1): drift ∝ f² from one point; with two, the exponent they show (1 to 4)."""
    target = AIM * budget
    (f_hi, d_hi) = measured[-1]
    exponent = 2.0
    if len(measured) >= 2:
        (f_a, d_a), (f_b, d_b) = measured[-2], measured[-1]
        if d_a > 0 and d_b > 0 and f_a != f_b and d_a != d_b:
            exponent = min(4.0, max(1.0, math.log(d_a / d_b) / math.log(f_a / f_b)))
    if d_hi <= 0:
        return f_hi
    return f_hi * (target / d_hi) ** (1.0 / exponent)


def _next_factor(measured: list[tuple[float, float]], budget: float, trial: int) -> float:
    """Prediction for the first two trials, then bisection between 0 and the smallest factor that failed;
    always strictly below every factor that failed."""
    failed = min(f for f, d in measured if d > budget)
    if trial < 2:
        guess = predict_factor(measured, budget)
        if 0 < guess < failed:
            return guess
    return failed / 2 if trial < MAX_TRIALS - 1 else 0.0


def back_off(measure: Callable[[float], float], drift: float, budget: float) -> tuple[float, float, list[dict]]:
    """The λ scale to keep: (factor, its measured drift, the trials).  ``measure(f)`` builds the model
    with every λ × f and returns its drift; ``drift`` is the drift at f = 1, above ``budget``.

    The first trial within budget ends the search, unless it landed far inside the budget (the drift
    grew faster than quadratically): then one step up, predicted from the two sides, is tried, and
    the larger factor measured within budget is kept.  λ = 0 (the source itself) ends it in any case."""
    measured, trials = [(1.0, drift)], []
    best: tuple[float, float] | None = None  # the largest factor measured within budget, and its drift
    for trial in range(MAX_TRIALS):
        if best is None:
            factor = _next_factor(measured, budget, trial)
        else:
            failed = min((f, d) for f, d in measured if d > budget)
            factor = predict_factor([failed, best], budget)
            if not best[0] < factor < failed[0]:
                break
        t = time.perf_counter()
        drift = measure(factor)
        measured.append((factor, drift))
        trials.append({"factor": factor, "drift": drift, "seconds": round(time.perf_counter() - t, 3)})
        if drift <= budget and (best is None or factor > best[0]):
            best = (factor, drift)
        if factor == 0.0 or (best is not None and (len(trials) > 1 or best[1] >= AIM * budget / 4)):
            break
    factor, drift = best if best is not None else (factor, drift)
    return factor, drift, trials


def check(plan: Plan, cal: Calibrated, opts: ConvertOptions, progress: Progress) -> dict:
    """Measure the drift; scale every λ back (refitting γ, β) until a trial measures it within budget."""
    if opts.calib is None:
        return {}
    metric = plan.family.drift_metric
    drift = plan.family.drift(cal.reference, cal.outputs)
    check_finite(f"the end-to-end drift ({metric})", drift)
    result = {"metric": metric, "budget": opts.budget, "value": drift, "backoff_factor": 1.0, "trials": []}
    if opts.lam is None and drift > opts.budget:
        calibrated = {name: f.fit for name, f in cal.fits.items()}
        fits_at: dict[float, dict[str, LayerFit]] = {}  # the refits of each trial (the kept one is installed)

        def measure(factor: float) -> float:
            progress(f"backing off λ ×{factor:.3g}", len(fits_at), MAX_TRIALS)
            fits_at[factor] = {name: _scaled(f, calibrated[name], factor, opts.op) for name, f in cal.fits.items()}
            for name, f in cal.fits.items():
                f.fit = fits_at[factor][name]
            value = plan.family.drift(cal.reference, forward_check(plan, cal, opts))
            check_finite(f"the end-to-end drift ({metric})", value)
            return value

        factor, drift, result["trials"] = back_off(measure, drift, opts.budget)
        result.update(value=drift, backoff_factor=factor)
        for name, f in cal.fits.items():
            f.fit, f.targets = fits_at[factor][name], None
    result["within_budget"] = drift <= opts.budget
    return result
