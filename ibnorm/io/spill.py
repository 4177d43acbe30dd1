"""Tensors set aside in an unlinked temporary file: out of memory until read back, and gone when the
file is closed or the process ends, however it ends (nothing is ever left on disk)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

import torch

from .safetensors_index import read_exact


class TensorSpill:
    def __init__(self, directory: Path | None = None) -> None:
        self.file = tempfile.TemporaryFile(dir=directory)

    def put(self, t: torch.Tensor) -> Callable[[], torch.Tensor]:
        """Write ``t``; the returned call reads it back (a fresh tensor each time)."""
        shape, dtype = tuple(t.shape), t.dtype
        raw = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        offset = self.file.seek(0, os.SEEK_END)
        self.file.write(memoryview(raw))
        self.file.flush()
        file, nbytes = self.file, raw.nbytes  # each getter holds the file open

        def get() -> torch.Tensor:
            if not nbytes:
                return torch.empty(shape, dtype=dtype)
            buf = read_exact(file.fileno(), offset, nbytes, "the spill file was truncated")
            return torch.frombuffer(buf, dtype=dtype).reshape(shape)

        return get

    def close(self) -> None:
        self.file.close()
