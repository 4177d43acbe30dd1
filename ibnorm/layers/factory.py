"""Build the IBNorm equivalent of a recognized norm: ``from_module`` and ``from_spec``."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..recognize import CHANNEL_KINDS, KINDS, ROW_KINDS, NormSpec, recognize
from .base import IBNormBase
from .batch import IBBatchNorm, IBBatchNorm1d, IBBatchNorm2d, IBBatchNorm3d
from .group import IBGroupNorm
from .rowwise import IBLayerNorm, IBLayerNorm2d, IBRMSNorm, IBRMSNorm2d

VARIANTS = ("auto",) + KINDS
_BATCH_CLASS_BY_DIMS = {(2, 3): IBBatchNorm1d, (4,): IBBatchNorm2d, (5,): IBBatchNorm3d}


def resolve_variant(spec: NormSpec, variant: str) -> str:
    """The grouping the IBNorm layer will use; raises if it cannot apply to this source."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    if variant == "auto" or variant == spec.kind:
        return spec.kind
    if spec.kind in ROW_KINDS and variant in ROW_KINDS:
        return variant
    raise ValueError(
        f"variant {variant!r} cannot replace a {spec.kind} norm ({spec.source_class or 'unknown class'}): "
        f"row-wise norms take rms/layer, {'/'.join(CHANNEL_KINDS)} norms keep their own grouping"
    )


def from_spec(
    spec: NormSpec,
    *,
    op: str = "tanh",
    lam: float | Tensor = 0.0,
    variant: str = "auto",
    learnable_lam: bool = False,
) -> IBNormBase:
    """A new IBNorm module carrying the spec's weights, eps and running statistics."""
    if spec.skip_reason:
        raise ValueError(f"{spec.source_class} cannot be converted: {spec.skip_reason}")
    kind = resolve_variant(spec, variant)
    lam_kw = {"op": op, "lam": lam, "per_channel": torch.as_tensor(lam).dim() > 0, "learnable_lam": learnable_lam}
    affine = spec.weight is not None
    if kind in ROW_KINDS:
        classes = (IBRMSNorm, IBLayerNorm) if spec.channel_dim == -1 else (IBRMSNorm2d, IBLayerNorm2d)
        cls = classes[0] if kind == "rms" else classes[1]
        module: IBNormBase = cls(spec.shape, spec.eps, affine, bias=spec.bias is not None, **lam_kw)
    elif kind == "batch":
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
    if spec.kind == "batch" and spec.track_running_stats and spec.running_mean is not None:
        module.running_mean.copy_(spec.running_mean)
        module.running_var.copy_(spec.running_var)
        module.num_batches_tracked.copy_(spec.num_batches_tracked)


def from_module(
    norm_module: nn.Module,
    *,
    op: str = "tanh",
    lam: float | Tensor = 0.0,
    variant: str = "auto",
    learnable_lam: bool = False,
) -> IBNormBase:
    """The IBNorm equivalent of ``norm_module``.

    Copies weight, bias, eps, normalized shape, running statistics, device, dtype
    and train/eval mode; ``variant="auto"`` keeps the source's grouping.  At
    ``lam=0`` the result computes the same function as the source.

    Raises ``TypeError`` for modules that are not a recognized normalization layer.
    """
    spec = recognize(norm_module)
    if spec is None:
        raise TypeError(f"{type(norm_module).__qualname__} is not a normalization layer ibnorm can convert")
    module = from_spec(spec, op=op, lam=lam, variant=variant, learnable_lam=learnable_lam)
    module.train(norm_module.training)
    return module
