"""Row-wise IBNorm (rms, layer) on CPU: the fused C function where it serves, else the torch form.

At inference (no gradient wanted) one call of the fused C function (``cpu_fused``): about the
source norm's time.  In training, or without a C compiler, the few-op torch form
(``torch_rownorm``).  Both equal the reference to float32 rounding and share the constants
derived once per λ tensor; a layer whose λ is 0 everywhere is the reference bit for bit.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from . import cpu_fused, torch_rownorm
from .torch_rownorm import compute_dtype, lam_constants


def supported(x: Tensor, lam: Tensor, op: str) -> bool:
    """Whether a fast form serves this call (otherwise the reference does)."""
    if op not in torch_rownorm.OPS or not x.is_floating_point():
        return False
    # λ-gradients need the reference's exact derivative at λ = 0.
    return not (lam.requires_grad and torch.is_grad_enabled())


def row_norm(
    x: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None,
    bias: Tensor | None,
    lam: Tensor,
    op: str,
    eps: float,
    centered: bool,
) -> Tensor | None:
    """Row-wise IBNorm as ``ibnorm.functional.ib_row_norm``; None when the reference must serve."""
    consts = lam_constants(lam, op, compute_dtype(x.dtype))
    if consts is None:
        return None
    if not consts.all_zero and cpu_fused.applies(x, weight, bias):  # one fused C call, not ~12 ops
        y = cpu_fused.row_norm(x, normalized_shape, weight, bias, consts.lam32, op, eps, centered)
        if y is not None:
            return y
    return torch_rownorm.row_norm(x, normalized_shape, weight, bias, lam, op, eps, centered, consts)
