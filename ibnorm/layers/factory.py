"""Build the IBNorm equivalent of a recognized norm (``from_spec``).

``ibnorm.from_module`` (recognize, then build) lives in ``ibnorm.surgery``: recognition sits above
the layers, so the layers never import it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..spec import CHANNEL_GROUPINGS, GROUPINGS, ROW_GROUPINGS, NormSpec
from .base import IBNormBase
from .batch import IBBatchNorm, IBBatchNorm1d, IBBatchNorm2d, IBBatchNorm3d
from .group import IBGroupNorm
from .rowwise import IBLayerNorm, IBLayerNorm2d, IBNormRMS, IBNormRMS2d

GROUPING_CHOICES = ("auto",) + GROUPINGS
_BATCH_CLASS_BY_DIMS = {(2, 3): IBBatchNorm1d, (4,): IBBatchNorm2d, (5,): IBBatchNorm3d}


def resolve_grouping(spec: NormSpec, grouping: str) -> str:
    """The grouping the IBNorm layer will use; raises if it cannot apply to this source."""
    if grouping not in GROUPING_CHOICES:
        raise ValueError(f"unknown grouping {grouping!r}; choose one of {', '.join(GROUPING_CHOICES)}")
    if grouping == "auto" or grouping == spec.grouping:
        return spec.grouping
    if spec.grouping in ROW_GROUPINGS and grouping in ROW_GROUPINGS:
        return grouping
    raise ValueError(
        f"grouping {grouping!r} cannot replace a {spec.grouping} norm ({spec.source_class or 'unknown class'}): "
        f"row-wise norms take rms/layer, {'/'.join(CHANNEL_GROUPINGS)} norms keep their own grouping"
    )


def grouping_of(module: IBNormBase) -> str:
    """rms | layer | batch | group."""
    return module.grouping


def from_spec(
    spec: NormSpec,
    *,
    op: str = "tanh",
    lam: float | Tensor = 0.0,
    grouping: str = "auto",
    learnable_lam: bool = False,
) -> IBNormBase:
    """A new IBNorm module carrying the spec's weights, eps and running statistics."""
    if spec.skip_reason:
        raise ValueError(f"{spec.source_class} cannot be converted: {spec.skip_reason}")
    grouping = resolve_grouping(spec, grouping)
    lam_kw = {"op": op, "lam": lam, "per_channel": torch.as_tensor(lam).dim() > 0, "learnable_lam": learnable_lam}
    affine = spec.weight is not None
    if grouping in ROW_GROUPINGS:
        classes = (IBNormRMS, IBLayerNorm) if spec.channel_dim == -1 else (IBNormRMS2d, IBLayerNorm2d)
        cls = classes[0] if grouping == "rms" else classes[1]
        module: IBNormBase = cls(spec.shape, spec.eps, affine, bias=spec.bias is not None, **lam_kw)
    elif grouping == "batch":
        cls = _BATCH_CLASS_BY_DIMS.get(spec.batch_dims or (), IBBatchNorm)
        module = cls(spec.shape[0], spec.eps, spec.momentum, affine, spec.track_running_stats, **lam_kw)
    else:
        module = IBGroupNorm(spec.num_groups, spec.shape[0], spec.eps, affine, **lam_kw)
    _copy_tensors(module, spec)
    if spec.activation is not None:
        module.attach_activation(spec.activation[0], spec.activation[1])
    return module


@torch.no_grad()
def _copy_tensors(module: IBNormBase, spec: NormSpec) -> None:
    like = spec.weight if spec.weight is not None else spec.running_mean
    if like is not None:
        module.to(device=like.device)
    for name in ("weight", "bias"):
        src, dst = getattr(spec, name), getattr(module, name, None)
        if dst is None:
            continue
        if src is None:  # e.g. layer → rms keeps no bias; rms → layer gets a zero bias it can learn
            dst.zero_()
            continue
        dst.data = src.detach().clone().to(dtype=src.dtype)
    if spec.grouping == "batch" and spec.track_running_stats and spec.running_mean is not None:
        module.running_mean.copy_(spec.running_mean)
        module.running_var.copy_(spec.running_var)
        module.num_batches_tracked.copy_(spec.num_batches_tracked)
