"""A checkpoint as an index of tensors: headers parsed, data read only on request (one tensor at a time).

Reads the safetensors format directly (8-byte little-endian header length, JSON
header, data), so truncated or corrupt files are reported before anything loads.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import SourceError

if TYPE_CHECKING:  # torch is imported only when a tensor is read
    import torch

_TORCH_DTYPE_NAMES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
    "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}


class _TorchDtypes(dict):
    """safetensors dtype name → torch dtype, built on first use (inspect runs without torch)."""

    def _fill(self) -> None:
        if not dict.__len__(self):
            import torch

            self.update({k: getattr(torch, v) for k, v in _TORCH_DTYPE_NAMES.items()})

    def __getitem__(self, key):
        self._fill()
        return dict.__getitem__(self, key)

    def __contains__(self, key) -> bool:
        return key in _TORCH_DTYPE_NAMES

    def items(self):
        self._fill()
        return dict.items(self)

    def get(self, key, default=None):
        self._fill()
        return dict.get(self, key, default)


DTYPES = _TorchDtypes()
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
            "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
INDEX_NAME = "model.safetensors.index.json"
_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def read_header(path: Path) -> tuple[dict, dict[str, TensorInfo]]:
    """(metadata, tensors) of one safetensors file; raises SourceError if it is malformed."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise SourceError(f"{path} is not a safetensors file (too short)")
            (n,) = struct.unpack("<Q", raw)
            if n > min(size - 8, _MAX_HEADER):
                raise SourceError(f"{path} is truncated or not a safetensors file (header length {n} > file size {size})")
            header_bytes = f.read(n)
    except OSError as e:
        raise SourceError(f"cannot read {path}: {e.strerror}") from None
    try:
        header = json.loads(header_bytes)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise SourceError(f"{path} is corrupt: its safetensors header is not valid JSON") from None
    if not isinstance(header, dict):
        raise SourceError(f"{path} is corrupt: unexpected safetensors header")
    meta = header.pop("__metadata__", {}) or {}
    data_start = 8 + n
    tensors: dict[str, TensorInfo] = {}
    for name, t in header.items():
        try:
            dtype, shape, (b, e) = t["dtype"], tuple(t["shape"]), t["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise SourceError(f"{path} is corrupt: bad entry for tensor {name!r}") from None
        expect = ITEMSIZE.get(dtype, 0) * _prod(shape)
        if e - b != expect or b < 0:
            raise SourceError(f"{path} is corrupt: tensor {name!r} has {e - b} bytes, expected {expect}")
        if data_start + e > size:
            raise SourceError(f"{path} is truncated: tensor {name!r} ends at byte {data_start + e}, file has {size}")
        tensors[name] = TensorInfo(name, path, dtype, shape, data_start + b, data_start + e)
    return meta, tensors


def _prod(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def validate_safetensors_file(path: Path) -> None:
    read_header(path)


def validate_safetensors_dir(path: Path) -> None:
    """Check every safetensors file (and the shard index) of a model directory."""
    if (path / INDEX_NAME).exists():
        TensorIndex.open(path)
        return
    for f in sorted(path.glob("*.safetensors")):
        read_header(f)


class TensorIndex:
    """Name → :class:`TensorInfo` over a file, a sharded directory (with its index) or a plain directory."""

    def __init__(self, tensors: dict[str, TensorInfo], metadata: dict, files: list[Path], root: Path) -> None:
        self.tensors, self.metadata, self.files, self.root = tensors, metadata, files, root
        self._fds: dict[Path, int] = {}

    @classmethod
    def open(cls, path: str | Path) -> "TensorIndex":
        path = Path(path)
        if not path.exists():
            raise SourceError(f"not found: {path}")
        if path.is_file():
            meta, tensors = read_header(path)
            return cls(tensors, meta, [path], path.parent)
        index_file = path / INDEX_NAME
        if index_file.exists():
            try:
                weight_map = json.loads(index_file.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise SourceError(f"{index_file} is corrupt (no weight_map)") from None
            files = sorted({path / f for f in weight_map.values()})
            for f in files:
                if not f.exists():
                    raise SourceError(f"{index_file} names a missing shard: {f.name}")
        else:
            files = sorted(path.glob("*.safetensors"))
            weight_map = None
        if not files:
            raise SourceError(f"no safetensors files in {path}")
        tensors: dict[str, TensorInfo] = {}
        meta: dict = {}
        for f in files:
            m, t = read_header(f)
            meta.update(m)
            tensors.update(t)
        if weight_map is not None:
            for name, fname in weight_map.items():
                info = tensors.get(name)
                if info is None or info.file.name != fname:
                    raise SourceError(f"{index_file} maps {name!r} to {fname}, which does not contain it")
        return cls(tensors, meta, files, path)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def __len__(self) -> int:
        return len(self.tensors)

    def read_bytes(self, name: str) -> bytearray:
        """The raw bytes of one tensor (one positioned read)."""
        info = self.tensors[name]
        fd = self._fds.get(info.file)
        if fd is None:
            fd = self._fds[info.file] = os.open(info.file, os.O_RDONLY)
        buf = bytearray(info.nbytes)
        view, done = memoryview(buf), 0
        while done < info.nbytes:
            n = os.preadv(fd, [view[done:]], info.begin + done)
            if n <= 0:
                raise SourceError(f"{info.file} is truncated (reading {name!r})")
            done += n
        return buf

    def get_numpy(self, name: str):
        """One floating-point tensor as a float32 numpy array (bf16 widened), without torch."""
        import numpy as np

        info = self.tensors[name]
        buf = self.read_bytes(name)
        if info.dtype == "BF16":
            return (np.frombuffer(buf, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(info.shape)
        kinds = {"F32": np.float32, "F16": np.float16, "F64": np.float64}
        if info.dtype not in kinds:
            return None
        return np.frombuffer(buf, dtype=kinds[info.dtype]).astype(np.float32).reshape(info.shape)

    def get(self, name: str) -> "torch.Tensor":
        """Read one tensor: one positioned read into a fresh buffer, the only allocation.

        (Plain reads rather than a memory map, so pages of the whole checkpoint do not pile up
        in the process's resident memory while a large model streams through.)
        """
        import torch

        info = self.tensors[name]
        if info.dtype not in DTYPES:
            raise SourceError(f"tensor {name!r} has unsupported dtype {info.dtype}")
        buf = self.read_bytes(name)
        if not buf:
            return torch.empty(info.shape, dtype=DTYPES[info.dtype])
        return torch.frombuffer(buf, dtype=DTYPES[info.dtype]).reshape(info.shape)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
