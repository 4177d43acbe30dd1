"""Fast paths for the batch and group groupings.

CUDA: the reference math compiled by ``torch.compile``.  Their statistics run over batch and
spatial dimensions (batch) or over a sample's channel group (group), not over contiguous rows, so
the row kernels do not apply.  Inductor fuses the reference's elementwise chain and its reductions
(forward and backward) into a few kernels, which is what a ResNet-style fine-tune needs; the
numbers are in the GPU benchmark's channel rows.  A compile failure warns once and falls back to
the reference for the rest of the process.

CPU, inference (no gradient wanted): the fused C function of ``cpu_fused`` — group norm row by
row (a sample's channel group), batch norm in eval as the per-channel map its running statistics
make it.  A λ that is 0 everywhere keeps the reference (λ = 0 is the source norm exactly), as does
batch norm with batch statistics (training, or no running statistics).

``IBNORM_KERNEL=reference`` (or being traced by an outer ``torch.compile``, which fuses the
reference itself) keeps the eager reference.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Callable

import torch
from torch import Tensor

from .. import functional as IBF
from . import cpu_fused, cpu_rownorm
from .torch_rownorm import lam_constants
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


def _cpu_lam(x: Tensor, weight: Tensor | None, bias: Tensor | None, lam: Tensor | float, op: str) -> Tensor | None:
    """The effective λ as flat float32 when the fused CPU path serves this call, else None."""
    lam_t = lam if isinstance(lam, Tensor) else torch.tensor(float(lam))
    if kernel_mode() != "auto" or not cpu_rownorm.supported(x, lam_t, op) or not cpu_fused.applies(x, weight, bias):
        return None
    consts = lam_constants(lam_t, op, torch.float32)
    return None if consts is None or consts.all_zero else consts.lam32


def group_norm(x: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None, lam: Tensor | float, op: str,
               eps: float) -> Tensor:
    """``ibnorm.functional.ib_group_norm``: compiled on CUDA, the fused C function at CPU inference."""
    lam32 = _cpu_lam(x, weight, bias, lam, op) if x.dim() >= 2 and x.shape[1] % num_groups == 0 else None
    if lam32 is not None:
        y = cpu_fused.group_norm(x, num_groups, weight, bias, lam32, op, eps)
        if y is not None:
            return y
    return _call("group", IBF.ib_group_norm, x, num_groups, weight, bias, lam, op, eps)


def batch_norm(x: Tensor, running_mean: Tensor | None, running_var: Tensor | None, weight: Tensor | None,
               bias: Tensor | None, lam: Tensor | float, op: str, **kwargs: Any) -> Tensor:
    """``ibnorm.functional.ib_batch_norm`` (running buffers updated in place): compiled on CUDA, the fused
    C function at CPU inference with running statistics."""
    running = (running_mean, running_var, kwargs.get("running_c_mean"), kwargs.get("running_c_var"),
               kwargs.get("running_z_var"))
    if not kwargs.get("training", False) and x.dim() >= 2 and all(t is not None for t in running):
        lam32 = _cpu_lam(x, weight, bias, lam, op)
        if lam32 is not None:
            mean, var, mu, var_c, var_z = (t.to(torch.float32) for t in running)
            rstd = torch.rsqrt(var + kwargs.get("eps", 1e-5))
            y = cpu_fused.channel_map(x, mean, rstd, mu, IBF.spread_ratio(var_z, var_c), weight, bias, lam32, op)
            if y is not None:
                return y
    return _call("batch", IBF.ib_batch_norm, x, running_mean, running_var, weight, bias, lam, op, **kwargs)
