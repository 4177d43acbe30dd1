"""Stage 4: write — weights, config, tokenizer and side files, manifest and model card, into the
temporary directory that becomes the output only if everything succeeds."""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from ..hf.export import write_remote_code
from ..io.checkpoint import copy_side_files, write_json_atomic
from ..layers import IBNormBase
from ..io.manifest import MANIFEST
from .families import ModelFamily
from .manifest import converted_config, finish_manifest, model_card
from .plan import Plan
from .stores import ShardStore


def _side_files(tmp: Path, manifest: dict, base_config: dict, modules: dict[str, nn.Module], shards: list[str], tokenizer,
                source_dir: Path | None, card: str | None) -> None:
    write_json_atomic(tmp / "config.json", converted_config(base_config, manifest, modules))
    if manifest["family"] == "hf":
        write_remote_code(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    finish_manifest(manifest, copy_side_files(source_dir, tmp), shards)
    write_json_atomic(tmp / MANIFEST, manifest)
    (tmp / "README.md").write_text(card if card is not None else model_card(manifest))


def write_model(tmp: Path, model: nn.Module, family: ModelFamily, manifest: dict, *, tokenizer=None,
                source_dir: Path | None = None, shard_size: str = "5GB", card: str | None = None) -> None:
    """A converted (or fine-tuned) model that is whole in memory, in the converted format."""
    family.save_weights(model, tmp, shard_size)
    base = family.base_config(model, tmp, manifest["source"])
    modules = {name: m for name, m in model.named_modules() if isinstance(m, IBNormBase)}
    _side_files(tmp, manifest, base, modules, sorted(p.name for p in tmp.glob("*.safetensors")), tokenizer, source_dir, card)


def write_in_memory(plan: Plan, tmp: Path, manifest: dict, shard_size: str) -> None:
    write_model(tmp, plan.model, plan.family, manifest, tokenizer=plan.tokenizer, source_dir=plan.source_dir,
                shard_size=shard_size)


def write_streamed(plan: Plan, tmp: Path, manifest: dict, modules: dict[str, nn.Module]) -> None:
    """The norms (settled only now), the source tensors not yet copied, then the side files."""
    store = plan.store
    assert isinstance(store, ShardStore) and store.writer is not None
    for name, module in modules.items():
        store.write_norm(name, module)
    store.copy_tensors()
    shards = store.writer.close()
    store.close_spill()
    store.index.close()
    base = json.loads((plan.source_dir / "config.json").read_text())
    _side_files(tmp, manifest, base, modules, shards, plan.tokenizer, plan.source_dir, None)
