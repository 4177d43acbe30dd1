"""Stage 1: plan a conversion — which norms, in which block order, read from where."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import IBNormError
from ..io.safetensors_index import TensorIndex
from ..io.sources import LoadedModel
from ..surgery import NormSite, SkippedNorm, find_norms
from ..validate import check_finite, check_grouping, check_hf_checkpoint, read_config, skeleton_of
from .families import ModelFamily, family_of
from .layout import Blocks
from .options import CALIB_SEQ_LEN, ConvertOptions
from .stores import ModelStore, ShardStore


@dataclass
class Plan:
    model: nn.Module  # whole in memory, or a meta-device skeleton when streamed
    family: ModelFamily
    store: ModelStore
    blocks: Blocks | None  # None: the whole model is calibrated as one block
    sites: list[NormSite]
    skipped: list[SkippedNorm]
    source: dict  # name, resolved path or id, and what the loader learnt (gguf, model_type, …)
    tokenizer: Any = None
    source_dir: Path | None = None  # where tokenizer and other side files are copied from
    info: dict = field(default_factory=dict)

    def block_sites(self, i: int) -> list[NormSite]:
        return [s for s in self.sites if self.blocks is not None and self.blocks.index_of(s.name) == i]

    @property
    def outside_sites(self) -> list[NormSite]:
        return [s for s in self.sites if self.blocks is None or self.blocks.index_of(s.name) is None]


def _sites(model: nn.Module, opts: ConvertOptions, source: str) -> tuple[list[NormSite], list[SkippedNorm]]:
    sites, skipped = find_norms(model, opts.only, opts.exclude)
    if not sites:
        raise IBNormError(f"no convertible normalization layers found in {source}"
                          + (f" ({len(skipped)} skipped: {skipped[0].reason})" if skipped else ""))
    check_grouping(opts.grouping, {s.spec.grouping for s in sites})
    for s in sites:  # a NaN in a norm the tool rewrites would be written on, silently
        for leaf in ("weight", "bias"):
            t = getattr(s.spec, leaf)
            if t is not None and not t.is_meta:
                check_finite(f"norm tensor {s.name}.{leaf}", t.detach())
    return sites, skipped


def plan_in_memory(loaded: LoadedModel, opts: ConvertOptions) -> Plan:
    family = family_of(loaded.library, loaded.task)
    sites, skipped = _sites(loaded.model, opts, loaded.source)
    blocks = family.layout(loaded.model)
    source = {"name": loaded.source, "resolved": loaded.resolved, "family": loaded.library, **loaded.info}
    return Plan(loaded.model, family, ModelStore(loaded.model, family), blocks, sites, skipped, source,
                tokenizer=loaded.tokenizer, source_dir=loaded.hf_dir)


def hf_skeleton(source_dir: Path) -> tuple[Any, str, nn.Module]:
    """(config, task, meta-device model) of a transformers directory; buffers (rotary tables) are real."""
    from ..io.sources import hf_task

    config = read_config(source_dir)
    task = hf_task(config, False)
    model = skeleton_of(config, causal=task == "causal-lm")
    return config, task, model.eval()  # from_config leaves dropout on


def tied_names(model: nn.Module) -> set[str]:
    """Parameter names that share storage with an earlier one (tied weights are stored once)."""
    seen: dict[int, str] = {}
    tied: set[str] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            tied.add(name)
        seen.setdefault(id(p), name)
    keys = getattr(model, "_tied_weights_keys", None) or []
    tied.update(keys if isinstance(keys, (list, tuple, set)) else dict(keys).keys())
    return tied


def streamable(family: ModelFamily, blocks: Blocks | None) -> tuple[bool, str]:
    """A decoder streams when its repeated blocks can be enumerated (the layout decides, not a list of types)."""
    if blocks is None:
        return False, "no repeated blocks found"
    if family.task != "causal-lm":
        return False, f"streaming handles decoders; this is an {family.task} model"
    return True, ""


def plan_streamed(source_dir: Path, opts: ConvertOptions, source_name: str | None = None) -> Plan:
    import transformers

    config, task, model = hf_skeleton(source_dir)
    family = family_of("hf", task)
    blocks = family.layout(model)
    sites, skipped = _sites(model, opts, str(source_dir))
    ok, why = streamable(family, blocks)
    if not ok:
        raise IBNormError(f"cannot stream-convert {source_dir}: {why}")
    index = TensorIndex.open(source_dir)
    check_hf_checkpoint(source_dir, index, [s.name for s in sites])
    store = ShardStore(model, family, index, sites)
    store.check_complete(tied_names(model))
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(source_dir)
    except Exception:
        tokenizer = None  # data-free conversion needs none; text calibration says so
    source = {"name": source_name or str(source_dir), "resolved": str(source_dir), "family": "hf", "model_type": config.model_type}
    return Plan(model, family, store, blocks, sites, skipped, source, tokenizer=tokenizer, source_dir=source_dir)


def whole_model_estimate(hf_dir: Path, opts: ConvertOptions) -> tuple[int, int]:
    """(bytes a whole-model conversion needs, bytes available): weights, a working copy of the largest
    tensors, and the calibration activations."""
    import psutil

    index = TensorIndex.open(hf_dir)
    weights = sum(t.nbytes for t in index.tensors.values())
    hidden = max((t.shape[-1] for t in index.tensors.values() if len(t.shape) == 2), default=0)
    activations = 0 if opts.calib is None else opts.calib_samples * (opts.seq_len or CALIB_SEQ_LEN) * hidden * 4 * 4
    index.close()
    return int(weights * 1.25) + activations, psutil.virtual_memory().available


def needs_streaming(hf_dir: Path, opts: ConvertOptions) -> bool:
    need, available = whole_model_estimate(hf_dir, opts)
    if need <= 0.7 * available:
        return False
    _, task, model = hf_skeleton(hf_dir)
    family = family_of("hf", task)
    blocks = family.layout(model)
    ok, why = streamable(family, blocks)
    if not ok:
        raise IBNormError(
            f"whole-model conversion of {hf_dir} needs about {need / 2**30:.1f} GiB, only {available / 2**30:.1f} GiB "
            f"is available, and it cannot be streamed ({why}); use a machine with more memory")
    return True
