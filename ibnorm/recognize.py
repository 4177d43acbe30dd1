"""Which normalization layer is this module?  A registry of recognizers.

Each recognizer looks at a module and either returns a :class:`NormSpec` (the
grouping, shapes, eps and the tensors that define the norm) or ``None``.
Recognizers go by what a module *is* — its attributes and forward semantics —
so the RMSNorm classes of every transformers architecture are found without a
list of their names.  New families register with :func:`register_recognizer`.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from .layers import IBNormBase
from .spec import CHANNEL_GROUPINGS, GROUPINGS, ROW_GROUPINGS, NormSpec  # noqa: F401  (re-exported)

Recognizer = Callable[[nn.Module], "NormSpec | None"]
_RECOGNIZERS: list[tuple[str, Recognizer]] = []


def register_recognizer(name: str) -> Callable[[Recognizer], Recognizer]:
    def deco(fn: Recognizer) -> Recognizer:
        _RECOGNIZERS.append((name, fn))
        return fn

    return deco


def recognize(module: nn.Module) -> NormSpec | None:
    """The :class:`NormSpec` of ``module``, or ``None`` if it is not a known norm."""
    if isinstance(module, IBNormBase):
        return None
    probe = _materialized_copy(module) if _is_meta(module) else module
    for _, fn in _RECOGNIZERS:
        spec = fn(probe)
        if spec is not None:
            spec.source_class = f"{type(module).__module__}.{type(module).__qualname__}"
            return spec
    return None


def _is_meta(module: nn.Module) -> bool:
    return any(t.is_meta for t in module.parameters(recurse=False))


@torch.no_grad()
def _materialized_copy(module: nn.Module) -> nn.Module:
    """A CPU copy with random weights of a meta-device norm (cheap: norms are small), so a
    skeleton built without weights can be recognized.  Only its grouping/shape/eps are meaningful."""
    import copy

    if sum(t.numel() for t in module.parameters()) > 1 << 22:  # not a norm: do not materialize big modules
        return module
    clone = copy.deepcopy(module).to_empty(device="cpu")
    g = torch.Generator().manual_seed(99)
    for t in list(clone.parameters()) + list(clone.buffers()):
        if t.is_floating_point():
            t.copy_(torch.rand(t.shape, generator=g) + 0.5)
    return clone


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


# --- any other row-wise norm, recognized by probing what its forward computes ----------------

_EPS_ATTRS = ("eps", "variance_epsilon", "epsilon")
_FROZEN_BN_NAMES = ("FrozenBatchNorm2d", "FrozenBatchNorm")


@register_recognizer("frozen BatchNorm")
def _frozen_batch_norm(m: nn.Module) -> NormSpec | None:
    if type(m).__name__ not in _FROZEN_BN_NAMES:
        return None
    return NormSpec(
        "batch", (m.weight.shape[0],), getattr(m, "eps", 1e-5),
        skip_reason="frozen BatchNorm: a fixed affine map with no batch statistics to compress",
    )


def _eps_of(m: nn.Module) -> float | None:
    for name in _EPS_ATTRS:
        v = getattr(m, name, None)
        if isinstance(v, (float, int)) and not isinstance(v, bool):
            return float(v)
    return None


@torch.no_grad()
def _probe_row_norm(m: nn.Module) -> NormSpec | None:
    """Call ``m`` on a random input and match its output against the row-norm formulas.

    Finds RMSNorm (``x·w``), Gemma-style RMSNorm (``x·(1+w)``, stored weight 0-initialised)
    and LayerNorm, whatever the class is called, and checks the semantics at the same time.
    """
    if any(True for _ in m.children()) or "norm" not in type(m).__name__.lower():
        return None
    eps = _eps_of(m)
    weight, bias = _param(m, "weight"), _param(m, "bias")
    if eps is None or (weight is not None and weight.dim() != 1) or (weight is not None and weight.is_meta):
        return None
    hidden = weight.shape[0] if weight is not None else getattr(m, "normalized_shape", (None,))[-1]
    if not hidden:
        return None
    channels_first = type(m).__name__.endswith("2d")
    device = weight.device if weight is not None else torch.device("cpu")
    dtype = weight.dtype if weight is not None and weight.is_floating_point() else torch.float32
    g = torch.Generator().manual_seed(1234)
    x = (torch.randn(3, 5, hidden, generator=g) * 2 + 0.5).to(device=device, dtype=dtype)
    try:
        y = m(x.permute(0, 2, 1).unsqueeze(-1)).squeeze(-1).permute(0, 2, 1) if channels_first else m(x)
    except Exception:  # not callable like a norm on (…, hidden): not ours to convert
        return None
    if not isinstance(y, Tensor) or y.shape != x.shape:
        return None
    xf, yf = x.float(), y.float()
    w = weight.float() if weight is not None else None
    b = bias.float() if bias is not None else None
    rms = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    centred = xf - xf.mean(-1, keepdim=True)
    layer = centred * torch.rsqrt(centred.square().mean(-1, keepdim=True) + eps)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    candidates = [
        ("layer", layer, w, b, ""),
        ("rms", rms, w, b, ""),
        ("rms", rms, None if w is None else 1.0 + w, b, "Gemma-style x·(1+w): stored as the equivalent plain weight"),
    ]
    for grouping, normed, cw, cb, note in candidates:
        want = normed * (cw if cw is not None else 1.0) + (cb if cb is not None else 0.0)
        if torch.allclose(yf, want, rtol=tol, atol=tol * max(1.0, want.abs().max().item())):
            # Gemma's 1 + w is kept in float32, where the source computes it.
            eff_weight = weight if cw is w else cw
            spec = NormSpec(grouping, (hidden,), eps, eff_weight, bias, note=note)
            spec.channel_dim = 1 if channels_first else -1
            return spec
    return None


register_recognizer("row-wise norm (probed)")(_probe_row_norm)
