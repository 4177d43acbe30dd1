"""Row-wise IBNorm on CPU in one fused call of a small C function (``cpu_rows.c``), built on first use.

The torch form (``cpu_rownorm``) runs about a dozen ops per call: during decode (one token per
sequence) its cost is per-op overhead (~45 µs against ~8 for torch's RMSNorm), during prefill
it is its eight or so passes over memory and torch's transcendental functions.  The C function
reads each row once and writes it once, computes s_λ with vectorized polynomial forms, and splits
the rows across torch's OpenMP threads when there are enough of them.  It needs only a C
compiler (no torch headers): it builds in about a second and is cached per source, compiler
flags and CPU under ``$IBNORM_CACHE`` (default ``~/.cache/ibnorm``).  Built for the machine it
runs on (``-march=native``), falling back to a portable build.  Without a compiler, or with
``IBNORM_CPU_C=0``, ``available()`` is False and the torch form serves.  Inference only (no
autograd); float32 and bfloat16.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from ..functional import RESTANDARDIZE_FLOOR

# Below this many elements one thread does the whole call (waking the pool costs more than it saves).
THREADED_MIN_ELEMENTS = 1 << 16
_DTYPES = {torch.float32: 0, torch.bfloat16: 1}
_OPS = {"tanh": 0, "log": 1, "power": 2}
_SOURCE = Path(__file__).with_name("cpu_rows.c")


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


# -O3 and `omp simd` vectorize the loops; no -ffast-math, so the polynomial forms and the float64
# row totals keep their accuracy.  -fopenmp links libgomp.so.1, which resolves to the copy torch has
# already loaded, so the rows run on torch's own thread pool.  Later flag sets serve where the
# earlier ones fail (no -march=native, no OpenMP runtime).
_FLAGS = (["-O3", "-march=native", "-fopenmp"], ["-O3", "-fopenmp"], ["-O3", "-fopenmp-simd"])
_COMMON = ["-fno-math-errno", "-shared", "-fPIC"]


def _cpu_identity() -> bytes:
    """What -march=native depends on, so a cache shared between machines never loads a foreign build."""
    try:
        with open("/proc/cpuinfo", "rb") as f:
            lines = [ln for ln in f.read().splitlines() if ln.startswith((b"flags", b"model name", b"Features"))]
        return b"\n".join(sorted(set(lines)))
    except OSError:
        return platform.processor().encode() + platform.machine().encode()


def _build(cc: str, cache: Path, src: bytes) -> Path | None:
    for flags in _FLAGS:
        key = hashlib.sha256(src + " ".join([cc, *flags, *_COMMON]).encode() + _cpu_identity()).hexdigest()[:16]
        lib = cache / f"cpu_rows-{key}.so"
        if lib.exists():
            return lib
        cache.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
        os.close(fd)
        try:
            subprocess.run([cc, *flags, *_COMMON, "-o", tmp, str(_SOURCE), "-lm"],
                           check=True, capture_output=True, timeout=120)
            os.replace(tmp, lib)  # atomic: concurrent processes never load a half-written file
            return lib
        except (OSError, subprocess.SubprocessError):
            continue
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    return None


@functools.lru_cache(maxsize=1)
def _library():
    """The loaded function, or None (no compiler, build failure, or disabled)."""
    if os.environ.get("IBNORM_CPU_C", "1") == "0" or not _SOURCE.exists():
        return None
    cc = _compiler()
    if cc is None:
        return None
    cache = Path(os.environ.get("IBNORM_CACHE") or Path.home() / ".cache" / "ibnorm")
    try:
        lib = _build(cc, cache, _SOURCE.read_bytes())
        fn = ctypes.CDLL(str(lib)).ibnorm_rows if lib is not None else None
    except OSError:
        return None
    if fn is None:
        return None
    vp, i, lg, f = ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_float
    fn.argtypes = [vp, i, vp, vp, i, vp, i, vp, i, lg, lg, f, f, i, i, i]
    fn.restype = i
    return fn


def available() -> bool:
    return _library() is not None


def applies(x: Tensor, weight: Tensor | None, bias: Tensor | None) -> bool:
    """CPU, float32/bf16, and no gradient wanted."""
    if x.device.type != "cpu" or x.dtype not in _DTYPES or x.numel() == 0:
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
    rows = xc.numel() // max(n, 1)
    threads = torch.get_num_threads() if xc.numel() >= THREADED_MIN_ELEMENTS else 1
    rc = fn(xc.data_ptr(), _DTYPES[x.dtype], y.data_ptr(),
            w.data_ptr() if w is not None else None, _DTYPES[w.dtype] if w is not None else 0,
            b.data_ptr() if b is not None else None, _DTYPES[b.dtype] if b is not None else 0,
            lam_f32.data_ptr(), int(lam_f32.numel() > 1), rows, n, float(eps),
            RESTANDARDIZE_FLOOR, int(centered), _OPS[op], threads)
    return y if rc == 0 else None
