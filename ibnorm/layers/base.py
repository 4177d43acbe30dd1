"""What every IBNorm module shares: the compression op and its strength λ."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from ..compression import get_op


class IBNormBase(nn.Module):
    """Holds ``op`` and ``lam``.

    ``lam`` is a scalar or one value per channel (``lam_shape``).  Fixed λ is a
    buffer; learnable λ is a parameter whose *effective* value is ``max(lam, 0)``
    (with a straight-through gradient, so λ can leave 0), and
    :func:`project_lambdas` projects it back onto λ ≥ 0 after an optimizer step.
    """

    lam: Tensor
    grouping: str  # rms | layer | batch | group, set by each subclass

    def _init_lambda(
        self,
        op: str,
        lam: float | Tensor,
        lam_shape: Sequence[int],
        per_channel: bool,
        learnable: bool,
    ) -> None:
        get_op(op)  # validates the name
        self.op = op
        value = torch.as_tensor(lam, dtype=torch.float32)
        if per_channel or value.dim() > 0:
            value = value.expand(tuple(lam_shape)).clone() if value.dim() == 0 else value.clone()
            if tuple(value.shape) != tuple(lam_shape):
                raise ValueError(f"per-channel λ must have shape {tuple(lam_shape)}, got {tuple(value.shape)}")
        if bool((value < 0).any()) or not bool(torch.isfinite(value).all()):
            raise ValueError("λ must be finite and ≥ 0")
        if learnable:
            self.lam = nn.Parameter(value)
        else:
            self.register_buffer("lam", value)

    def _init_affine(self, shape: Sequence[int], weight: bool, bias: bool, device=None, dtype=None) -> None:
        """γ (ones) and β (zeros) of ``shape``, or None, as torch's norms create them."""
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.ones(tuple(shape), **factory)) if weight else None
        self.bias = nn.Parameter(torch.zeros(tuple(shape), **factory)) if weight and bias else None

    def attach_activation(self, drop: nn.Module, act: nn.Module) -> None:
        """Apply dropout then activation after the norm, as timm's ``*NormAct`` layers do.

        Stored as ``drop`` and ``act`` so state-dict keys match timm's.
        """
        self.drop, self.act = drop, act

    def _post(self, y: Tensor) -> Tensor:
        if getattr(self, "act", None) is None:
            return y
        return self.act(self.drop(y))

    @property
    def effective_lam(self) -> Tensor:
        """The λ the layer applies (detached, ≥ 0)."""
        return self.lam.detach().clamp_min(0.0)

    @property
    def lam_is_learnable(self) -> bool:
        return isinstance(self.lam, nn.Parameter)

    def set_lambda(self, lam: float | Tensor, learnable: bool | None = None) -> None:
        """Replace λ (scalar or per channel), keeping or changing learnability."""
        learnable = self.lam_is_learnable if learnable is None else learnable
        per_channel = torch.as_tensor(lam).dim() > 0
        device = self.lam.device
        del self.lam
        self._init_lambda(self.op, torch.as_tensor(lam).detach().cpu(), self._lam_channel_shape(), per_channel, learnable)
        self.lam.data = self.lam.data.to(device)

    def _lam_channel_shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    def _lam_repr(self) -> str:
        lam = self.effective_lam
        if lam.dim() == 0:
            text = f"lam={lam.item():.4g}"
        else:
            text = f"lam=per-channel[{lam.numel()}] mean={lam.mean().item():.4g}"
        return f"op={self.op}, {text}" + (", learnable" if self.lam_is_learnable else "")


@torch.no_grad()
def project_lambdas(model: nn.Module) -> None:
    """Project every learnable λ in ``model`` onto λ ≥ 0 (call after optimizer steps)."""
    for module in model.modules():
        if isinstance(module, IBNormBase) and module.lam_is_learnable:
            module.lam.clamp_(min=0.0)
