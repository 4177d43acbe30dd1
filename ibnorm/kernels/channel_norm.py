"""CUDA path for the batch and group groupings: the reference math, compiled by ``torch.compile``.

Their statistics run over batch and spatial dimensions (batch) or over a sample's channel group
(group), not over contiguous rows, so the row kernels do not apply.  Inductor fuses the
reference's elementwise chain and its reductions (forward and backward) into a few kernels, which
is what a ResNet-style fine-tune needs; the numbers are in the GPU benchmark's channel rows.

``IBNORM_KERNEL=reference`` (or CPU tensors, or being traced by an outer ``torch.compile``, which
fuses the reference itself) keeps the eager reference.  A compile failure warns once and falls
back to the reference for the rest of the process.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Callable

import torch
from torch import Tensor

from .. import functional as IBF
from .dispatch import kernel_mode

_broken: set[str] = set()


@functools.lru_cache(maxsize=None)
def _compiled(name: str) -> Callable[..., Tensor]:
    fn = {"batch": IBF.ib_batch_norm, "group": IBF.ib_group_norm}[name]
    return torch.compile(fn, dynamic=None)  # shapes that change become dynamic after one recompile


def use_compiled(x: Tensor) -> bool:
    return x.is_cuda and kernel_mode() != "reference" and not torch.compiler.is_compiling()


def _call(name: str, reference: Callable[..., Tensor], x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    if name in _broken or not use_compiled(x):
        return reference(x, *args, **kwargs)
    try:
        return _compiled(name)(x, *args, **kwargs)
    except Exception as exc:  # an Inductor/toolchain problem must not stop training: the reference serves
        _broken.add(name)
        warnings.warn(f"compiled IBNorm {name} path failed ({type(exc).__name__}: {exc}); using the reference", stacklevel=3)
        return reference(x, *args, **kwargs)


def group_norm(x: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None, lam: Tensor | float, op: str,
               eps: float) -> Tensor:
    """``ibnorm.functional.ib_group_norm``, compiled on CUDA."""
    return _call("group", IBF.ib_group_norm, x, num_groups, weight, bias, lam, op, eps)


def batch_norm(x: Tensor, running_mean: Tensor | None, running_var: Tensor | None, weight: Tensor | None,
               bias: Tensor | None, lam: Tensor | float, op: str, **kwargs: Any) -> Tensor:
    """``ibnorm.functional.ib_batch_norm`` (running buffers updated in place), compiled on CUDA."""
    return _call("batch", IBF.ib_batch_norm, x, running_mean, running_var, weight, bias, lam, op, **kwargs)
