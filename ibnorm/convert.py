"""Conversion: find every norm, calibrate λ, replace, check the whole model, back off if needed."""

from __future__ import annotations

import time
from pathlib import Path
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from . import evaluate
from .calibration import LayerFit, capture_inputs, fit_layer, fit_layer_data_free, refit_for_lambda
from .calibration.pipeline import calibrate_blocks, catch_block_inputs, find_blocks
from .data import image_folder, is_image_folder, load_images, read_texts, token_blocks
from .errors import IBNormError
from .io.sources import LoadedModel
from .layers import IBNormBase, from_spec
from .surgery import NormSite, SkippedNorm, find_norms, replace_norms

# A back-off schedule for λ when the whole model drifts past its budget.
_E2E_BACKOFF = (0.9, 0.8, 0.7, 0.6, 0.5, 0.35, 0.25, 0.1, 0.0)

Progress = Callable[[str, int, int], None]


@dataclass
class ConvertOptions:
    variant: str = "auto"
    op: str = "tanh"
    lam: float | None = None  # fixed λ for every channel; None = calibrate
    only: Sequence[str] = ()
    exclude: Sequence[str] = ()
    calib: str | None = None
    calib_samples: int = 32
    seq_len: int = 256
    tolerance: float = 0.001
    budget: float = 0.01  # end-to-end: mean next-token KL (nats), or 1 − cosine for encoders
    max_rows: int = 4096
    batch_size: int = 4
    text_field: str = "text"
    seed: int = 0


@dataclass
class LayerRecord:
    name: str
    source_class: str
    new_class: str
    variant: str
    op: str
    lam_shape: list[int]
    lam_mean: float
    lam_min: float
    lam_max: float
    frac_lam_ge_0_1: float
    frac_lam_zero: float
    error: float
    note: str = ""


@dataclass
class ConversionResult:
    model: nn.Module
    layers: list[LayerRecord]
    skipped: list[SkippedNorm]
    calibration: dict
    end_to_end: dict = field(default_factory=dict)
    seconds: float = 0.0

    def summary(self) -> dict:
        return {
            "layers": [asdict(r) for r in self.layers],
            "skipped": [asdict(s) for s in self.skipped],
            "calibration": self.calibration,
            "end_to_end": self.end_to_end,
            "seconds": round(self.seconds, 2),
        }


def _lam_record(site: NormSite, module: IBNormBase, fit: LayerFit, variant: str, op: str) -> LayerRecord:
    lam = module.effective_lam.float().reshape(-1)
    return LayerRecord(
        site.name, site.spec.source_class, type(module).__name__, variant, op, list(module.lam.shape),
        float(lam.mean()), float(lam.min()), float(lam.max()), float((lam >= 0.1).float().mean()),
        float((lam == 0).float().mean()), fit.error, site.spec.note,
    )


def _build(site: NormSite, fit: LayerFit, opts: ConvertOptions) -> IBNormBase:
    m = from_spec(site.spec, op=opts.op, lam=fit.lam, variant=opts.variant)
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
        # Parameters take the source dtype; running statistics stay float32.
        for p in m.parameters(recurse=False):
            p.data = p.data.to(like.dtype) if p is not m.lam else p.data
    return m


