"""Chooses between the fused kernels and the reference for each call."""

from __future__ import annotations

from typing import Sequence

from torch import Tensor

from .. import functional as IBF


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
    return IBF.ib_row_norm(x, normalized_shape, weight, bias, lam, op, eps, centered)
