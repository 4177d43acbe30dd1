"""IBNorm with GroupNorm's grouping."""

from __future__ import annotations

from torch import Tensor

from .base import IBNormBase


class IBGroupNorm(IBNormBase):
    """Drop-in for ``nn.GroupNorm``; λ is a scalar or one value per channel."""

    grouping = "group"

    def __init__(
        self,
        num_groups: int,
        num_channels: int,
        eps: float = 1e-5,
        affine: bool = True,
        *,
        op: str = "tanh",
        lam: float | Tensor = 0.0,
        per_channel: bool = False,
        learnable_lam: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if num_channels % num_groups:
            raise ValueError(f"num_channels ({num_channels}) must be divisible by num_groups ({num_groups})")
        self.num_groups, self.num_channels, self.eps, self.affine = num_groups, num_channels, eps, affine
        self._init_affine((num_channels,), affine, affine, device, dtype)
        self._init_lambda(op, lam, (num_channels,), per_channel, learnable_lam)

    def _lam_channel_shape(self) -> tuple[int, ...]:
        return (self.num_channels,)

    def forward(self, x: Tensor) -> Tensor:
        from ..kernels.channel_norm import group_norm  # late import: kernels are optional

        y = group_norm(x, self.num_groups, self.weight, self.bias, self.lam, self.op, self.eps)
        return self._post(y)

    def extra_repr(self) -> str:
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}, {self._lam_repr()}"
