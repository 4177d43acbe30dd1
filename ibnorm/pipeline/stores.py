"""Where a conversion's tensors come from and go to.

:class:`ModelStore` holds a whole model in memory and saves it at the end.  :class:`ShardStore`
keeps a meta-device skeleton, reads tensors lazily from the source shards (one block at a time),
and writes the output shards as it goes: every tensor that is not a norm is copied from the
source bytes in its source dtype, and the norms are written last, once calibration (and the
end-to-end back-off) has settled them.  The pipeline calls both the same way.
"""

from __future__ import annotations

import copy
import ctypes
import ctypes.util
from collections import Counter
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..errors import IBNormError
from ..io.safetensors_index import DTYPES, TensorIndex
from ..io.spill import TensorSpill
from ..io.stream_writer import DTYPE_NAMES, PlannedTensor, ShardedWriter, parse_size
from ..recognize import recognize
from ..surgery import NormSite
from .families import ModelFamily
from .layout import Blocks

# The one dtype a streamed conversion computes in: blocks, embeddings, final norm, head, activations.
# float32 on every device.  The λ search and the end-to-end drift are statistics of the activations;
# in float32 they are those of the in-memory float32 conversion of the same checkpoint (bf16 keeps 8
# bits of mantissa).  On a CPU without bf16 hardware (AVX2 only) float32 is also the fast path: a bf16
# matmul is emulated there, orders of magnitude slower.  On CUDA float32 (TF32 off, torch's default)
# costs memory only: one block at a time (0.8 GB for a 7B block, 3.5 GB for a 70B one) and the
# activation cache fit any GPU, and a few passes over a few thousand tokens take seconds either way.
COMPUTE_DTYPE = torch.float32


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

    def release_outside(self) -> None:
        """Done with everything outside the blocks until the tail."""

    def place(self, module: nn.Module, name: str) -> nn.Module:
        """A built norm, ready to be put in place of norm ``name``."""
        return module.to(self.device)

    def keep(self, x: torch.Tensor) -> Callable[[], torch.Tensor]:
        """Hold captured inputs for the back-off refits; the returned call gives them back."""
        return lambda: x

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
        self.outside: list[nn.Parameter] = []  # what ``prepare`` read (held, so their ids stay theirs)
        self.spill: TensorSpill | None = None
        self.hooked: set[int] = set()  # lookup tables whose outputs are cast to COMPUTE_DTYPE
        map_large_allocations()

    def check_complete(self, tied: set[str]) -> None:
        expected = {n for n, _ in self.model.named_parameters()}
        missing = sorted(expected - set(self.index.tensors) - tied)
        if missing:
            raise IBNormError(f"checkpoint is missing tensor {missing[0]!r} (+{len(missing) - 1} more)")

    # --- reading ------------------------------------------------------------------------------
    def _read(self, key: str, device: torch.device, cast: bool = True) -> torch.Tensor:
        """One source tensor on ``device``, in COMPUTE_DTYPE when floating point (the source-dtype
        buffer is dropped as soon as it is cast, so a block is never held twice); ``cast=False``:
        in the source dtype."""
        if key not in self.index:
            raise IBNormError(f"checkpoint has no tensor {key!r}")
        t = self.index.get(key)
        return t.to(device=device, dtype=COMPUTE_DTYPE if t.is_floating_point() and cast else t.dtype)

    def _put(self, root: nn.Module, name: str, key: str, device: torch.device, cast: bool = True) -> nn.Parameter:
        """Replace the meta parameter ``name`` of ``root`` by source tensor ``key``."""
        owner, _, leaf = name.rpartition(".")
        value = nn.Parameter(self._read(key, device, cast), requires_grad=root.get_parameter(name).requires_grad)
        setattr(root.get_submodule(owner), leaf, value)
        return value

    def _materialize(self, module: nn.Module, prefix: str, device: torch.device) -> nn.Module:
        for name, param in list(module.named_parameters()):
            if param.is_meta:
                self._put(module, name, f"{prefix}{name}", device)
        return module

    def prepare(self, blocks: Blocks | None) -> None:
        """Embeddings, norms outside the blocks and the head, in COMPUTE_DTYPE (untied embedding tables:
        their rows), for forward passes outside the blocks' loop (catching block 0's inputs, the tail)."""
        tables = self._lookup_tables()
        for name, param in list(self.model.named_parameters()):
            if param.is_meta and name in self.index and (blocks is None or blocks.index_of(name) is None):
                self.outside.append(self._put(self.model, name, name, self.device, cast=name not in tables))
        if hasattr(self.model, "tie_weights"):
            self.model.tie_weights()
        for b in self.model.buffers():
            b.data = b.data.to(self.device)

    def _lookup_tables(self) -> set[str]:
        """Embedding tables used for nothing but lookups (not tied to a head): kept in the source dtype,
        their outputs cast to COMPUTE_DTYPE — exactly the float32 table's rows, in half the memory (a
        7B's embeddings are 0.5 GB in float32, a 128k-vocabulary 8B's 2 GB)."""
        if hasattr(self.model, "tie_weights"):  # the skeleton's tied parameters are one object from here on
            self.model.tie_weights()
        holders = Counter(id(p) for m in self.model.modules() for p in m.parameters(recurse=False))
        tables = set()
        for name, m in self.model.named_modules():
            if type(m) is nn.Embedding and holders[id(m.weight)] == 1:  # subclasses may do more than look up
                tables.add(f"{name}.weight" if name else "weight")
                if id(m) not in self.hooked:
                    m.register_forward_hook(_to_compute_dtype)
                    self.hooked.add(id(m))
        return tables

    def release_outside(self) -> None:
        """Free what ``prepare`` read: the blocks' loop needs none of it (a 7B's embeddings and head
        are 1 GB in float32); ``prepare`` reads it again for the tail."""
        _to_meta(self.model, {id(p) for p in self.outside})
        self.outside = []

    def block(self, blocks: Blocks, i: int) -> nn.Module:
        return self._materialize(blocks.modules[i], f"{blocks.prefix}{i}.", self.device)

    def release(self, blocks: Blocks, i: int, block: nn.Module) -> None:
        if i not in self.copied and self.writer is not None:
            self.copy_tensors(f"{blocks.prefix}{i}.")
            self.copied.add(i)
        _to_meta(block)  # free the block's weights (its buffers, small, stay: a re-read restores parameters only)

    def place(self, module: nn.Module, name: str) -> nn.Module:
        """A built norm on the device; γ and β rounded to the dtype they will be written in (so the
        end-to-end check measures the model that is written), held in COMPUTE_DTYPE."""
        for leaf in ("weight", "bias"):
            p, info = getattr(module, leaf, None), self.index.tensors.get(f"{name}.{leaf}")
            if isinstance(p, torch.Tensor) and p.is_floating_point() and info is not None:
                p.data = p.data.to(DTYPES[info.dtype]).to(COMPUTE_DTYPE)
        return module.to(self.device)

    def keep(self, x: torch.Tensor) -> Callable[[], torch.Tensor]:
        """The refit cache goes to an unlinked file beside the output (≤ REFIT_CACHE_BYTES, counted in the
        disk check), not memory: a 7B model's is 1 GiB, read back only if λ must back off."""
        if self.spill is None:
            self.spill = TensorSpill(self.writer.dir if self.writer is not None else None)
        return self.spill.put(x)

    def close_spill(self) -> None:
        if self.spill is not None:
            self.spill.close()
            self.spill = None

    def source_norm(self, site: NormSite) -> NormSite:
        """A CPU float32 copy of the source norm, read from the shards (the skeleton's may be meta or freed)."""
        module = self._materialize(copy.deepcopy(site.module).to("meta"), f"{site.name}.", torch.device("cpu"))
        return NormSite(site.name, module, recognize(module) or site.spec)

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
        c: Counter = Counter()
        for t in self.index.tensors.values():
            c[t.dtype] += t.nbytes
        return DTYPES[c.most_common(1)[0][0]]


