"""Where a model's repeated blocks are, and how to run them one at a time on cached inputs.

A *block layout* is the ModuleList of same-class blocks holding the most norms (a transformer's
layers).  The inputs of the first block are caught once (a stand-in for block 0 records its
arguments and stops the forward pass); each block is then replayed on the cached calls, whatever
its call signature.  The model's tail (final norm, head, pooling) runs on cached last-block
outputs through :func:`run_tail`, which puts stand-ins in place of the blocks, so no
architecture needs a hand-written head.  A model without such blocks (a CNN) is one block.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from ..surgery import find_norms

CachedCall = tuple[Tensor, tuple, dict]  # hidden states, the other positional args, kwargs


@dataclass
class Blocks:
    path: str  # dotted name of the ModuleList, e.g. "model.layers"
    modules: nn.ModuleList
    returns_tuple: bool | None = None  # what a block returns, learnt on the first replay

    @property
    def prefix(self) -> str:
        return self.path + "."

    def __len__(self) -> int:
        return len(self.modules)

    def index_of(self, name: str) -> int | None:
        """The block a dotted parameter/module name belongs to, or None when outside the blocks."""
        if not name.startswith(self.prefix):
            return None
        return int(name[len(self.prefix) :].split(".", 1)[0])


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


class _Stop(Exception):
    pass


class _StandIn(nn.Module):
    """Takes a block's place; models read attributes of their layers (attention_type, …)."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["block"], name)


class _Catcher(_StandIn):
    """Records how block 0 is called, then stops the forward pass."""

    def __init__(self, block: nn.Module, calls: list) -> None:
        super().__init__(block)
        self.calls = calls

    def forward(self, *args, **kwargs):
        if args:
            hidden, rest = args[0], args[1:]
        else:
            hidden, rest = kwargs.pop("hidden_states"), ()
        self.calls.append((hidden, rest, kwargs))
        raise _Stop


class _Replay(_StandIn):
    """Returns the next cached hidden states (block 0), or passes its input through (later blocks)."""

    def __init__(self, block: nn.Module, outputs: Iterator[Tensor] | None, as_tuple: bool) -> None:
        super().__init__(block)
        self.outputs, self.as_tuple = outputs, as_tuple

    def forward(self, *args, **kwargs):
        hidden = next(self.outputs) if self.outputs is not None else (args[0] if args else kwargs["hidden_states"])
        return (hidden,) if self.as_tuple else hidden


@contextmanager
def _swapped(blocks: Blocks, stand_ins: list[nn.Module]) -> Iterator[None]:
    originals = list(blocks.modules)
    for i, s in enumerate(stand_ins):
        blocks.modules[i] = s
    try:
        yield
    finally:
        for i, m in enumerate(originals):
            blocks.modules[i] = m


def catch_block_inputs(blocks: Blocks, run_batch: Callable[[Any], None], batches: Sequence[Any]) -> list[CachedCall]:
    """Run each batch up to the first block and return what it was called with."""
    calls: list[CachedCall] = []
    with _swapped(blocks, [_Catcher(blocks.modules[0], calls)]), torch.no_grad():
        for b in batches:
            try:
                run_batch(b)
            except _Stop:
                pass
    if len(calls) != len(batches):
        raise RuntimeError("could not catch the inputs of the first block")
    return calls


def run_block(blocks: Blocks, block: nn.Module, call: CachedCall) -> Tensor:
    hidden, rest, kwargs = call
    out = block(hidden, *rest, **kwargs)
    blocks.returns_tuple = isinstance(out, (tuple, list))
    return out[0] if blocks.returns_tuple else out


def run_tail(blocks: Blocks, run_batch: Callable[[Any], Any], batches: Sequence[Any], last_hidden: Sequence[Tensor]) -> list[Any]:
    """``run_batch`` for each batch with the blocks' output replaced by ``last_hidden`` (no block runs)."""
    it = iter(last_hidden)
    as_tuple = bool(blocks.returns_tuple)
    stand_ins = [_Replay(blocks.modules[0], it, as_tuple)] + [_Replay(b, None, as_tuple) for b in list(blocks.modules)[1:]]
    with _swapped(blocks, stand_ins), torch.no_grad():
        return [run_batch(b) for b in batches]


@contextmanager
def stop_after(module: nn.Module) -> Iterator[Callable[[Callable[[], None]], None]]:
    """Within the block, ``guard(run)`` runs ``run`` and stops each forward pass once ``module`` has
    been called (so a capture of the final norm's inputs does not pay for the head)."""

    def hook(*_):
        raise _Stop

    handle = module.register_forward_hook(hook)

    def guard(run: Callable[[], None]) -> None:
        try:
            run()
        except _Stop:
            pass

    try:
        yield guard
    finally:
        handle.remove()


@contextmanager
def recorded_calls(modules: dict[str, nn.Module]) -> Iterator[list[str]]:
    """Within the block, the names of ``modules`` in the order they are called (each call listed)."""
    order: list[str] = []
    handles = [m.register_forward_pre_hook(lambda *_, n=name: order.append(n)) for name, m in modules.items()]
    try:
        yield order
    finally:
        for h in handles:
            h.remove()


def last_called(order: list[str], names: Sequence[str]) -> str | None:
    """The name called last when every one of ``names`` was called exactly once, else None."""
    if len(order) != len(names) or set(order) != set(names):
        return None
    return order[-1]
