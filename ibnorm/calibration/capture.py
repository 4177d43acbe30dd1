"""Record what each norm layer receives while calibration data runs through the source model."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor, nn


class _Reservoir:
    """Keeps at most ``max_rows`` rows (tokens, or samples for channel norms), uniformly chosen."""

    def __init__(self, max_rows: int, rows_dim0: bool, generator: torch.Generator) -> None:
        self.max_rows, self.rows_dim0, self.g = max_rows, rows_dim0, generator
        self.chunks: list[Tensor] = []
        self.count = 0

    def add(self, x: Tensor) -> None:
        x = x.detach().float().cpu()
        rows = x if self.rows_dim0 else x.reshape(-1, x.shape[-1])
        self.chunks.append(rows)
        self.count += rows.shape[0]
        if self.count > 2 * self.max_rows:
            self._shrink()

    def _shrink(self) -> None:
        allr = torch.cat(self.chunks)
        keep = torch.randperm(allr.shape[0], generator=self.g)[: self.max_rows].sort().values
        self.chunks, self.count = [allr[keep]], self.max_rows

    def result(self) -> Tensor:
        if self.count > self.max_rows:
            self._shrink()
        return torch.cat(self.chunks)


def capture_inputs(
    model: nn.Module,
    modules: dict[str, nn.Module],
    run: Callable[[], None],
    max_rows: int = 4096,
    channel_names: Sequence[str] = (),
    seed: int = 0,
) -> dict[str, Tensor]:
    """Run ``run()`` with hooks on ``modules`` and return each one's inputs.

    Row norms: ``(rows, hidden)`` with up to ``max_rows`` tokens.  Names in
    ``channel_names`` (batch/group norms) keep whole samples: ``(samples, C, …)``.
    """
    g = torch.Generator().manual_seed(seed)
    store = {name: _Reservoir(max_rows, name in channel_names, g) for name in modules}
    handles = []
    for name, module in modules.items():
        def hook(mod, args, _name=name):
            store[_name].add(args[0])

        handles.append(module.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return {name: r.result() for name, r in store.items() if r.count}
