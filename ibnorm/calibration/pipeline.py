"""Block-sequential calibration: each block is calibrated on the outputs of the already-converted blocks.

The inputs of the first block are caught once (a stand-in for block 0 records its arguments and
stops the forward pass), then for each block: capture its norms' inputs while the cached hidden
states run through the *source* block, calibrate and replace those norms, and run the converted
block to produce the next block's inputs.  This is architecture-agnostic (whatever the block's
call signature, it is replayed as caught) and needs only one block in memory at a time, which is
what streaming conversion of models larger than memory builds on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from ..surgery import NormSite, find_norms, replace_norms
from .capture import capture_inputs

CachedCall = tuple[Tensor, tuple, dict]  # hidden states, the other positional args, kwargs


@dataclass
class Blocks:
    path: str  # dotted name of the ModuleList, e.g. "model.layers"
    modules: nn.ModuleList


def find_blocks(model: nn.Module) -> Blocks | None:
    """The model's repeated blocks: the ModuleList of same-class modules holding the most norms."""
    best, best_norms = None, 0
    for name, m in model.named_modules():
        if not isinstance(m, nn.ModuleList) or len(m) < 2 or any(type(b) is not type(m[0]) for b in m):
            continue
        norms = len(find_norms(m[0])[0])
        if norms > best_norms:
            best, best_norms = Blocks(name, m), norms
    return best


class _Caught(Exception):
    pass


class _Catcher(nn.Module):
    """Stands in for block 0: records how it is called, then stops the forward pass."""

    def __init__(self, block: nn.Module, calls: list) -> None:
        super().__init__()
        self.block = block
        self.calls = calls

    def forward(self, *args, **kwargs):
        if args:
            hidden, rest = args[0], args[1:]
        else:
            hidden, rest = kwargs.pop("hidden_states"), ()
        self.calls.append((hidden, rest, kwargs))
        raise _Caught

    def __getattr__(self, name: str) -> Any:  # models read attributes of their layers (attention_type, …)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["block"], name)


def catch_block_inputs(blocks: Blocks, run_batch: Callable[[Any], None], batches: Sequence[Any]) -> list[CachedCall]:
    calls: list[CachedCall] = []
    original = blocks.modules[0]
    blocks.modules[0] = _Catcher(original, calls)
    try:
        with torch.no_grad():
            for b in batches:
                try:
                    run_batch(b)
                except _Caught:
                    pass
    finally:
        blocks.modules[0] = original
    if len(calls) != len(batches):
        raise RuntimeError("could not catch the inputs of the first block")
    return calls


def run_block(block: nn.Module, call: CachedCall) -> Tensor:
    hidden, rest, kwargs = call
    out = block(hidden, *rest, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


@dataclass
class BlockResult:
    index: int
    prefix: str
    sites: list[NormSite]  # names are full model names
    inputs: dict[str, Tensor]  # captured norm inputs, by full name


def calibrate_blocks(
    blocks: Blocks,
    calls: list[CachedCall],
    select: Callable[[list[NormSite]], list[NormSite]],
    fit_and_build: Callable[[NormSite, Tensor | None], nn.Module],
    max_rows: int,
    seed: int = 0,
    load_block: Callable[[int], nn.Module] | None = None,
    done_block: Callable[[BlockResult, nn.Module], None] | None = None,
    progress: Callable[[str, int, int], None] = lambda *_: None,
    keep_inputs: bool = True,
) -> tuple[list[BlockResult], list[CachedCall]]:
    """Calibrate and replace the norms of every block in order; returns the results and the final hidden states."""
    results = []
    n = len(blocks.modules)
    for i in range(n):
        progress("calibrating blocks", i, n)
        block = load_block(i) if load_block else blocks.modules[i]
        prefix = f"{blocks.path}.{i}"
        local, _ = find_norms(block)
        sites = select([NormSite(f"{prefix}.{s.name}", s.module, s.spec) for s in local])
        channel = [s.name for s in sites if s.spec.kind in ("batch", "group")]
        modules = {s.name: s.module for s in sites}

        def run_source() -> None:
            for call in calls:
                run_block(block, call)

        inputs = capture_inputs(block, modules, run_source, max_rows, channel, seed) if sites else {}
        local_sites = [NormSite(s.name[len(prefix) + 1 :], s.module, s.spec) for s in sites]
        built = {s.name: fit_and_build(s, inputs.get(s.name)) for s in sites}
        replace_norms(block, local_sites, lambda s: built[f"{prefix}.{s.name}"])
        with torch.no_grad():
            calls = [(run_block(block, c), c[1], c[2]) for c in calls]
        result = BlockResult(i, prefix, sites, inputs if keep_inputs else {})
        results.append(result)
        if done_block:
            done_block(result, block)
    progress("calibrating blocks", n, n)
    return results, calls
