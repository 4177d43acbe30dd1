"""Convert models larger than memory: a meta-device skeleton, tensors read lazily from the shards.

Without calibration the conversion is a pure shard-to-shard stream in which only norm tensors
change.  With calibration, blocks are loaded one at a time and calibrated in order
(``calibration.pipeline``), each seeing the outputs of the converted blocks before it; a block's
tensors are written as soon as it is done and the block is freed.  Every tensor that is not a
norm is copied from the source bytes in its source dtype.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch import Tensor, nn

from .calibration import LayerFit, fit_layer, fit_layer_data_free
from .calibration.pipeline import Blocks, calibrate_blocks, catch_block_inputs, find_blocks
from .convert import ConversionResult, ConvertOptions, LayerRecord, Progress, _build, _lam_record, _variant_of
from .data import read_texts, token_blocks
from .errors import IBNormError
from .io.checkpoint import FORMAT, MANIFEST, _copy_side_files, atomic_directory, versions, write_json_atomic
from .io.safetensors_index import TensorIndex
from .io.stream_writer import PlannedTensor, ShardedWriter, parse_size
from .recognize import recognize
from .surgery import NormSite, find_norms

# Architectures whose only norm outside the blocks is a final norm fed by the last block.
STREAMABLE_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gpt2", "gpt_neox", "gemma", "phi3", "olmo", "smollm3")


def skeleton(source_dir: Path):
    """(config, task, meta-device model) of an HF directory; buffers (rotary tables) are real."""
    import transformers
    from accelerate import init_empty_weights

    from .io.sources import _hf_task

    config = transformers.AutoConfig.from_pretrained(source_dir)
    task = _hf_task(config, False)
    auto = transformers.AutoModelForCausalLM if task == "causal-lm" else transformers.AutoModel
    with init_empty_weights(include_buffers=False):
        model = auto.from_config(config)
    return config, task, model.eval()  # from_config leaves dropout on


def streamable(config, model: nn.Module) -> tuple[bool, str]:
    if config.model_type not in STREAMABLE_MODEL_TYPES:
        return False, f"streaming supports {', '.join(STREAMABLE_MODEL_TYPES)}; this is {config.model_type!r}"
    if find_blocks(model) is None:
        return False, "no repeated decoder blocks found"
    return True, ""


def _set_tensor(module: nn.Module, name: str, value: Tensor) -> None:
    from accelerate.utils import set_module_tensor_to_device

    set_module_tensor_to_device(module, name, value.device, value=value)


def _materialize(module: nn.Module, prefix: str, index: TensorIndex, dtype: torch.dtype, device) -> nn.Module:
    """Fill a meta-device module with its tensors from the checkpoint."""
    for name, _ in list(module.named_parameters()):
        key = f"{prefix}{name}"
        if key not in index:
            raise IBNormError(f"checkpoint has no tensor {key!r}")
        _set_tensor(module, name, index.get(key).to(device=device, dtype=dtype))
    return module


def _norm_plan(site: NormSite, source: dict[str, PlannedTensor]) -> list[PlannedTensor]:
    """Output tensors of a converted norm: weight/bias in the source dtype, λ in float32 (one per channel)."""
    out = []
    for leaf in ("weight", "bias"):
        src = source.get(f"{site.name}.{leaf}")
        if src is not None:
            out.append(src)
    out.append(PlannedTensor(f"{site.name}.lam", "F32", tuple(site.spec.shape)))
    return out


def convert_streaming(
    source_dir: str | Path,
    out: str | Path,
    opts: ConvertOptions,
    *,
    shard_size: str = "5GB",
    force: bool = False,
    progress: Progress | None = None,
    source_name: str | None = None,
) -> tuple[ConversionResult, dict]:
    """Stream-convert an HF safetensors directory into ``out`` (atomically)."""
    t0 = time.perf_counter()
    progress = progress or (lambda *_: None)
    source_dir, out = Path(source_dir), Path(out)
    if out.exists() and not force:
        from .errors import OutputExistsError

        raise OutputExistsError(f"{out} already exists; pass --force to replace it")
    index = TensorIndex.open(source_dir)
    config, task, model = skeleton(source_dir)
    ok, why = streamable(config, model)
    if not ok:
        raise IBNormError(f"cannot stream-convert {source_dir}: {why}")
    blocks = find_blocks(model)
    sites, skipped = find_norms(model, opts.only, opts.exclude)
    if not sites:
        raise IBNormError(f"no convertible normalization layers found in {source_dir}")
    site_by_name = {s.name: s for s in sites}
    expected = {n for n, _ in model.named_parameters()}
    missing = sorted(expected - set(index.tensors) - _tied_names(model))
    if missing:
        raise IBNormError(f"checkpoint is missing tensor {missing[0]!r} (+{len(missing) - 1} more)")

    # Plan: everything outside the blocks except norms, then each block, then the norms outside the blocks.
    source_plan = {n: PlannedTensor(n, t.dtype, t.shape) for n, t in index.tensors.items()}
    norm_tensor = {f"{s.name}.{leaf}": s for s in sites for leaf in ("weight", "bias")}
    block_prefix = blocks.path + "."

    def group(name: str) -> tuple[int, str]:
        if name.startswith(block_prefix):
            return 1 + int(name[len(block_prefix) :].split(".", 1)[0]), name
        return (len(blocks.modules) + 1 if name in norm_tensor else 0), name

    plan: list[PlannedTensor] = []
    emitted: set[str] = set()
    for name in sorted(index.tensors, key=group):
        site = norm_tensor.get(name)
        if site is None:
            plan.append(source_plan[name])
        elif site.name not in emitted:
            emitted.add(site.name)
            plan.extend(_norm_plan(site, source_plan))
    compute_device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    fits: dict[str, LayerFit] = {}
    records: list[LayerRecord] = []
    calibration: dict = {"mode": "data-free" if opts.calib is None else "data", "tolerance": opts.tolerance,
                         "fixed_lam": opts.lam, "streaming": True}

    with atomic_directory(out, force) as tmp:
        writer = ShardedWriter(tmp, plan, parse_size(shard_size))

        def write_norm(site: NormSite, module: nn.Module, fit: LayerFit) -> None:
            fits[site.name] = fit
            new = _build(site, fit, opts)
            records.append(_lam_record(site, new, fit, _variant_of(new), opts.op))
            state = new.state_dict()
            for t in _norm_plan(site, source_plan):
                leaf = t.name.rsplit(".", 1)[1]
                writer.write(t.name, state[leaf].to(getattr(torch, _torch_dtype_name(t.dtype))))

        def copy_until(stop) -> None:
            """Copy source tensors (bit for bit) until the next planned tensor belongs to a norm site or to ``stop``."""
            while writer.next_name is not None:
                name = writer.next_name
                if name.rsplit(".", 1)[0] in site_by_name or stop(name):
                    return
                writer.write(name, index.get(name))

        def real_norm(site: NormSite, device="cpu") -> NormSite:
            module = copy.deepcopy(site.module) if any(p.is_meta for p in site.module.parameters()) else site.module
            if any(p.is_meta for p in module.parameters()):
                module = _materialize(module, f"{site.name}.", index, _source_dtype(index, site), device)
            return NormSite(site.name, module, recognize(module) or site.spec)

        if opts.calib is None:
            calibration["assumption"] = ("data-free: standardized deviations z assumed N(0,1) in every channel; one λ per layer; "
                                         "outlier channels cannot be seen without data")
            done = 0
            while writer.next_name is not None:
                copy_until(lambda _: False)
                name = writer.next_name
                if name is None:
                    break
                site = real_norm(site_by_name[name.rsplit(".", 1)[0]])
                write_norm(site, site.module, fit_layer_data_free(site.spec, opts.op, opts.tolerance, opts.lam))
                done += 1
                progress("converting (streaming)", done, len(sites))
        else:
            _stream_calibrated(model, blocks, index, sites, opts, writer, write_norm, copy_until, real_norm,
                               compute_device, calibration, source_dir, progress)
        files = writer.close()
        index.close()

        # config with an ibnorm section, tokenizer and other side files, manifest, card
        cfg = json.loads((source_dir / "config.json").read_text())
        cfg["ibnorm"] = {"format": FORMAT, "manifest": MANIFEST, "op": opts.op}
        write_json_atomic(tmp / "config.json", cfg)
        copied = _copy_side_files(source_dir, tmp)
        records.sort(key=lambda r: [s.name for s in sites].index(r.name))
        result = ConversionResult(None, records, skipped, calibration, {}, time.perf_counter() - t0)
        manifest = {
            "format": FORMAT,
            "source": {"name": source_name or str(source_dir), "resolved": str(source_dir), "family": "hf", "model_type": config.model_type},
            "family": "hf", "task": task, "dtype": str(_dominant_dtype(plan)).removeprefix("torch."),
            "options": {**{k: v for k, v in asdict(opts).items() if k != "batch_size"}, "only": list(opts.only), "exclude": list(opts.exclude)},
            **result.summary(), "evaluation": {}, "copied_files": copied, "shards": files,
            "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "versions": versions(),
        }
        manifest["end_to_end"] = {"note": "not measured in streaming mode (the whole model is never in memory)"}
        write_json_atomic(tmp / MANIFEST, manifest)
        from .convert import model_card

        (tmp / "README.md").write_text(model_card(manifest))
    return result, manifest


def _stream_calibrated(model, blocks: Blocks, index, sites, opts, writer, write_norm, copy_until, real_norm, device,
                       calibration: dict, source_dir: Path, progress: Progress) -> None:
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(source_dir)
    ids = token_blocks(tokenizer, read_texts(opts.calib, opts.text_field), opts.seq_len, opts.calib_samples)
    calibration.update({"data": opts.calib, "samples": int(ids.shape[0]), "seq_len": int(ids.shape[1]), "tokens": int(ids.numel()),
                        "order": f"block by block ({blocks.path}), streamed: each block sees the outputs of converted earlier blocks",
                        "activation_cache_bytes_per_sample": int(ids.shape[1]) * model.config.hidden_size * 4})
    wanted = {s.name for s in sites}
    block_prefix = blocks.path + "."
    outside = [s for s in sites if not s.name.startswith(block_prefix)]
    # Materialize everything outside the blocks (embeddings, final norm, head) in float32 for the forward passes.
    for name, param in list(model.named_parameters()):
        if not name.startswith(block_prefix) and param.is_meta and name in index:
            _set_tensor(model, name, index.get(name).to(device=device, dtype=torch.float32))
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    for b in model.buffers():
        b.data = b.data.to(device)
    batches = [ids[i : i + opts.batch_size].to(device) for i in range(0, len(ids), opts.batch_size)]
    calls = catch_block_inputs(blocks, lambda b: model(input_ids=b, use_cache=False), batches)

    copy_until(lambda name: name.startswith(block_prefix))  # embeddings etc. go first

    def load_block(i: int) -> nn.Module:
        block = blocks.modules[i]
        return _materialize(block, f"{block_prefix}{i}.", index, torch.float32, device)

    def fit_and_build(site: NormSite, x: Tensor | None) -> nn.Module:
        cpu_site = NormSite(site.name, copy.deepcopy(site.module).cpu(), site.spec)
        fit = fit_layer(cpu_site.spec, cpu_site.module, x, opts.op, opts.tolerance, opts.lam) if x is not None \
            else fit_layer_data_free(site.spec, opts.op, opts.tolerance, opts.lam)
        source_dtype = _source_dtype(index, site)
        out_site = NormSite(site.name, _with_dtype(cpu_site.module, source_dtype), recognize(cpu_site.module) or site.spec)
        write_later[site.name] = (out_site, fit)
        return _build(cpu_site, fit, opts).to(device)

    write_later: dict[str, tuple[NormSite, LayerFit]] = {}

    def done_block(result, block: nn.Module) -> None:
        prefix = result.prefix + "."
        while writer.next_name is not None and writer.next_name.startswith(prefix):
            name = writer.next_name
            owner = name.rsplit(".", 1)[0]
            if owner in write_later:
                site, fit = write_later.pop(owner)
                write_norm(site, site.module, fit)
            else:
                writer.write(name, index.get(name))
        block.to("meta")  # free the block

    _, calls = calibrate_blocks(blocks, calls, lambda ss: [s for s in ss if s.name in wanted], fit_and_build,
                                opts.max_rows, opts.seed, load_block=load_block, done_block=done_block,
                                progress=progress, keep_inputs=False)
    # Norms after the blocks (the final norm) see the last block's outputs.
    hidden = torch.cat([c[0].reshape(-1, c[0].shape[-1]) for c in calls]).float().cpu()
    if hidden.shape[0] > opts.max_rows:
        hidden = hidden[torch.randperm(hidden.shape[0], generator=torch.Generator().manual_seed(opts.seed))[: opts.max_rows].sort().values]
    site_by_name = {s.name: s for s in outside}
    while writer.next_name is not None:  # the plan puts these norms last
        copy_until(lambda _: False)
        if writer.next_name is None:
            break
        real = real_norm(site_by_name[writer.next_name.rsplit(".", 1)[0]])
        write_norm(real, real.module, fit_layer(real.spec, real.module, hidden, opts.op, opts.tolerance, opts.lam))


def _with_dtype(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    return copy.deepcopy(module).to(dtype)


def _tied_names(model: nn.Module) -> set[str]:
    """Parameter names that share storage with an earlier one (tied weights are stored once)."""
    seen, tied = {}, set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            tied.add(name)
        seen.setdefault(id(p), name)
    keys = getattr(model, "_tied_weights_keys", None) or []
    tied.update(keys if isinstance(keys, (list, tuple, set)) else dict(keys).keys())
    return tied


def _source_dtype(index: TensorIndex, site: NormSite) -> torch.dtype:
    info = index.tensors.get(f"{site.name}.weight")
    return getattr(torch, _torch_dtype_name(info.dtype)) if info else torch.float32


def _torch_dtype_name(st_dtype: str) -> str:
    from .io.safetensors_index import DTYPES

    return str(DTYPES[st_dtype]).removeprefix("torch.")


def _dominant_dtype(plan: list[PlannedTensor]) -> torch.dtype:
    from collections import Counter

    from .io.safetensors_index import DTYPES

    c = Counter()
    for t in plan:
        c[t.dtype] += t.nbytes
    return DTYPES[c.most_common(1)[0][0]]