class _Calibration:
    """Calibration inputs for one model: a way to run them and to measure end-to-end drift."""

    def __init__(self, loaded: LoadedModel, opts: ConvertOptions) -> None:
        self.loaded, self.opts = loaded, opts
        model = loaded.model
        if loaded.task == "image-classifier" or is_image_folder(opts.calib):
            if loaded.family != "timm":
                raise IBNormError("image calibration data needs a timm image model")
            import timm

            cfg = timm.data.resolve_data_config({}, model=model)
            transform = timm.data.create_transform(**cfg)
            images, _ = load_images(image_folder(opts.calib), transform, opts.calib_samples)
            self.inputs = images.to(_dtype(model))
            self.kind = "images"
            self.describe = {"data": opts.calib, "images": len(images)}
        else:
            if loaded.tokenizer is None:
                raise IBNormError(f"{loaded.source} has no tokenizer: text calibration is not possible")
            texts = read_texts(opts.calib, opts.text_field)
            self.inputs = token_blocks(loaded.tokenizer, texts, opts.seq_len, opts.calib_samples)
            self.kind = "tokens"
            self.describe = {"data": opts.calib, "samples": int(self.inputs.shape[0]), "seq_len": int(self.inputs.shape[1]),
                             "tokens": int(self.inputs.numel())}
        n_check = max(1, min(8, len(self.inputs) // 2 or 1))
        self.check_inputs = self.inputs[:n_check]
        self.reference = self._outputs(model)

    def run_all(self) -> None:
        model, bs = self.loaded.model, self.opts.batch_size
        for i in range(0, len(self.inputs), bs):
            chunk = self.inputs[i : i + bs]
            model(chunk) if self.kind == "images" else model(input_ids=chunk, use_cache=False)

    def _outputs(self, model: nn.Module) -> Tensor:
        if self.kind == "images":
            return evaluate.image_logits(model, self.check_inputs)
        if self.loaded.task == "causal-lm":
            return evaluate.lm_logprobs(model, self.check_inputs, self.opts.batch_size)
        return evaluate.embeddings(model, self.check_inputs, self.opts.batch_size)

    @property
    def metric_name(self) -> str:
        if self.kind == "images":
            return "KL nats/image"
        return "KL nats/token" if self.loaded.task == "causal-lm" else "1 - cosine"

    def drift(self, model: nn.Module) -> float:
        if self.kind == "images":
            return evaluate.kl_from_logits(self.reference, evaluate.image_logits(model, self.check_inputs))
        if self.loaded.task == "causal-lm":
            return evaluate.lm_kl(model, self.check_inputs, self.reference, self.opts.batch_size)
        return 1.0 - evaluate.embedding_agreement(self.reference, evaluate.embeddings(model, self.check_inputs))["mean_cosine"]


def _dtype(model: nn.Module) -> torch.dtype:
    p = next(iter(model.parameters()), None)
    return p.dtype if p is not None and p.is_floating_point() else torch.float32


def convert_model(loaded: LoadedModel, opts: ConvertOptions, progress: Progress | None = None) -> ConversionResult:
    """Convert ``loaded.model`` in place and return what was done."""
    t0 = time.perf_counter()
    progress = progress or (lambda *_: None)
    model = loaded.model
    sites, skipped = find_norms(model, opts.only, opts.exclude)
    if not sites:
        raise IBNormError(f"no convertible normalization layers found in {loaded.source}"
                          + (f" ({len(skipped)} skipped: {skipped[0].reason})" if skipped else ""))
    calibration: dict = {"mode": "data-free" if opts.calib is None else "data",
                         "tolerance": opts.tolerance, "fixed_lam": opts.lam}
    fits: dict[str, LayerFit] = {}
    inputs: dict[str, Tensor] = {}

    def fit(site: NormSite, x: Tensor | None) -> LayerFit:
        if x is None:
            fits[site.name] = fit_layer_data_free(site.spec, opts.op, opts.tolerance, opts.lam)
        else:
            fits[site.name] = fit_layer(site.spec, site.module, x, opts.op, opts.tolerance, opts.lam)
        return fits[site.name]

    calib = None
    if opts.calib is None:
        calibration["assumption"] = (
            "data-free: standardized deviations z assumed N(0,1) in every channel; one λ per layer; "
            "outlier channels cannot be seen without data (use --calib for language models)"
        )
        for i, site in enumerate(sites):
            progress("calibrating layers", i, len(sites))
            fit(site, None)
        new = replace_norms(model, sites, lambda s: _build(s, fits[s.name], opts))
    else:
        calib = _Calibration(loaded, opts)
        calibration.update(calib.describe)
        blocks = find_blocks(model) if loaded.family == "hf" and calib.kind == "tokens" else None
        if blocks is not None:
            calibration["order"] = f"block by block ({blocks.path}): each block sees the outputs of converted earlier blocks"
            inputs = _calibrate_sequential(model, blocks, sites, calib, opts, fit, progress)
        else:
            calibration["order"] = "all layers from the source model's activations"
            progress("capturing norm inputs", 0, 1)
            channel_names = [s.name for s in sites if s.spec.kind in ("batch", "group")]
            inputs = capture_inputs(model, {s.name: s.module for s in sites}, calib.run_all, opts.max_rows, channel_names, opts.seed)
            for i, site in enumerate(sites):
                progress("calibrating layers", i, len(sites))
                fit(site, inputs.get(site.name))
            replace_norms(model, sites, lambda s: _build(s, fits[s.name], opts))
        new = {s.name: model.get_submodule(s.name) for s in sites}
    end_to_end: dict = {}
    if calib is not None:
        drift = calib.drift(model)
        end_to_end = {"metric": calib.metric_name, "budget": opts.budget, "value": drift, "backoff_factor": 1.0}
        if opts.lam is None and drift > opts.budget:
            calibrated = dict(fits)
            for factor in _E2E_BACKOFF:
                progress(f"backing off λ ×{factor}", 0, 1)
                for site in sites:
                    fits[site.name] = refit_for_lambda(site.spec, site.module, inputs[site.name], opts.op, calibrated[site.name].lam * factor)
                current = [NormSite(s.name, new[s.name], s.spec) for s in sites]
                new = replace_norms(model, current, lambda s: _build(s, fits[s.name], opts))
                drift = calib.drift(model)
                end_to_end.update(value=drift, backoff_factor=factor)
                if drift <= opts.budget:
                    break
        end_to_end["within_budget"] = drift <= opts.budget
    records = [_lam_record(s, new[s.name], fits[s.name], _variant_of(new[s.name]), opts.op) for s in sites]
    return ConversionResult(model, records, skipped, calibration, end_to_end, time.perf_counter() - t0)


def _calibrate_sequential(model: nn.Module, blocks, sites: list[NormSite], calib: "_Calibration", opts: ConvertOptions,
                          fit, progress: Progress) -> dict[str, Tensor]:
    """Norms before the blocks, then each block in order, then the norms after them."""
    wanted = {s.name for s in sites}
    outside = [s for s in sites if not s.name.startswith(blocks.path + ".")]
    batches = [calib.inputs[i : i + opts.batch_size] for i in range(0, len(calib.inputs), opts.batch_size)]

    def run_batch(b: Tensor) -> None:
        model(input_ids=b, use_cache=False)

    holder: dict = {}

    def catch() -> None:
        holder["calls"] = catch_block_inputs(blocks, run_batch, batches)

    progress("capturing block inputs", 0, 1)
    pre_inputs = capture_inputs(model, {s.name: s.module for s in outside}, catch, opts.max_rows, (), opts.seed)
    pre = [s for s in outside if s.name in pre_inputs]
    if pre:  # e.g. an embedding LayerNorm: convert it, then catch the block inputs again
        replace_norms(model, pre, lambda s: _build(s, fit(s, pre_inputs[s.name]), opts))
        catch()
    inputs = dict(pre_inputs)
    results, _ = calibrate_blocks(
        blocks, holder["calls"], lambda ss: [s for s in ss if s.name in wanted],
        lambda s, x: _build(s, fit(s, x), opts), opts.max_rows, opts.seed, progress=progress)
    for r in results:
        inputs.update(r.inputs)
    post = [s for s in outside if s.name not in pre_inputs]
    if post:  # e.g. the final norm: the converted blocks feed it
        post_inputs = capture_inputs(model, {s.name: s.module for s in post}, calib.run_all, opts.max_rows, (), opts.seed)
        replace_norms(model, post, lambda s: _build(s, fit(s, post_inputs.get(s.name)), opts))
        inputs.update(post_inputs)
    return inputs


def _variant_of(m: IBNormBase) -> str:
    from .layers import IBBatchNorm, IBGroupNorm, IBLayerNorm

    if isinstance(m, IBBatchNorm):
        return "batch"
    if isinstance(m, IBGroupNorm):
        return "group"
    return "layer" if isinstance(m, IBLayerNorm) else "rms"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def model_card(manifest: dict) -> str:
    lam = [layer["lam_mean"] for layer in manifest["layers"]]
    lines = [
        f"# {Path(str(manifest['source']['name'])).name} with IBNorm",
        "",
        f"Converted by ibnorm {manifest['versions']['ibnorm'] if 'versions' in manifest else ''} from `{manifest['source']['name']}` "
        f"(`{manifest['source']['resolved']}`): {len(manifest['layers'])} normalization layers replaced by IBNorm "
        f"(op `{manifest['options']['op']}`, variant `{manifest['options']['variant']}`).",
        "",
        f"- calibration: {manifest['calibration']['mode']}"
        + (f" on `{manifest['calibration'].get('data')}`" if manifest['calibration'].get('data') else ""),
        f"- mean λ over layers: {sum(lam) / len(lam):.4g}",
    ]
    if manifest.get("end_to_end", {}).get("metric"):
        e = manifest["end_to_end"]
        lines.append(f"- end-to-end drift ({e['metric']}): {e['value']:.4g} (budget {e['budget']})")
    if manifest.get("evaluation"):
        e = manifest["evaluation"]
        lines.append(f"- {e['metric']}: source {e['source']}, converted {e['converted']}")
    lines += ["", "Load it with `ibnorm.load(path)`; `ibnorm_manifest.json` records every layer's λ and error.", ""]
    return "\n".join(lines)


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
) -> tuple[ConversionResult, dict]:
    """Load ``source``, convert it, optionally evaluate before/after, and write ``out``.

    ``stream``: ``always`` streams block by block from the shards, ``never`` loads the whole
    model, ``auto`` streams when the whole model would not fit comfortably in memory (and refuses,
    showing the estimate, when such a model cannot be streamed).
    """
    from .io.checkpoint import FORMAT, save_converted
    from .io.sources import load_source, resolve_short_name

    out = Path(out)
    if out.exists() and not force:  # fail before any work
        from .errors import OutputExistsError

        raise OutputExistsError(f"{out} already exists; pass --force to replace it")
    progress = progress or (lambda *_: None)
    if stream not in ("auto", "always", "never"):
        raise IBNormError(f"unknown stream mode {stream!r}; choose auto, always or never")
    hf_dir = _hf_safetensors_dir(resolve_short_name(source))
    if hf_dir is not None and stream != "never" and weights is None:
        if stream == "always" or _needs_streaming(hf_dir, opts):
            if eval_data:
                raise IBNormError("--eval needs the whole model in memory; evaluate the output with `ibnorm eval` instead")
            from .streaming import convert_streaming

            return convert_streaming(hf_dir, out, opts, shard_size=shard_size, force=force, progress=progress, source_name=source)
    elif stream == "always":
        raise IBNormError(f"streaming needs a local transformers directory with safetensors weights; {source} is not one")
    progress("loading source", 0, 1)
    loaded = load_source(source, allow_pickle=allow_pickle, weights=weights, pretrained=pretrained, dtype=dtype)
    progress("loading source", 1, 1)
    before = evaluate.evaluate_model(loaded, loaded.model, eval_data, opts.seq_len * 2, eval_tokens, opts.text_field) if eval_data else None
    result = convert_model(loaded, opts, progress)
    evaluation = {}
    if before is not None:
        progress("evaluating", 0, 1)
        after = evaluate.evaluate_model(loaded, result.model, eval_data, opts.seq_len * 2, eval_tokens, opts.text_field)
        evaluation = {"data": eval_data, **evaluate.compare(before, after)}
    manifest = {
        "format": FORMAT,
        "source": {"name": source, "resolved": loaded.resolved, "family": loaded.family, **loaded.info},
        "family": loaded.family,
        "task": loaded.task,
        "dtype": _dtype_name(_dtype(result.model)),
        "options": {k: v for k, v in asdict(opts).items() if k not in ("batch_size",)},
        **result.summary(),
        "evaluation": evaluation,
    }
    manifest["options"]["only"], manifest["options"]["exclude"] = list(opts.only), list(opts.exclude)
    progress("writing", 0, 1)
    save_converted(result.model, out, manifest, family=loaded.family, tokenizer=loaded.tokenizer, hf_dir=loaded.hf_dir,
                   timm_name=loaded.timm_name, shard_size=shard_size, force=force, model_card=model_card(manifest))
    progress("writing", 1, 1)
    return result, manifest


def _hf_safetensors_dir(resolved: str) -> Path | None:
    p = Path(resolved)
    if p.is_dir() and (p / "config.json").is_file() and any(p.glob("*.safetensors")):
        return p
    return None


def whole_model_estimate(hf_dir: Path, opts: ConvertOptions) -> tuple[int, int]:
    """(bytes a whole-model conversion needs, bytes available): weights, a working copy of the largest
    tensors, and the calibration activations."""
    import psutil

    from .io.safetensors_index import TensorIndex

    index = TensorIndex.open(hf_dir)
    weights = sum(t.nbytes for t in index.tensors.values())
    hidden = max((t.shape[-1] for t in index.tensors.values() if len(t.shape) == 2), default=0)
    activations = 0 if opts.calib is None else opts.calib_samples * opts.seq_len * hidden * 4 * 4
    index.close()
    return int(weights * 1.25) + activations, psutil.virtual_memory().available


def _needs_streaming(hf_dir: Path, opts: ConvertOptions) -> bool:
    from .streaming import skeleton, streamable

    need, available = whole_model_estimate(hf_dir, opts)
    if need <= 0.7 * available:
        return False
    config, _, model = skeleton(hf_dir)
    ok, why = streamable(config, model)
    if not ok:
        raise IBNormError(
            f"whole-model conversion of {hf_dir} needs about {need / 2**30:.1f} GiB, only {available / 2**30:.1f} GiB "
            f"is available, and it cannot be streamed ({why}); use a machine with more memory")
    return True
