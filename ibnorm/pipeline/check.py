"""Stage 3: the end-to-end check — compare the whole converted model with its source, and back λ
off until the drift is within budget.

The reference outputs come from calibration (the source's hidden states were carried through the
blocks beside the converted ones), so the check works the same in memory and streamed: a back-off
trial refits every norm for the scaled λ and runs only the check batches through the blocks again.
"""

from __future__ import annotations

from torch import Tensor

from ..calibration import LayerFit, refit_for_lambda
from ..validate import check_finite
from .calibrate import Calibrated, Fitted, build, install
from .layout import catch_block_inputs, run_block, run_tail
from .options import ConvertOptions, Progress
from .plan import Plan

# A back-off schedule for λ when the whole model drifts past its budget.
BACKOFF = (0.9, 0.8, 0.7, 0.6, 0.5, 0.35, 0.25, 0.1, 0.0)


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
    return refit_for_lambda(f.site.spec, f.site.module, f.inputs(), op, lam)


def check(plan: Plan, cal: Calibrated, opts: ConvertOptions, progress: Progress) -> dict:
    """Measure the drift; back λ off (refitting γ, β) while it exceeds the budget."""
    if opts.calib is None:
        return {}
    drift = plan.family.drift(cal.reference, cal.outputs)
    check_finite(f"the end-to-end drift ({plan.family.drift_metric})", drift)
    result = {"metric": plan.family.drift_metric, "budget": opts.budget, "value": drift, "backoff_factor": 1.0}
    if opts.lam is None and drift > opts.budget:
        calibrated = {name: f.fit for name, f in cal.fits.items()}
        for factor in BACKOFF:
            progress(f"backing off λ ×{factor}", 0, 1)
            for name, f in cal.fits.items():
                f.fit = _scaled(f, calibrated[name], factor, opts.op)
            drift = plan.family.drift(cal.reference, forward_check(plan, cal, opts))
            check_finite(f"the end-to-end drift ({plan.family.drift_metric})", drift)
            result.update(value=drift, backoff_factor=factor)
            if drift <= opts.budget:
                break
    result["within_budget"] = drift <= opts.budget
    return result
