"""Write safetensors shards tensor by tensor, holding one tensor in memory.

Every output tensor's name, dtype and shape are known before any data is produced, so each
shard's header is written first and tensor bytes go to their planned place as they become available.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import SourceError
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


_COPY_CHUNK = 64 << 20


def _copy_range(src: int, dst: int, count: int, src_offset: int, dst_offset: int) -> int:
    """Copy up to ``count`` bytes between two files at given offsets; returns how many were copied."""
    if _KERNEL_COPY[0]:
        try:
            return os.copy_file_range(src, dst, count, src_offset, dst_offset)
        except (AttributeError, OSError):
            _KERNEL_COPY[0] = False  # not here: every later copy reads and writes
    data = os.pread(src, min(count, _COPY_CHUNK), src_offset)
    done = 0
    while done < len(data):
        done += os.pwrite(dst, data[done:], dst_offset + done)
    return len(data)


_KERNEL_COPY = [hasattr(os, "copy_file_range")]


class ShardedWriter:
    """Writes the planned tensors, in any order, into shards of at most ``shard_size`` bytes (plus one tensor).

    Every shard's header is written when the writer opens, so each tensor has a fixed place and is
    written there with one positioned write, whenever it is ready.
    """

    def __init__(self, directory: Path, plan: list[PlannedTensor], shard_size: int) -> None:
        self.dir, self.plan = Path(directory), plan
        self.planned = {t.name: t for t in plan}
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
        self.place: dict[str, tuple[int, int]] = {}  # name → (shard, absolute offset)
        self.fds: list[int] = []
        for i, shard in enumerate(shards):
            self.fds.append(self._create(i, shard))
        self._written: set[str] = set()

    def _create(self, i: int, shard: list[PlannedTensor]) -> int:
        header, offset = {}, 0
        for t in shard:
            header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
            offset += t.nbytes
        header["__metadata__"] = {"format": "pt"}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # 8-byte alignment of the data section
        fd = os.open(self.dir / self.files[i], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)  # the umask decides
        os.write(fd, struct.pack("<Q", len(raw)) + raw)
        os.ftruncate(fd, 8 + len(raw) + offset)
        for t in shard:
            self.place[t.name] = (i, 8 + len(raw) + header[t.name]["data_offsets"][0])
        return fd

    def written(self, name: str) -> bool:
        return name in self._written

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected = self.planned.get(name)
        if expected is None or name in self._written:
            raise RuntimeError(f"write: {name!r} is {'not planned' if expected is None else 'already written'}")
        if DTYPE_NAMES.get(tensor.dtype) != expected.dtype or tuple(tensor.shape) != expected.shape:
            raise RuntimeError(f"{name}: got {tensor.dtype} {tuple(tensor.shape)}, planned {expected.dtype} {expected.shape}")
        shard, offset = self.place[name]
        data = memoryview(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
        done = 0
        while done < len(data):
            done += os.pwrite(self.fds[shard], data[done:], offset + done)
        self._written.add(name)

    def copy(self, name: str, dtype: str, shape: tuple[int, ...], src_fd: int, src_offset: int) -> None:
        """Copy a tensor's bytes straight from another file (a source shard), bit for bit.

        ``os.copy_file_range`` copies inside the kernel (or shares the blocks, on filesystems that
        can): no buffer is allocated, zero-filled or passed through Python.  Where the call is not
        available or refused (another filesystem on old kernels, special files) the bytes go
        through one read and one write instead.
        """
        expected = self.planned.get(name)
        if expected is None or name in self._written:
            raise RuntimeError(f"copy: {name!r} is {'not planned' if expected is None else 'already written'}")
        if dtype != expected.dtype or tuple(shape) != expected.shape:
            raise RuntimeError(f"{name}: got {dtype} {tuple(shape)}, planned {expected.dtype} {expected.shape}")
        shard, offset = self.place[name]
        nbytes, done = expected.nbytes, 0
        while done < nbytes:
            n = _copy_range(src_fd, self.fds[shard], nbytes - done, src_offset + done, offset + done)
            if n <= 0:
                raise SourceError(f"the source of {name!r} is truncated ({done} of {nbytes} bytes)")
            done += n
        self._written.add(name)

    def _close_files(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []

    def close(self) -> list[str]:
        self._close_files()
        missing = [t.name for t in self.plan if t.name not in self._written]
        if missing:
            raise RuntimeError(f"only {len(self._written)} of {len(self.plan)} planned tensors were written (first missing: {missing[0]})")
        if len(self.files) > 1:
            total = sum(t.nbytes for t in self.plan)
            shard_of = {name: self.files[place[0]] for name, place in self.place.items()}
            index = {"metadata": {"total_size": total}, "weight_map": {t.name: shard_of[t.name] for t in self.plan}}
            (self.dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        return self.files

    def abort(self) -> None:
        """Close the files after a failure (the temporary directory is removed by its owner)."""
        if self.fds:
            self._close_files()
