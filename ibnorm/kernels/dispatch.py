"""Chooses between the fused kernels and the reference for each call.

``IBNORM_KERNEL=auto`` (default): Triton for CUDA tensors when triton is importable and the
hidden size is ≤ 65536; the few-op form of ``cpu_rownorm`` elsewhere (CPU), where it applies (λ
that does not require grad); the reference otherwise.  ``triton`` forces the kernels (with
``TRITON_INTERPRET=1`` they run on CPU tensors); ``reference`` forces the reference.
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import Sequence

from torch import Tensor

from .. import functional as IBF
from . import cpu_rownorm

KERNEL_ENV = "IBNORM_KERNEL"
_CHOICES = ("auto", "triton", "reference")


def kernel_mode() -> str:
    mode = os.environ.get(KERNEL_ENV, "auto").lower()
    if mode not in _CHOICES:
        raise ValueError(f"{KERNEL_ENV}={mode!r}: choose one of {', '.join(_CHOICES)}")
    return mode


@functools.lru_cache(maxsize=1)
def triton_ops():
    """The kernel module, or None when triton cannot be imported."""
    try:
        from . import rownorm_op
    except Exception:  # triton missing or broken: the reference serves
        return None
    return rownorm_op


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(x: Tensor, normalized_shape: Sequence[int], mode: str | None = None) -> bool:
    mode = kernel_mode() if mode is None else mode
    if mode == "reference" or len(normalized_shape) != 1:
        return False
    if mode == "auto" and not x.is_cuda:
        return False
    ops = triton_ops()
    if ops is None:
        if mode == "triton":
            raise RuntimeError(f"{KERNEL_ENV}=triton but triton cannot be imported")
        return False
    if not ops.supported(x):
        _warn_once(f"hidden size {x.shape[-1]} > {65536}: IBNorm falls back to the reference implementation")
        return False
    if not x.is_cuda and not _interpreting():
        raise RuntimeError(f"{KERNEL_ENV}=triton on CPU tensors needs TRITON_INTERPRET=1")
    return True


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    warnings.warn(message, stacklevel=3)


def describe() -> str:
    """Which path CUDA tensors take, for logs ('triton' or 'reference')."""
    if kernel_mode() == "reference" or triton_ops() is None:
        return "reference"
    return "triton"


def row_norm(
    x: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None,
    bias: Tensor | None,
    lam: Tensor,
    op: str,
    eps: float,
    centered: bool,
) -> Tensor:
    mode = kernel_mode()
    if use_triton(x, normalized_shape, mode):
        # The straight-through max(λ, 0) of the reference is applied inside the kernels.
        return triton_ops().row_norm_op(x, weight, bias, lam, op, float(eps), bool(centered))
    if mode == "auto" and cpu_rownorm.supported(x, lam, op):
        y = cpu_rownorm.row_norm(x, normalized_shape, weight, bias, lam, op, eps, centered)
        if y is not None:
            return y
    return IBF.ib_row_norm(x, normalized_shape, weight, bias, lam, op, eps, centered)
