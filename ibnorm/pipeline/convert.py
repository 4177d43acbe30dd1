"""The conversion pipeline: source → plan → calibrate → check → write.

In-memory and streamed conversion run the same stages; they differ only in their store (where
tensors come from and go to, ``stores.py``).
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path

import torch


from .. import evaluate
from ..errors import IBNormError, OutputExistsError
from ..validate import (check_device, check_finite, check_not_special, ensure_disk_space, estimate_output_bytes,
                        seq_len_for, validate_convert_options)
from ..io.atomic import atomic_directory
from ..io.sources import LoadedModel, load_source, refuse_converted, resolve_short_name
from ..layers import IBNormBase
from .calibrate import REFIT_CACHE_BYTES, Calibrated, build, calibrate, install
from .check import check
from .manifest import build_manifest
from .options import CALIB_SEQ_LEN, ConversionResult, ConvertOptions, Progress, layer_record, no_progress
from ..data import check_images, check_text_data, image_folder, is_image_folder, param_dtype
from .plan import Plan, needs_streaming, plan_in_memory, plan_streamed
from .write import write_in_memory, write_streamed

STREAM_MODES = ("auto", "always", "never")


def run_stages(plan: Plan, opts: ConvertOptions, progress: Progress) -> tuple[ConversionResult, dict[str, IBNormBase]]:
    """Calibrate, check and build every norm; in memory they are also put in place."""
    t0 = time.perf_counter()
    cal: Calibrated = calibrate(plan, opts, progress)
    end_to_end = check(plan, cal, opts, progress)
    modules = {name: build(f, opts) for name, f in cal.fits.items()}
    if not plan.store.streaming:
        install(plan.model, modules)
    records = [layer_record(s, modules[s.name], cal.fits[s.name].fit.error) for s in plan.sites]
    result = ConversionResult(None if plan.store.streaming else plan.model, records, plan.skipped, cal.record,
                              end_to_end, time.perf_counter() - t0)
    return result, modules


def convert_model(loaded: LoadedModel, opts: ConvertOptions, progress: Progress | None = None) -> ConversionResult:
    """Convert ``loaded.model`` in place and return what was done (nothing is written)."""
    return run_stages(plan_in_memory(loaded, opts), opts, progress or no_progress)[0]


def _hf_safetensors_dir(resolved: str) -> Path | None:
    p = Path(resolved)
    if p.is_dir() and (p / "config.json").is_file() and any(p.glob("*.safetensors")):
        return p
    return None


def _streams(source: str, opts: ConvertOptions, stream: str, weights: str | None) -> Path | None:
    """The directory to stream from, or None for an in-memory conversion."""
    if stream not in STREAM_MODES:
        raise IBNormError(f"unknown stream mode {stream!r}; choose {', '.join(STREAM_MODES)}")
    hf_dir = _hf_safetensors_dir(resolve_short_name(source))
    if hf_dir is None or stream == "never" or weights is not None:
        if stream == "always":
            raise IBNormError(f"streaming needs a local transformers directory with safetensors weights; {source} is not one")
        return None
    return hf_dir if stream == "always" or needs_streaming(hf_dir, opts) else None


def convert_checkpoint(
    source: str,
    out: str | Path,
    opts: ConvertOptions,
    *,
    allow_pickle: bool = False,
    weights: str | None = None,
    pretrained: bool = True,
    dtype: torch.dtype | None = None,
    eval_data: str | None = None,
    eval_tokens: int = 4096,
    shard_size: str = "5GB",
    force: bool = False,
    progress: Progress | None = None,
    stream: str = "auto",
    device: str = "cpu",
) -> tuple[ConversionResult, dict]:
    """Load ``source``, convert it, optionally evaluate before/after, and write ``out`` atomically.

    ``stream``: ``always`` streams block by block from the shards, ``never`` loads the whole
    model, ``auto`` streams when the whole model would not fit comfortably in memory (and refuses,
    showing the estimate, when such a model cannot be streamed).
    ``device``: where a whole-in-memory model runs its calibration and evaluation forwards
    (``cuda``); it is written from CPU.  A streamed conversion uses the GPU when there is one.
    """
    out = Path(out)
    if out.exists() and not force:  # fail before any work
        raise OutputExistsError(f"{out} already exists; pass --force to replace it")
    progress = progress or no_progress
    resolved = resolve_short_name(source)
    check_not_special(resolved)  # before anything reads the source (a FIFO would block the first read)
    validate_convert_options(lam=opts.lam, tolerance=opts.tolerance, budget=opts.budget, calib_samples=opts.calib_samples,
                             seq_len=opts.seq_len, shard_size=shard_size, source=resolved, weights=weights,
                             random_weights=not pretrained and weights is None and resolved.startswith("timm:"))
    check_device(device)
    refuse_converted(Path(resolved))
    if opts.calib is not None and is_image_folder(opts.calib):  # the data is checked before any model work
        check_images(image_folder(opts.calib), opts.calib_samples)
    elif opts.calib is not None:
        check_text_data(opts.calib, opts.text_field)
    stream_dir = _streams(source, opts, stream, weights)
    if stream_dir is not None and eval_data:
        raise IBNormError("--eval needs the whole model in memory; evaluate the output with `ibnorm eval` instead")
    if stream_dir is not None:
        plan = plan_streamed(stream_dir, opts, source_name=source)
        loaded = None
    else:
        progress("loading source", 0, 1)
        loaded = load_source(source, allow_pickle=allow_pickle, weights=weights, pretrained=pretrained, dtype=dtype)
        progress("loading source", 1, 1)
        loaded.model.to(device)
        plan = plan_in_memory(loaded, opts)
    opts = replace(opts, seq_len=seq_len_for(opts.seq_len, _config(plan), CALIB_SEQ_LEN))
    # the refit cache (inputs and the source's outputs on them) goes to disk when streaming
    spilled = 2 * REFIT_CACHE_BYTES if plan.store.streaming and opts.calib is not None else 0
    ensure_disk_space(out.parent, estimate_output_bytes(_tensor_bytes(plan), sum(math.prod(s.spec.shape) for s in plan.sites),
                                                        spilled))
    with atomic_directory(out, force, source=_source_path(resolved, plan)) as tmp:
        if plan.store.streaming:
            plan.store.open_writer(tmp, shard_size)
        before = _evaluate(loaded, eval_data, opts, eval_tokens) if eval_data else None
        result, modules = run_stages(plan, opts, progress)
        evaluation = {}
        if before is not None:
            progress("evaluating", 0, 1)
            evaluation = {"data": eval_data, **evaluate.compare(before, _evaluate(loaded, eval_data, opts, eval_tokens))}
        dtype_name = str(plan.store.dominant_dtype() if plan.store.streaming else param_dtype(plan.model)).removeprefix("torch.")
        manifest = build_manifest(plan, opts, result, dtype_name, evaluation)
        progress("writing", 0, 1)
        if plan.store.streaming:
            write_streamed(plan, tmp, manifest, modules)
        else:
            plan.model.to("cpu")
            write_in_memory(plan, tmp, manifest, shard_size)
        progress("writing", 1, 1)
    return result, manifest


def _tensor_bytes(plan: Plan) -> int:
    if plan.store.streaming:
        return sum(t.nbytes for t in plan.store.index.tensors.values())
    tensors = list(plan.model.parameters()) + list(plan.model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def _source_path(resolved: str, plan: Plan) -> Path | None:
    """The source on disk (the output may not be, contain or sit inside it)."""
    if plan.source_dir is not None:
        return plan.source_dir
    p = Path(resolved)
    return p if p.exists() else None


def _config(plan: Plan):
    return getattr(plan.model, "config", None)


def _evaluate(loaded: LoadedModel, data: str, opts: ConvertOptions, tokens: int) -> dict:
    window = seq_len_for(None, getattr(loaded.model, "config", None), 2 * opts.seq_len)  # within the positions
    return evaluate.evaluate_model(loaded, loaded.model, data, window, tokens, opts.text_field)


