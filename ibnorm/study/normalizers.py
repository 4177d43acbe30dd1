"""The normalizers a study compares, applied to a freshly built model by swapping its norms."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..surgery import from_module
from ..surgery import find_norms, replace_norms

# name → (compression op or None, learnable λ)
_IB = {"ibnorm-s": "power", "ibnorm-l": "log", "ibnorm-t": "tanh"}
NORMALIZERS = ("baseline", "ibnorm-s", "ibnorm-l", "ibnorm-t", "ibnorm-s-learn", "ibnorm-l-learn", "ibnorm-t-learn", "dyt")


class DyT(nn.Module):
    """Dynamic Tanh (Zhu et al. 2025): γ·tanh(αx) + β with one learnable scalar α per layer.

    ``channel_dim`` is where γ and β apply: -1 for tokens, 1 for N, C, H, W feature maps.
    """

    def __init__(self, channels: int, channel_dim: int = -1, alpha0: float = 0.5) -> None:
        super().__init__()
        self.channel_dim = channel_dim
        self.alpha = nn.Parameter(torch.tensor(float(alpha0)))
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        shape = [1] * x.dim()
        shape[self.channel_dim] = -1
        return torch.tanh(self.alpha * x) * self.weight.view(shape) + self.bias.view(shape)


def check_normalizer(name: str) -> None:
    if name not in NORMALIZERS:
        raise ValueError(f"unknown normalizer {name!r}; choose from {', '.join(NORMALIZERS)}")


def apply_normalizer(model: nn.Module, name: str, lam: float) -> nn.Module:
    """Replace every norm of ``model`` (built with its own norms) by normalizer ``name``.

    The swapped-in layers start as the source norms do (γ = 1, β = 0), so for one seed every
    normalizer trains from the same initial weights: runs are paired.
    """
    check_normalizer(name)
    if name == "baseline":
        return model
    sites, _ = find_norms(model)

    def build(site) -> nn.Module:
        if name == "dyt":
            channel_dim = 1 if site.spec.grouping == "batch" else site.spec.channel_dim
            return DyT(site.spec.shape[0] if channel_dim == 1 else site.spec.shape[-1], channel_dim)
        op = _IB[name.removesuffix("-learn")]
        return from_module(site.module, op=op, lam=lam, learnable_lam=name.endswith("-learn"))

    replace_norms(model, sites, build)
    return model

