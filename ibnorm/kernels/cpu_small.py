"""Decode-sized row-wise IBNorm through a small C function (``cpu_rows.c``), built on first use.

With one token per sequence a norm is a few hundred numbers and its cost is per-op overhead:
the few-op torch form (``cpu_rownorm``) still runs ~20 ops (~45 µs), torch's own RMSNorm ~8.
This makes it one call.  The C file needs only a C compiler and libm (no torch headers), builds
in well under a second, and is cached per source hash under ``$IBNORM_CACHE`` (default
``~/.cache/ibnorm``).  Without a compiler, or with ``IBNORM_CPU_C=0``, ``available()`` is False
and the torch form serves.  Inference only (no autograd); float32 and bfloat16.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from ..functional import RESTANDARDIZE_FLOOR

MAX_ELEMENTS = 1 << 15  # above this the vectorized torch form is faster (the C loop is scalar)
_DTYPES = {torch.float32: 0, torch.bfloat16: 1}
_OPS = {"tanh": 0, "log": 1, "power": 2}
_SOURCE = Path(__file__).with_name("cpu_rows.c")


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


@functools.lru_cache(maxsize=1)
def _library():
    """The loaded function, or None (no compiler, build failure, or disabled)."""
    if os.environ.get("IBNORM_CPU_C", "1") == "0" or not _SOURCE.exists():
        return None
    cc = _compiler()
    if cc is None:
        return None
    src = _SOURCE.read_bytes()
    cache = Path(os.environ.get("IBNORM_CACHE") or Path.home() / ".cache" / "ibnorm")
    lib = cache / f"cpu_rows-{hashlib.sha256(src).hexdigest()[:16]}.so"
    tmp = None
    try:
        if not lib.exists():
            cache.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
            os.close(fd)
            # -O2 without -ffast-math: tanhf/log1pf/expm1f keep their accuracy.
            subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", tmp, str(_SOURCE), "-lm"],
                           check=True, capture_output=True, timeout=120)
            os.replace(tmp, lib)  # atomic: concurrent processes never load a half-written file
            tmp = None
        fn = ctypes.CDLL(str(lib)).ibnorm_rows
    except (OSError, subprocess.SubprocessError):
        return None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
    vp, i, lg, f = ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_float
    fn.argtypes = [vp, i, vp, vp, i, vp, i, vp, i, lg, lg, f, f, i, i]
    fn.restype = i
    return fn


def available() -> bool:
    return _library() is not None


def applies(x: Tensor, weight: Tensor | None, bias: Tensor | None) -> bool:
    """Small, CPU, float32/bf16, and no gradient wanted."""
    if x.device.type != "cpu" or x.dtype not in _DTYPES or x.numel() > MAX_ELEMENTS:
        return False
    for t in (weight, bias):
        if t is not None and (t.dtype not in _DTYPES or t.device.type != "cpu"):
            return False
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
    return not grad and available()


def row_norm(x: Tensor, normalized_shape: Sequence[int], weight: Tensor | None, bias: Tensor | None,
             lam_f32: Tensor, op: str, eps: float, centered: bool) -> Tensor | None:
    """IBNorm of the rows of ``x``; ``lam_f32`` is the effective λ (≥ 0), contiguous float32. None on failure."""
    fn = _library()
    n = math.prod(normalized_shape)
    xc = x.contiguous()
    w = weight.contiguous() if weight is not None else None
    b = bias.contiguous() if bias is not None else None
    y = torch.empty_like(xc)
    rc = fn(xc.data_ptr(), _DTYPES[x.dtype], y.data_ptr(),
            w.data_ptr() if w is not None else None, _DTYPES[w.dtype] if w is not None else 0,
            b.data_ptr() if b is not None else None, _DTYPES[b.dtype] if b is not None else 0,
            lam_f32.data_ptr(), int(lam_f32.numel() > 1), xc.numel() // max(n, 1), n, float(eps),
            RESTANDARDIZE_FLOOR, int(centered), _OPS[op])
    return y if rc == 0 else None
