"""IBNorm on CPU in one fused call of a small C function (``cpu_rows.c``), built on first use.

The torch form (``torch_rownorm``) runs about a dozen ops per call: during decode (one token per
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


def _load(cc: str, cache: Path) -> ctypes.CDLL | None:
    """The built library, loaded; a cached file that does not load (damaged) is rebuilt once."""
    path = _build(cc, cache, _SOURCE.read_bytes())
    if path is None:
        return None
    try:
        return ctypes.CDLL(str(path))
    except OSError:
        path.unlink(missing_ok=True)
        path = _build(cc, cache, _SOURCE.read_bytes())
        return ctypes.CDLL(str(path)) if path is not None else None


_VP, _I, _L, _F = ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_float
_SIGNATURES = {
    "ibnorm_rows": [_VP, _I, _VP, _VP, _VP, _VP, _I, _L, _L, _F, _F, _I, _I, _I],
    "ibnorm_groups": [_VP, _I, _VP, _VP, _VP, _VP, _I, _L, _L, _L, _L, _F, _F, _I, _I],
    "ibnorm_channels": [_VP, _I, _VP, _VP, _VP, _VP, _VP, _VP, _VP, _VP, _I, _L, _L, _L, _I, _I],
}


@functools.lru_cache(maxsize=1)
def _library():
    """The loaded library with its functions typed, or None (no compiler, build failure, or disabled)."""
    if os.environ.get("IBNORM_CPU_C", "1") == "0" or not _SOURCE.exists():
        return None
    cc = _compiler()
    if cc is None:
        return None
    cache = Path(os.environ.get("IBNORM_CACHE") or Path.home() / ".cache" / "ibnorm")
    try:
        lib = _load(cc, cache)
        for name, argtypes in _SIGNATURES.items() if lib is not None else ():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = argtypes, _I
    except (OSError, AttributeError):
        return None
    return lib


def available() -> bool:
    return _library() is not None


def applies(x: Tensor, weight: Tensor | None, bias: Tensor | None) -> bool:
    """CPU, float32/bf16, and no gradient wanted."""
    if x.device.type != "cpu" or x.dtype not in _DTYPES or x.numel() == 0:
        return False
    for t in (weight, bias):
        if t is not None and (not t.is_floating_point() or t.device.type != "cpu"):
            return False
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
    return not grad and available()


def _f32(t: Tensor | None) -> Tensor | None:
    if t is None or (t.dtype == torch.float32 and t.is_contiguous()):  # the common case: no new tensor
        return t
    return t.detach().to(torch.float32).contiguous()


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _threads(x: Tensor) -> int:
    return torch.get_num_threads() if x.numel() >= THREADED_MIN_ELEMENTS else 1


def row_norm(x: Tensor, normalized_shape: Sequence[int], weight: Tensor | None, bias: Tensor | None,
             lam_f32: Tensor, op: str, eps: float, centered: bool) -> Tensor | None:
    """rms/layer IBNorm of the rows of ``x``; ``lam_f32`` is the effective λ (≥ 0), contiguous float32.

    None on failure (the caller's torch form serves)."""
    n = math.prod(normalized_shape)
    xc = x.contiguous()
    w, b = _f32(weight), _f32(bias)
    y = torch.empty_like(xc)
    rc = _library().ibnorm_rows(xc.data_ptr(), _DTYPES[x.dtype], y.data_ptr(), _ptr(w), _ptr(b), lam_f32.data_ptr(),
                                int(lam_f32.numel() > 1), xc.numel() // max(n, 1), n, float(eps), RESTANDARDIZE_FLOOR,
                                int(centered), _OPS[op], _threads(xc))
    return y if rc == 0 else None


def group_norm(x: Tensor, groups: int, weight: Tensor | None, bias: Tensor | None, lam_f32: Tensor, op: str,
               eps: float) -> Tensor | None:
    """group IBNorm of ``x`` (N, C, *); λ one value or one per channel. None on failure."""
    xc = x.contiguous()
    n, ch = xc.shape[:2]
    w, b = _f32(weight), _f32(bias)
    y = torch.empty_like(xc)
    rc = _library().ibnorm_groups(xc.data_ptr(), _DTYPES[x.dtype], y.data_ptr(), _ptr(w), _ptr(b), lam_f32.data_ptr(),
                                  int(lam_f32.numel() > 1), n, ch, groups, xc[0, 0].numel(), float(eps),
                                  RESTANDARDIZE_FLOOR, _OPS[op], _threads(xc))
    return y if rc == 0 else None


def channel_map(x: Tensor, mean: Tensor, rstd: Tensor, mu: Tensor, k: Tensor, weight: Tensor | None,
                bias: Tensor | None, lam_f32: Tensor, op: str) -> Tensor | None:
    """y = (s_λ((x − mean)·rstd) − mu)·k·γ + β per channel of ``x`` (N, C, *): batch IBNorm in eval.

    The per-channel constants are float32 (C,). None on failure."""
    xc = x.contiguous()
    n, ch = (xc.shape[0], xc.shape[1]) if xc.dim() > 1 else (1, xc.shape[0])
    consts = [_f32(t) for t in (mean, rstd, mu, k, weight, bias)]
    y = torch.empty_like(xc)
    rc = _library().ibnorm_channels(xc.data_ptr(), _DTYPES[x.dtype], y.data_ptr(), *map(_ptr, consts),
                                    lam_f32.data_ptr(), int(lam_f32.numel() > 1), n, ch, xc.numel() // max(n * ch, 1),
                                    _OPS[op], _threads(xc))
    return y if rc == 0 else None