# glibc's mallopt parameter: allocations of at least this many bytes are mapped on their own and
# unmapped when freed.
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 128 * 1024


def map_large_allocations() -> None:
    """Make freed tensors go back to the system at once.  glibc raises its mmap threshold to the size
    of the largest buffer freed (up to 32 MB), after which a block's activations (4–32 MB each) come
    from the heap, between live allocations, and the holes they leave stay resident: measured on a
    7B-shaped stream, peak memory grew by ~80 MB per block (4.3 GiB after 32 blocks).  A fixed threshold
    keeps it flat (benchmarks/results/stream_7b.md).  Process-wide.  Its cost is page faults: on a 6-block
    7B-shaped stream, system time 25.9 s instead of 19.4 s, against ~190 s of compute, wall time unchanged
    within noise.  Not glibc (macOS, musl): no-op."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
    except (OSError, AttributeError):
        pass


def _to_compute_dtype(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
    return output.to(COMPUTE_DTYPE) if output.is_floating_point() else output


def _to_meta(module: nn.Module, only: set[int] | None = None) -> None:
    """Replace the parameters of ``module`` (those whose id is in ``only``, if given) by meta ones:
    the memory goes; a parameter shared by several modules (tied weights) stays shared."""
    meta: dict[int, nn.Parameter] = {}
    for m in module.modules():
        for leaf, p in list(m.named_parameters(recurse=False)):
            if not p.is_meta and (only is None or id(p) in only):
                if id(p) not in meta:
                    meta[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
                setattr(m, leaf, meta[id(p)])


__all__ = ["ModelStore", "ShardStore", "DTYPE_NAMES"]
