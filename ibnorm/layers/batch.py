"""IBNorm with BatchNorm's grouping, with running statistics for eval."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import IBNormBase


class IBBatchNorm(IBNormBase):
    """Drop-in for ``nn.BatchNorm1d/2d/3d``.

    Besides BatchNorm's ``running_mean``/``running_var`` it keeps the step-4
    estimates ``running_c_mean`` (of c − z), ``running_c_var`` and
    ``running_z_var``, updated like BatchNorm's own (momentum, or a cumulative
    average when ``momentum=None``).
    """

    _expected_dims: tuple[int, ...] | None = None

    grouping = "batch"

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        *,
        op: str = "tanh",
        lam: float | Tensor = 0.0,
        per_channel: bool = False,
        learnable_lam: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.affine, self.track_running_stats = affine, track_running_stats
        self._init_affine((num_features,), affine, affine, device, dtype)
        if track_running_stats:
            # Running statistics stay float32 whatever the parameter dtype, as mixed-precision BN does.
            stats = {"device": device, "dtype": torch.float32}
            self.register_buffer("running_mean", torch.zeros(num_features, **stats))
            self.register_buffer("running_var", torch.ones(num_features, **stats))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
            self.register_buffer("running_c_mean", torch.zeros(num_features, **stats))
            self.register_buffer("running_c_var", torch.ones(num_features, **stats))
            self.register_buffer("running_z_var", torch.ones(num_features, **stats))
        else:
            for name in ("running_mean", "running_var", "num_batches_tracked", "running_c_mean", "running_c_var", "running_z_var"):
                self.register_buffer(name, None)
        self._init_lambda(op, lam, (num_features,), per_channel, learnable_lam)

    def _lam_channel_shape(self) -> tuple[int, ...]:
        return (self.num_features,)

    def forward(self, x: Tensor) -> Tensor:
        if self._expected_dims is not None and x.dim() not in self._expected_dims:
            raise ValueError(f"{type(self).__name__} expects {' or '.join(f'{d}D' for d in self._expected_dims)} input, got {x.dim()}D")
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
        from ..kernels.channel_norm import batch_norm  # late import: kernels are optional

        y = batch_norm(
            x,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            self.lam,
            self.op,
            training=self.training,
            momentum=self.momentum,
            eps=self.eps,
            running_c_mean=self.running_c_mean,
            running_c_var=self.running_c_var,
            running_z_var=self.running_z_var,
            num_batches_tracked=self.num_batches_tracked,
        )
        return self._post(y)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"track_running_stats={self.track_running_stats}, {self._lam_repr()}"
        )


class IBBatchNorm1d(IBBatchNorm):
    _expected_dims = (2, 3)


class IBBatchNorm2d(IBBatchNorm):
    _expected_dims = (4,)


class IBBatchNorm3d(IBBatchNorm):
    _expected_dims = (5,)
