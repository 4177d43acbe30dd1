"""A checkpoint as an index of tensors: headers parsed, data read only on request (one tensor at a time).

Reads the safetensors format directly (8-byte little-endian header length, JSON
header, data), so truncated or corrupt files are reported before anything loads.
"""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from ..errors import CorruptFileError, SourceError

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


FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
_MAX_RANK = 16  # no real tensor has more dimensions; bounds the work a hostile header can ask for
_MAX_DIM = 2**48


class _Duplicate(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    # json keeps the last of repeated keys silently; a tensor named twice is ambiguous, so refuse it
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise _Duplicate(k)
        out[k] = v
    return out


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def strict_json(raw: bytes, where: Path | str, what: str) -> object:
    """UTF-8 JSON with no repeated keys, no NaN/Infinity and bounded nesting; one error line naming ``what``."""
    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
    except _Duplicate as e:
        raise CorruptFileError(f"{where} is corrupt: {what} names {e.args[0]!r} twice") from None
    except RecursionError:
        raise CorruptFileError(f"{where} is corrupt: {what} is nested too deeply") from None
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
        raise CorruptFileError(f"{where} is corrupt: {what} is not valid JSON") from None


def parse_header_json(raw: bytes, where: Path | str) -> dict:
    """The JSON header as a dict: valid UTF-8 JSON, an object, no repeated keys, nesting bounded."""
    header = strict_json(raw, where, "its safetensors header")
    if not isinstance(header, dict):
        raise CorruptFileError(f"{where} is corrupt: its safetensors header is a {type(header).__name__}, not an object")
    meta = header.get("__metadata__", {})
    if meta is None:
        meta = {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise CorruptFileError(f"{where} is corrupt: __metadata__ must map strings to strings")
    header["__metadata__"] = meta
    return header


def _reject_constant(name: str) -> None:
    raise ValueError(name)  # NaN/Infinity are not JSON


def _entry(where: Path | str, name: str, t: object) -> tuple[str, tuple[int, ...], int, int]:
    """(dtype, shape, begin, end) of one header entry, every field checked."""
    if not isinstance(t, dict) or set(t) - {"dtype", "shape", "data_offsets"} or len(t) != 3:
        raise CorruptFileError(f"{where} is corrupt: entry of tensor {name!r} must have exactly dtype, shape, data_offsets")
    dtype, shape, offsets = t["dtype"], t["shape"], t["data_offsets"]
    if not isinstance(dtype, str) or dtype not in ITEMSIZE:
        raise CorruptFileError(f"{where} is corrupt: tensor {name!r} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or len(shape) > _MAX_RANK or not all(_is_int(d) and 0 <= d <= _MAX_DIM for d in shape):
        raise CorruptFileError(f"{where} is corrupt: tensor {name!r} has shape {shape!r} (need a list of non-negative integers)")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets):
        raise CorruptFileError(f"{where} is corrupt: tensor {name!r} has data_offsets {offsets!r} (need two integers)")
    begin, end = offsets
    if begin < 0 or end < begin:
        raise CorruptFileError(f"{where} is corrupt: tensor {name!r} has data_offsets [{begin}, {end}]")
    expect = ITEMSIZE[dtype] * _prod(shape)
    if end - begin != expect:
        raise CorruptFileError(f"{where} is corrupt: tensor {name!r} has {end - begin} bytes, expected {expect}")
    return dtype, tuple(shape), begin, end


def check_layout(where: Path | str, spans: list[tuple[int, int, str]], data_size: int) -> None:
    """Tensor byte ranges, sorted by offset, must tile [0, data_size) exactly: no overlap, no gap, nothing past the end."""
    pos, last = 0, None
    for begin, end, name in sorted(spans):
        if begin < pos:
            raise CorruptFileError(f"{where} is corrupt: tensors {last!r} and {name!r} overlap (bytes {begin}..{pos})")
        if begin > pos:
            raise CorruptFileError(f"{where} is corrupt: {begin - pos} unused bytes before tensor {name!r}")
        pos, last = end, name
    if pos > data_size:
        raise SourceError(f"{where} is truncated: tensor {last!r} ends at data byte {pos}, the file has {data_size}")
    if pos < data_size:
        raise CorruptFileError(f"{where} is corrupt: {data_size - pos} bytes after the last tensor")


def read_header(path: Path) -> tuple[dict, dict[str, TensorInfo]]:
    """(metadata, tensors) of one safetensors file, fully validated; raises SourceError if it is malformed."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise SourceError(f"{path} is not a safetensors file (too short)")
            (n,) = struct.unpack("<Q", raw)
            if n > min(size - 8, _MAX_HEADER) or n < 2:
                raise SourceError(f"{path} is truncated or not a safetensors file (header length {n}, file size {size})")
            header_bytes = f.read(n)
    except OSError as e:
        raise SourceError(f"cannot read {path}: {e.strerror}") from None
    header = parse_header_json(header_bytes, path)
    meta = header.pop("__metadata__")
    data_start = 8 + n
    tensors: dict[str, TensorInfo] = {}
    spans = []
    for name, t in header.items():
        dtype, shape, b, e = _entry(path, name, t)
        spans.append((b, e, name))
        tensors[name] = TensorInfo(name, path, dtype, shape, data_start + b, data_start + e)
    check_layout(path, spans, size - data_start)
    return meta, tensors


def _prod(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def require_float(name: str, dtype: str) -> None:
    """Norm weights, biases and λ must be floating point: an integer norm weight is garbage, not a scale."""
    if dtype not in FLOAT_DTYPES:
        raise CorruptFileError(f"norm tensor {name!r} has dtype {dtype}; norm weights must be float ({', '.join(FLOAT_DTYPES)})")


def validate_safetensors_file(path: Path) -> None:
    read_header(path)


def validate_safetensors_dir(path: Path) -> None:
    """Check every safetensors file (and the shard index) of a model directory."""
    if (path / INDEX_NAME).exists():
        TensorIndex.open(path)
        return
    for f in sorted(path.glob("*.safetensors")):
        read_header(f)


def _safe_shard_name(index_file: Path, fname: object) -> str:
    """A shard name must be a plain relative path inside the model directory (no absolute path, no ``..``)."""
    if not isinstance(fname, str) or not fname or any(ord(c) < 0x20 for c in fname):
        raise CorruptFileError(f"{index_file} is corrupt: shard name {fname!r} is not a file name")
    pure = PurePosixPath(fname)
    if pure.is_absolute() or fname.startswith("\\") or ".." in pure.parts or "\\" in fname or re.match(r"^[A-Za-z]:", fname):
        raise CorruptFileError(f"{index_file} names shard {fname!r} outside its directory; shard names must be relative")
    return fname


def read_index(index_file: Path) -> dict[str, str]:
    """The ``weight_map`` of a shard index, validated: tensor name → shard file name inside the directory, shards present."""
    try:
        raw = index_file.read_bytes()
    except OSError as e:
        raise SourceError(f"cannot read {index_file}: {e.strerror}") from None
    if len(raw) > _MAX_HEADER:
        raise CorruptFileError(f"{index_file} is corrupt: {len(raw)} bytes is too large for a shard index")
    index = strict_json(raw, index_file, "its shard index")
    if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
        raise CorruptFileError(f"{index_file} is corrupt (no weight_map object)")
    weight_map = index["weight_map"]
    if not weight_map:
        raise CorruptFileError(f"{index_file} is corrupt (empty weight_map)")
    root = index_file.parent
    for name, fname in weight_map.items():
        _safe_shard_name(index_file, fname)
    for fname in sorted(set(weight_map.values())):
        if not (root / fname).is_file():
            raise SourceError(f"{index_file} names a missing shard: {fname!r}")
    return weight_map


def read_exact(fd: int, offset: int, nbytes: int, truncated: str) -> bytearray:
    """``nbytes`` bytes of ``fd`` from ``offset`` into a fresh buffer (positioned reads); SourceError
    ``truncated`` when the file ends first."""
    buf = bytearray(nbytes)
    view, done = memoryview(buf), 0
    while done < nbytes:
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise SourceError(truncated)
        done += n
    return buf


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
            weight_map = read_index(index_file)
            files = sorted({path / f for f in weight_map.values()})
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
            twice = next((k for k in t if k in tensors), None)
            if twice is not None:
                raise CorruptFileError(f"{path}: tensor {twice!r} is stored in both {tensors[twice].file.name} and {f.name}")
            tensors.update(t)
        if weight_map is not None:
            for name, fname in weight_map.items():
                info = tensors.get(name)
                if info is None or info.file != path / fname:
                    raise CorruptFileError(f"{index_file} maps {name!r} to {fname!r}, which does not contain it")
            # transformers loads only what the index lists: an unlisted tensor would be left random there
            unlisted = sorted(set(tensors) - set(weight_map))
            if unlisted:
                raise CorruptFileError(f"{index_file} does not list {len(unlisted)} tensor(s) its shards hold, e.g. {unlisted[0]!r}")
        return cls(tensors, meta, files, path)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def __len__(self) -> int:
        return len(self.tensors)

    def fd_of(self, name: str) -> int:
        """An open read-only descriptor of the file that holds ``name`` (kept until ``close``)."""
        info = self.tensors[name]
        fd = self._fds.get(info.file)
        if fd is None:
            fd = self._fds[info.file] = os.open(info.file, os.O_RDONLY)
        return fd

    def read_bytes(self, name: str) -> bytearray:
        """The raw bytes of one tensor (one positioned read)."""
        info = self.tensors[name]
        return read_exact(self.fd_of(name), info.begin, info.nbytes, f"{info.file} is truncated (reading {name!r})")

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
