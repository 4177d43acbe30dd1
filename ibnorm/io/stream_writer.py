"""Write safetensors shards tensor by tensor, in a planned order, holding one tensor in memory.

Every output tensor's name, dtype and shape are known before any data is produced, so each
shard's header is written first and tensor bytes follow as they become available.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from .safetensors_index import DTYPES, INDEX_NAME, ITEMSIZE

DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def parse_size(text: str | int) -> int:
    """A byte count with SI or binary units (5GB, 500MB, 2GiB); see :func:`ibnorm.validate.parse_size`."""
    from ..validate import parse_size as parse

    return parse(text)


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    dtype: str  # safetensors dtype name, e.g. "BF16"
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = ITEMSIZE[self.dtype]
        for s in self.shape:
            n *= s
        return n


class ShardedWriter:
    """Writes the planned tensors, in plan order, into shards of at most ``shard_size`` bytes (plus one tensor)."""

    def __init__(self, directory: Path, plan: list[PlannedTensor], shard_size: int) -> None:
        self.dir, self.plan = Path(directory), plan
        shards: list[list[PlannedTensor]] = [[]]
        size = 0
        for t in plan:
            if shards[-1] and size + t.nbytes > shard_size:
                shards.append([])
                size = 0
            shards[-1].append(t)
            size += t.nbytes
        n = len(shards)
        self.files = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.shard_of = {t.name: i for i, shard in enumerate(shards) for t in shard}
        self.shards = shards
        self.position = 0
        self.handle = None
        self.current = -1

    def _open(self, shard: int) -> None:
        if self.handle:
            self.handle.close()
        header, offset = {}, 0
        for t in self.shards[shard]:
            header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
            offset += t.nbytes
        header["__metadata__"] = {"format": "pt"}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # 8-byte alignment of the data section
        self.handle = open(self.dir / self.files[shard], "wb")
        self.handle.write(struct.pack("<Q", len(raw)))
        self.handle.write(raw)
        self.current = shard

    @property
    def next_name(self) -> str | None:
        return self.plan[self.position].name if self.position < len(self.plan) else None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected = self.plan[self.position] if self.position < len(self.plan) else None
        if expected is None or expected.name != name:
            raise RuntimeError(f"write order: got {name!r}, expected {expected.name if expected else 'nothing'}")
        if DTYPE_NAMES.get(tensor.dtype) != expected.dtype or tuple(tensor.shape) != expected.shape:
            raise RuntimeError(f"{name}: got {tensor.dtype} {tuple(tensor.shape)}, planned {expected.dtype} {expected.shape}")
        shard = self.shard_of[name]
        if shard != self.current:
            self._open(shard)
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        self.handle.write(memoryview(data))
        self.position += 1

    def close(self) -> list[str]:
        if self.handle:
            self.handle.close()
            self.handle = None
        if self.position != len(self.plan):
            raise RuntimeError(f"only {self.position} of {len(self.plan)} planned tensors were written")
        if len(self.files) > 1:
            total = sum(t.nbytes for t in self.plan)
            index = {"metadata": {"total_size": total}, "weight_map": {t.name: self.files[self.shard_of[t.name]] for t in self.plan}}
            (self.dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        return self.files
