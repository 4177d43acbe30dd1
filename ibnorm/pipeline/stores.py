"""Where a conversion's tensors come from and go to.

:class:`ModelStore` holds a whole model in memory and saves it at the end.  :class:`ShardStore`
keeps a meta-device skeleton, reads tensors lazily from the source shards (one block at a time),
and writes the output shards as it goes: every tensor that is not a norm is copied from the
source bytes in its source dtype, and the norms are written last, once calibration (and the
end-to-end back-off) has settled them.  The pipeline calls both the same way.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from ..errors import IBNormError
from ..io.safetensors_index import DTYPES, TensorIndex
from ..io.stream_writer import DTYPE_NAMES, PlannedTensor, ShardedWriter, parse_size
from ..recognize import recognize
from ..surgery import NormSite
from .families import ModelFamily
from .layout import Blocks


class ModelStore:
    """A model that is whole in memory: blocks are its own, nothing to load or free."""

    streaming = False

    def __init__(self, model: nn.Module, family: ModelFamily) -> None:
        self.model, self.family = model, family
        self.device = next((p.device for p in model.parameters()), torch.device("cpu"))

    def prepare(self, blocks: Blocks | None) -> None:
        """Ready everything outside the blocks for forward passes."""

    def block(self, blocks: Blocks, i: int) -> nn.Module:
        return blocks.modules[i]

    def release(self, blocks: Blocks, i: int, block: nn.Module) -> None:
        """Done with block ``i`` for now."""

    def source_norm(self, site: NormSite) -> NormSite:
        """The site with real source weights, on CPU where the fit runs (in memory on CPU: as found)."""
        if self.device.type == "cpu":
            return site
        module = copy.deepcopy(site.module).to("cpu")
        return NormSite(site.name, module, recognize(module) or site.spec)


class ShardStore(ModelStore):
    """A model larger than memory: a meta skeleton over lazily read shards, and a planned shard writer."""

    streaming = True

    def __init__(self, model: nn.Module, family: ModelFamily, index: TensorIndex, sites: list[NormSite]) -> None:
        self.model, self.family, self.index = model, family, index
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.norm_of = {f"{s.name}.{leaf}": s.name for s in sites for leaf in ("weight", "bias")}
        self.sites = sites
        self.writer: ShardedWriter | None = None
        self.copied: set[int] = set()

    def check_complete(self, tied: set[str]) -> None:
        expected = {n for n, _ in self.model.named_parameters()}
        missing = sorted(expected - set(self.index.tensors) - tied)
        if missing:
            raise IBNormError(f"checkpoint is missing tensor {missing[0]!r} (+{len(missing) - 1} more)")

    # --- reading ------------------------------------------------------------------------------
    def _materialize(self, module: nn.Module, prefix: str) -> nn.Module:
        from accelerate.utils import set_module_tensor_to_device

        for name, param in list(module.named_parameters()):
            key = f"{prefix}{name}"
            if key not in self.index:
                raise IBNormError(f"checkpoint has no tensor {key!r}")
            value = self.index.get(key).to(device=self.device, dtype=torch.float32)
            set_module_tensor_to_device(module, name, self.device, value=value)
        return module

    def prepare(self, blocks: Blocks | None) -> None:
        """Embeddings, norms outside the blocks and the head, in float32 for the forward passes."""
        from accelerate.utils import set_module_tensor_to_device

        for name, param in list(self.model.named_parameters()):
            if param.is_meta and name in self.index and (blocks is None or blocks.index_of(name) is None):
                value = self.index.get(name).to(device=self.device, dtype=torch.float32)
                set_module_tensor_to_device(self.model, name, self.device, value=value)
        if hasattr(self.model, "tie_weights"):
            self.model.tie_weights()
        for b in self.model.buffers():
            b.data = b.data.to(self.device)

    def block(self, blocks: Blocks, i: int) -> nn.Module:
        return self._materialize(blocks.modules[i], f"{blocks.prefix}{i}.")

    def release(self, blocks: Blocks, i: int, block: nn.Module) -> None:
        if i not in self.copied and self.writer is not None:
            self.copy_tensors(f"{blocks.prefix}{i}.")
            self.copied.add(i)
        block.to("meta")  # free the block

    def source_norm(self, site: NormSite) -> NormSite:
        """A CPU float32 copy of the source norm, read from the shards (the skeleton's may be meta or freed)."""
        module = copy.deepcopy(site.module).to("meta")
        device, self.device = self.device, torch.device("cpu")
        try:
            self._materialize(module, f"{site.name}.")
        finally:
            self.device = device
        return NormSite(site.name, module, recognize(module) or site.spec)

    def source_dtype(self, site_name: str) -> torch.dtype:
        info = self.index.tensors.get(f"{site_name}.weight")
        return DTYPES[info.dtype] if info else torch.float32

    # --- writing ------------------------------------------------------------------------------
    def plan(self) -> list[PlannedTensor]:
        """Every output tensor, in source order; a converted norm adds its λ (float32, one per channel)."""
        plan: list[PlannedTensor] = []
        lam_added: set[str] = set()
        for name, t in self.index.tensors.items():
            plan.append(PlannedTensor(name, t.dtype, t.shape))
            owner = self.norm_of.get(name)
            if owner is not None and owner not in lam_added:
                lam_added.add(owner)
                site = next(s for s in self.sites if s.name == owner)
                plan.append(PlannedTensor(f"{owner}.lam", "F32", tuple(site.spec.shape)))
        return plan

    def open_writer(self, directory: Path, shard_size: str) -> None:
        self.writer = ShardedWriter(directory, self.plan(), parse_size(shard_size))

    def copy_tensors(self, prefix: str = "") -> None:
        """Copy (bit for bit) every not-yet-written source tensor under ``prefix`` that is not a norm's."""
        for name in self.index.tensors:
            if name.startswith(prefix) and name not in self.norm_of and not self.writer.written(name):
                info = self.index.tensors[name]
                self.writer.copy(name, info.dtype, info.shape, self.index.fd_of(name), info.begin)

    def write_norm(self, name: str, module: nn.Module) -> None:
        state = module.state_dict()
        for leaf in ("weight", "bias", "lam"):
            key = f"{name}.{leaf}"
            planned = self.writer.planned.get(key)
            if planned is not None:
                self.writer.write(key, state[leaf].detach().to(DTYPES[planned.dtype]))

    def dominant_dtype(self) -> torch.dtype:
        from collections import Counter

        c: Counter = Counter()
        for t in self.index.tensors.values():
            c[t.dtype] += t.nbytes
        return DTYPES[c.most_common(1)[0][0]]


__all__ = ["ModelStore", "ShardStore", "DTYPE_NAMES"]
