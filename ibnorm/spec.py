"""A normalization layer described independently of its class: what recognition finds and
what the IBNorm layers are built from."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor, nn

ROW_GROUPINGS = ("rms", "layer")  # statistics over each row (token)
CHANNEL_GROUPINGS = ("batch", "group")  # statistics over samples per channel (group)
GROUPINGS = ROW_GROUPINGS + CHANNEL_GROUPINGS


@dataclass
class NormSpec:
    """A normalization layer, described independently of its class."""

    grouping: str  # rms | layer | batch | group
    shape: tuple[int, ...]  # normalized_shape (row groupings) or (num_channels,)
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
    channel_dim: int = -1  # row groupings: 1 for channels-first layouts (timm's LayerNorm2d)
    activation: nn.Module | None = None  # timm's BatchNormAct2d / GroupNormAct: kept after the norm
    note: str = ""  # how the source was interpreted (shown in surgery tables)
    skip_reason: str | None = None  # set when the module is a norm that cannot be converted
    source_class: str = field(default="")
