"""What a fine-tune is asked to do (options), what it reports (result), and its schedule."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from torch import Tensor

TRAIN_MODES = ("norms", "all", "lora")
CHECKPOINT_DIR_SUFFIX = "-checkpoints"

Progress = Callable[[dict], None]


TRAIN_SEQ_LEN = 256


@dataclass
class FinetuneOptions:
    data: str
    steps: int = 1000
    out: str | None = None
    eval_data: str | None = None  # default: the last 10% of the training examples
    eval_every: int = 100
    eval_blocks: int = 16  # held-out examples scored at each evaluation
    train: str = "norms"
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup: int = 20
    batch_size: int = 4  # per process and micro-step
    grad_accum: int = 1
    clip: float = 1.0
    seq_len: int | None = None  # None: min(TRAIN_SEQ_LEN, the model's positions)
    text_field: str = "text"
    seed: int = 0
    save_every: int = 0  # 0: checkpoint only when interrupted
    resume: bool = False
    force: bool = False
    lora_rank: int = 8
    compare_source: bool = True
    mi_every: int = 0  # record I(X;T), I(T;Y) per norm every N steps (causal LMs); 0: never
    shard: str = "auto"  # none | ddp | fsdp | auto (plan.choose_shard)
    gpu_memory: int | None = None  # bytes per rank for the memory plan (default: the devices present)

    def recipe(self, world: int = 1) -> dict:
        """The options that define a run: a checkpoint may be resumed only by the same recipe.  The
        batch counts globally (per process × processes), so a run may resume on another number of ranks."""
        skip = ("steps", "out", "eval_every", "save_every", "resume", "force", "compare_source", "mi_every", "shard",
                "gpu_memory", "batch_size")
        return {**{k: v for k, v in asdict(self).items() if k not in skip}, "global_batch": self.batch_size * world}


@dataclass
class FinetuneResult:
    out: str
    steps: int
    losses: list[float] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    source_eval: dict | None = None
    lambda_trajectory: dict[str, list[float]] = field(default_factory=dict)
    information: list[dict] = field(default_factory=list)  # {"step", "mi": {layer: {I_XT, I_TY, …}}} (--mi-every)
    kernel: str = "reference"
    stopped: str = "completed"
    seconds: float = 0.0
    tokens_per_second: float = 0.0
    is_main_process: bool = True

    def summary(self) -> dict:
        d = asdict(self)
        d.pop("losses")
        d.pop("is_main_process")
        d.pop("information")
        d["final_loss"] = self.losses[-1] if self.losses else None
        d["lambda_trajectory"] = {k: v[-1] for k, v in self.lambda_trajectory.items()}  # final λ per layer
        return d


def lr_at(step: int, opts: FinetuneOptions) -> float:
    """Linear warmup, then cosine decay to 10% of the peak."""
    if step < opts.warmup:
        return opts.lr * (step + 1) / opts.warmup
    t = (step - opts.warmup) / max(1, opts.steps - opts.warmup)
    return opts.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def global_batch_indices(step: int, micro: int, n_examples: int, global_micro_batch: int, grad_accum: int, seed: int) -> Tensor:
    """Example indices of one global micro-batch: a seeded permutation per epoch, a pure function of the step."""
    first = (step * grad_accum + micro) * global_micro_batch
    positions = torch.arange(first, first + global_micro_batch)
    out = torch.empty_like(positions)
    for epoch in positions.div(n_examples, rounding_mode="floor").unique().tolist():
        perm = torch.randperm(n_examples, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        sel = positions.div(n_examples, rounding_mode="floor") == epoch
        out[sel] = perm[positions[sel] % n_examples]
    return out
