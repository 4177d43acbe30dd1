"""Row-wise IBNorm: drop-in replacements for RMSNorm and LayerNorm."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ..kernels.dispatch import row_norm
from .base import IBNormBase


def _as_shape(normalized_shape: int | Sequence[int]) -> tuple[int, ...]:
    return (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)


class _IBRowNorm(IBNormBase):
    centered: bool

    def __init__(
        self,
        normalized_shape: int | Sequence[int],
        eps: float,
        elementwise_affine: bool = True,
        bias: bool = True,
        *,
        op: str = "tanh",
        lam: float | Tensor = 0.0,
        per_channel: bool = False,
        learnable_lam: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.normalized_shape = _as_shape(normalized_shape)
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        self._init_affine(self.normalized_shape, elementwise_affine, bias, device, dtype)
        self._init_lambda(op, lam, self.normalized_shape, per_channel, learnable_lam)

    def _lam_channel_shape(self) -> tuple[int, ...]:
        return self.normalized_shape

    def forward(self, x: Tensor) -> Tensor:
        return row_norm(x, self.normalized_shape, self.weight, self.bias, self.lam, self.op, self.eps, self.centered)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}, {self._lam_repr()}"


class IBNormRMS(_IBRowNorm):
    """IBNorm with RMSNorm's grouping (not centred). Equals ``nn.RMSNorm`` at λ = 0."""

    grouping = "rms"
    centered = False

    def __init__(
        self, normalized_shape, eps: float | None = 1e-6, elementwise_affine: bool = True, bias: bool = False, **kwargs
    ) -> None:
        # nn.RMSNorm's eps=None means float32 machine epsilon (statistics are computed in float32).
        eps = torch.finfo(torch.float32).eps if eps is None else eps
        super().__init__(normalized_shape, eps, elementwise_affine, bias, **kwargs)


class IBLayerNorm(_IBRowNorm):
    """IBNorm with LayerNorm's grouping (centred). Equals ``nn.LayerNorm`` at λ = 0."""

    grouping = "layer"
    centered = True

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True, bias: bool = True, **kwargs) -> None:
        super().__init__(normalized_shape, eps, elementwise_affine, bias, **kwargs)


class _ChannelsFirst:
    """Normalizes dim 1 of an N, C, … tensor by moving it last (timm's LayerNorm2d / RmsNorm2d)."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.movedim(1, -1)).movedim(-1, 1)


class IBLayerNorm2d(_ChannelsFirst, IBLayerNorm):
    """IBLayerNorm over the channels of an NCHW tensor."""


class IBNormRMS2d(_ChannelsFirst, IBNormRMS):
    """IBNormRMS over the channels of an NCHW tensor."""


# Earlier names.  Serving engines swap every module whose class name ends in "RMSNorm" for their own
# fused RMSNorm (SGLang's Transformers backend), which would silently drop λ; the classes are named
# IBNormRMS* so nothing matches, and these aliases keep old imports and manifests working.
IBRMSNorm = IBNormRMS
IBRMSNorm2d = IBNormRMS2d
LEGACY_CLASS_NAMES = {"IBRMSNorm": "IBNormRMS", "IBRMSNorm2d": "IBNormRMS2d"}
