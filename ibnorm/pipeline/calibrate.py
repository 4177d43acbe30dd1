"""Stage 2: calibrate — choose λ (and refit γ, β) for every norm, block by block.

Data-free: one fit per norm from the N(0, 1) assumption.  With data, the blocks are visited in
order and each sees the outputs of the converted blocks before it:

* the inputs of block 0 are caught once (norms before the blocks — an embedding LayerNorm — are
  captured on the way, converted, and the inputs caught again);
* for each block: its norms' inputs are captured while the cached hidden states run through the
  *source* block, up to the norm it calls last (the check batches' pass through the source block
  tells which), the norms are fitted and replaced, and the converted block produces the next
  block's inputs;
* norms after the blocks (the final norm) are captured by replaying the last block's outputs
  into the model's tail.

The source's outputs on a few check batches are carried through the same blocks side by side,
so the end-to-end check (stage 3) needs no second copy of the model — in memory or streamed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn

from ..calibration import LayerFit, capture_inputs, fit_layer, fit_layer_data_free, source_outputs
from ..layers import IBNormBase, from_spec
from ..surgery import NormSite, replace_norms
from ..validate import check_seq_len
from .layout import CachedCall, catch_block_inputs, last_called, recorded_calls, run_block, run_tail, stop_after
from .options import ConvertOptions, Progress
from .plan import Plan
from .stores import ModelStore

DATA_FREE_ASSUMPTION = (
    "data-free: standardized deviations z assumed N(0,1) in every channel; one λ per layer; "
    "outlier channels cannot be seen without data (use --calib for language models)"
)
# Captured inputs kept for the back-off refits, over all layers: each norm keeps an equal share, its
# rows evenly thinned to it as soon as it is fitted (so the cache never holds more); the source's
# outputs on those rows are kept beside them (as much again).
REFIT_CACHE_BYTES = 1 << 30


@dataclass
class Fitted:
    site: NormSite  # the source norm, with real weights
    fit: LayerFit
    inputs: Callable[[], Tensor] | None = None  # gives back the captured inputs kept for back-off refits (store.keep)
    targets: Callable[[], Tensor] | None = None  # the source's outputs on those inputs: the same for every trial


@dataclass
class Calibrated:
    fits: dict[str, Fitted]
    record: dict  # what the manifest says about calibration
    reference: list[Tensor] = field(default_factory=list)  # the source's outputs on the check batches
    outputs: list[Tensor] = field(default_factory=list)  # the converted model's, on the same batches
    check_batches: list[Tensor] = field(default_factory=list)


def build(fitted: Fitted, opts: ConvertOptions, lam: Tensor | None = None) -> IBNormBase:
    """The IBNorm module of a fitted norm, in the source's dtype (running statistics stay float32)."""
    site, fit = fitted.site, fitted.fit
    m = from_spec(site.spec, op=opts.op, lam=fit.lam if lam is None else lam, grouping=opts.grouping)
    like = next(iter(site.module.parameters()), None)
    with torch.no_grad():
        if fit.weight is not None and m.weight is not None:
            m.weight.copy_(fit.weight)
        if fit.bias is not None and m.bias is not None:
            m.bias.copy_(fit.bias)
        for k, v in (fit.running or {}).items():
            if getattr(m, k, None) is not None:
                getattr(m, k).copy_(v)
    if like is not None and like.is_floating_point():
        for p in m.parameters(recurse=False):
            if p is not m.lam:
                p.data = p.data.to(like.dtype)
    return m


def install(model: nn.Module, modules: dict[str, nn.Module], store: ModelStore | None = None) -> None:
    """Put ``modules`` in place by name (a module shared by several names stays shared), placed by
    ``store`` (its device; a streamed store also rounds γ, β to the dtype they are written in)."""
    if not modules:
        return
    current = [NormSite(name, model.get_submodule(name), None) for name in modules]
    replace_norms(model, current, lambda s: store.place(modules[s.name], s.name) if store is not None else modules[s.name])


def calibrate_data_free(plan: Plan, opts: ConvertOptions, progress: Progress) -> Calibrated:
    fits = {}
    for i, site in enumerate(plan.sites):
        progress("calibrating layers", i, len(plan.sites))
        real = plan.store.source_norm(site)
        fits[site.name] = Fitted(real, fit_layer_data_free(real.spec, opts.op, opts.tolerance, opts.lam))
    progress("calibrating layers", len(plan.sites), len(plan.sites))
    return Calibrated(fits, {"assumption": DATA_FREE_ASSUMPTION})


