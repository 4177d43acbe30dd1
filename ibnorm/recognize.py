"""What kind of normalization layer is this module?  A registry of recognizers.

Each recognizer looks at a module and either returns a :class:`NormSpec` (the
grouping, shapes, eps and the tensors that define the norm) or ``None``.
Recognizers go by what a module *is* — its attributes and forward semantics —
so the RMSNorm classes of every transformers architecture are found without a
list of their names.  New families register with :func:`register_recognizer`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn

ROW_KINDS = ("rms", "layer")
CHANNEL_KINDS = ("batch", "group")
KINDS = ROW_KINDS + CHANNEL_KINDS


@dataclass
class NormSpec:
    """A normalization layer, described independently of its class."""

    kind: str  # rms | layer | batch | group
    shape: tuple[int, ...]  # normalized_shape (row kinds) or (num_channels,)
    eps: float
    weight: Tensor | None = None  # the effective multiplicative weight (Gemma's 1 + w, for instance)
    bias: Tensor | None = None
    num_groups: int | None = None
    momentum: float | None = 0.1
    track_running_stats: bool = False
    running_mean: Tensor | None = None
    running_var: Tensor | None = None
    num_batches_tracked: Tensor | None = None
    batch_dims: tuple[int, ...] | None = None  # allowed input ranks for batch norms
    activation: nn.Module | None = None  # timm's BatchNormAct2d / GroupNormAct: kept after the norm
    note: str = ""  # how the source was interpreted (shown in surgery tables)
    skip_reason: str | None = None  # set when the module is a norm that cannot be converted
    source_class: str = field(default="")


Recognizer = Callable[[nn.Module], "NormSpec | None"]
_RECOGNIZERS: list[tuple[str, Recognizer]] = []


def register_recognizer(name: str) -> Callable[[Recognizer], Recognizer]:
    def deco(fn: Recognizer) -> Recognizer:
        _RECOGNIZERS.append((name, fn))
        return fn

    return deco


def recognize(module: nn.Module) -> NormSpec | None:
    """The :class:`NormSpec` of ``module``, or ``None`` if it is not a known norm."""
    from .layers import IBNormBase

    if isinstance(module, IBNormBase):
        return None
    for _, fn in _RECOGNIZERS:
        spec = fn(module)
        if spec is not None:
            spec.source_class = f"{type(module).__module__}.{type(module).__qualname__}"
            return spec
    return None


def _param(module: nn.Module, name: str) -> Tensor | None:
    t = getattr(module, name, None)
    return t if isinstance(t, Tensor) else None


# --- torch built-ins -------------------------------------------------------------------------


@register_recognizer("torch.nn.LayerNorm")
def _torch_layer_norm(m: nn.Module) -> NormSpec | None:
    if type(m).forward is not nn.LayerNorm.forward or not isinstance(m, nn.LayerNorm):
        return None  # subclasses that override forward (timm's LayerNorm2d, …) are handled below
    return NormSpec("layer", tuple(m.normalized_shape), m.eps, _param(m, "weight"), _param(m, "bias"))


@register_recognizer("torch.nn.RMSNorm")
def _torch_rms_norm(m: nn.Module) -> NormSpec | None:
    if not isinstance(m, nn.RMSNorm) or type(m).forward is not nn.RMSNorm.forward:
        return None
    eps = m.eps if m.eps is not None else torch.finfo(torch.float32).eps
    return NormSpec("rms", tuple(m.normalized_shape), eps, _param(m, "weight"))


@register_recognizer("torch.nn.BatchNorm")
def _torch_batch_norm(m: nn.Module) -> NormSpec | None:
    if not isinstance(m, nn.modules.batchnorm._BatchNorm):
        return None
    with_act = _has_act_and_drop(m)  # timm's BatchNormAct2d: norm, then dropout and activation
    if not with_act and type(m).forward is not nn.modules.batchnorm._BatchNorm.forward and not isinstance(m, nn.SyncBatchNorm):
        return None
    ranks = {nn.BatchNorm1d: (2, 3), nn.BatchNorm2d: (4,), nn.BatchNorm3d: (5,)}
    spec = NormSpec(
        "batch",
        (m.num_features,),
        m.eps,
        _param(m, "weight"),
        _param(m, "bias"),
        momentum=m.momentum,
        track_running_stats=m.track_running_stats,
        running_mean=m.running_mean,
        running_var=m.running_var,
        num_batches_tracked=m.num_batches_tracked,
        batch_dims=next((v for k, v in ranks.items() if isinstance(m, k)), None),
    )
    return _with_activation(spec, m) if with_act else spec


@register_recognizer("torch.nn.GroupNorm")
def _torch_group_norm(m: nn.Module) -> NormSpec | None:
    # Subclasses (timm's GroupNorm1, GroupNormAct) only add fast paths or an activation.
    if not isinstance(m, nn.GroupNorm):
        return None
    spec = NormSpec("group", (m.num_channels,), m.eps, _param(m, "weight"), _param(m, "bias"), num_groups=m.num_groups)
    return _with_activation(spec, m) if _has_act_and_drop(m) else spec


def _has_act_and_drop(m: nn.Module) -> bool:
    return isinstance(getattr(m, "act", None), nn.Module) and isinstance(getattr(m, "drop", None), nn.Module)


def _with_activation(spec: NormSpec, m: nn.Module) -> NormSpec:
    spec.activation = nn.Sequential(m.drop, m.act)
    spec.note = "dropout and activation kept after the norm"
    return spec