def _fit(plan: Plan, site: NormSite, x: Tensor | None, opts: ConvertOptions) -> Fitted:
    """Fit one norm on its captured inputs (none: the data-free assumption)."""
    real = plan.store.source_norm(site)
    if x is None:
        fit = fit_layer_data_free(real.spec, opts.op, opts.tolerance, opts.lam)
    else:
        fit = fit_layer(real.spec, real.module, x, opts.op, opts.tolerance, opts.lam)
        kept = _thinned(x, REFIT_CACHE_BYTES // len(plan.sites))
        # the source's outputs are computed once here, not per back-off trial, and kept like the inputs
        return Fitted(real, fit, plan.store.keep(kept), plan.store.keep(source_outputs(real.spec, real.module, kept)))
    return Fitted(real, fit)


def _thinned(x: Tensor, budget: int) -> Tensor:
    """``x`` (float32) kept for refits within ``budget`` bytes: evenly spaced rows."""
    if x.numel() * 4 <= budget or x.shape[0] <= 1:
        return x
    n = max(1, budget // (x[0].numel() * 4))
    return x[torch.linspace(0, x.shape[0] - 1, n).long()].clone()


class _Sequential:
    """One calibration pass over the data: the intermediates cache and the steps that move it along."""

    def __init__(self, plan: Plan, opts: ConvertOptions, inputs: Tensor, progress: Progress) -> None:
        self.plan, self.opts, self.progress = plan, opts, progress
        self.model, self.family, self.store, self.blocks = plan.model, plan.family, plan.store, plan.blocks
        device = self.store.device
        self.batches = [inputs[i : i + opts.batch_size].to(device) for i in range(0, len(inputs), opts.batch_size)]
        n_check = max(1, min(8, len(inputs) // 2))
        self.check_batches = [inputs[i : i + opts.batch_size].to(device)[: n_check - i] for i in range(0, n_check, opts.batch_size)]
        self.fits: dict[str, Fitted] = {}

    def run(self, batch: Tensor) -> None:
        self.family.run(self.model, batch)

    def capture(self, sites: list[NormSite], run) -> dict[str, Tensor]:
        modules = {s.name: self.model.get_submodule(s.name) for s in sites}
        channel = [s.name for s in sites if s.spec.grouping in ("batch", "group")]
        return capture_inputs(self.model, modules, run, self.opts.max_rows, channel, self.opts.seed)

    def fit_and_install(self, sites: list[NormSite], inputs: dict[str, Tensor]) -> None:
        built = {}
        for s in sites:
            self.fits[s.name] = _fit(self.plan, s, inputs.get(s.name), self.opts)
            built[s.name] = build(self.fits[s.name], self.opts)
        install(self.model, built, self.store)

    # --- the stages of the pass ---------------------------------------------------------------
    def whole_model(self) -> tuple[list[Tensor], list[Tensor]]:
        """No block layout: the model is one block, every norm fitted on the source's activations."""
        reference = [self.family.outputs(self.model, b) for b in self.check_batches]
        inputs = self.capture(self.plan.sites, lambda: [self.run(b) for b in self.batches])
        self.fit_and_install(self.plan.sites, inputs)
        return reference, [self.family.outputs(self.model, b) for b in self.check_batches]

    def blockwise(self) -> tuple[list[Tensor], list[Tensor]]:
        blocks, outside = self.blocks, self.plan.outside_sites
        self.store.prepare(blocks)
        reference_calls = catch_block_inputs(blocks, self.run, self.check_batches)
        calls_box: list[list[CachedCall]] = []
        pre = self.capture(outside, lambda: calls_box.append(catch_block_inputs(blocks, self.run, self.batches)))
        pre_sites = [s for s in outside if s.name in pre]
        calls = calls_box[0]
        if pre_sites:  # e.g. an embedding LayerNorm: convert it, then catch the block inputs again
            self.fit_and_install(pre_sites, pre)
            calls = catch_block_inputs(blocks, self.run, self.batches)
        self.store.release_outside()
        for i in range(len(blocks)):
            self.progress("calibrating blocks", i, len(blocks))
            calls, reference_calls = self.block(i, calls, reference_calls)
        self.progress("calibrating blocks", len(blocks), len(blocks))
        return self.tail([s for s in outside if s.name not in pre], calls, reference_calls)

    def block(self, i: int, calls: list[CachedCall], reference_calls: list[CachedCall]):
        blocks = self.blocks
        block = self.store.block(blocks, i)
        sites = self.plan.block_sites(i)
        modules = {s.name: self.model.get_submodule(s.name) for s in sites}
        with torch.no_grad():  # the source block on the check batches; the first tells the norms' call order
            with recorded_calls(modules) as order:
                hidden = [run_block(blocks, block, reference_calls[0])]
            hidden += [run_block(blocks, block, c) for c in reference_calls[1:]]
            reference_calls = [(h, c[1], c[2]) for h, c in zip(hidden, reference_calls)]
        if sites:
            inputs = self.capture(sites, lambda: self.run_until(block, calls, last_called(order, list(modules))))
            self.fit_and_install(sites, inputs)
        with torch.no_grad():
            calls = [(run_block(blocks, block, c), c[1], c[2]) for c in calls]
        self.store.release(blocks, i, block)
        return calls, reference_calls

    def run_until(self, block: nn.Module, calls: list[CachedCall], last: str | None) -> None:
        """The block on every cached call, each stopped once the norm called last has run: the
        capture needs no more (in a transformer block the MLP after the second norm is skipped)."""
        if last is None:  # a norm called twice or not at all: run the whole block
            for c in calls:
                run_block(self.blocks, block, c)
            return
        with stop_after(self.model.get_submodule(last)) as guard:
            for c in calls:
                guard(lambda c=c: run_block(self.blocks, block, c))

    def tail(self, post: list[NormSite], calls, reference_calls) -> tuple[list[Tensor], list[Tensor]]:
        """Norms after the blocks, fed by the last block's outputs; then the check outputs of both models."""
        blocks, outputs = self.blocks, self.family.outputs
        self.store.prepare(blocks)
        reference = run_tail(blocks, lambda b: outputs(self.model, b), self.check_batches, [c[0] for c in reference_calls])
        if post:
            last = [c[0] for c in calls]

            def replay() -> None:
                with stop_after(self.model.get_submodule(post[-1].name)) as guard:
                    for b, h in zip(self.batches, last):
                        guard(lambda: run_tail(blocks, self.run, [b], [h]))

            self.fit_and_install(post, self.capture(post, replay))
        check_hidden = [c[0][: len(b)] for c, b in zip(calls, self.check_batches)]
        converted = run_tail(blocks, lambda b: outputs(self.model, b), self.check_batches, check_hidden)
        return reference, converted


def calibrate_with_data(plan: Plan, opts: ConvertOptions, progress: Progress) -> Calibrated:
    progress("reading calibration data", 0, 1)
    if plan.family.task != "image-classifier":
        check_seq_len(opts.seq_len, getattr(plan.model, "config", None))
    inputs = plan.family.calibration_inputs(opts.calib, plan.tokenizer, opts.calib_samples, opts.seq_len,
                                            opts.text_field, plan.model)
    if plan.family.task == "image-classifier":
        record = {"data": opts.calib, "images": len(inputs)}
    else:
        record = {"data": opts.calib, "samples": int(inputs.shape[0]), "seq_len": int(inputs.shape[1]), "tokens": int(inputs.numel())}
    run = _Sequential(plan, opts, inputs, progress)
    if plan.blocks is None:
        record["order"] = "all layers from the source model's activations"
        reference, outputs = run.whole_model()
    else:
        record["order"] = f"block by block ({plan.blocks.path}): each block sees the outputs of converted earlier blocks"
        reference, outputs = run.blockwise()
    return Calibrated(run.fits, record, reference, outputs, run.check_batches)


def calibrate(plan: Plan, opts: ConvertOptions, progress: Progress) -> Calibrated:
    record = {"mode": "data-free" if opts.calib is None else "data", "tolerance": opts.tolerance, "fixed_lam": opts.lam}
    if plan.store.streaming:
        record["streaming"] = True
    result = calibrate_data_free(plan, opts, progress) if opts.calib is None else calibrate_with_data(plan, opts, progress)
    result.record = {**record, **result.record}
    return result
